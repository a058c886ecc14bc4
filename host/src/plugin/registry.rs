//! Discovery: the built-in plugins compiled into the binary plus every component in the data
//! directory's `plugins/` folder. Built-in names are reserved: a file plugin with a built-in's
//! name is refused, unless it was installed with an explicit `--replace-builtin` (which leaves
//! a marker beside it); then it replaces the built-in, with a warning, and runs record it as a
//! user plugin with its own sha256.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::plugin::error::PluginError;
use crate::plugin::manifest::{PluginKind, PluginSource};
use crate::plugin::runtime::{Plugin, Runtime};

mod builtin {
    include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));
}

/// The directory holding the components that were built with the host but not embedded
/// (the SDK example, the sandbox tests' plugins).
pub const WASM_BUILD_DIR: &str = env!("ADAPTERLAB_WASM_DIR");

/// The plugins available to one command or server.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: Vec<Plugin>,
    /// Files in the plugins folder that failed to load, with why.
    pub problems: Vec<(PathBuf, String)>,
    /// The built-ins' names, reserved even where a user's component replaced one.
    builtin_names: Vec<String>,
}

impl Registry {
    /// Load the built-ins and the components in `plugins_dir`.
    pub fn load(runtime: &Runtime, plugins_dir: &Path) -> anyhow::Result<Self> {
        let mut registry = Registry::default();
        for (package, bytes) in builtin::BUILTIN_PLUGINS {
            let plugin = runtime
                .load(bytes, PluginSource::Builtin)
                .with_context(|| format!("built-in plugin {package} failed to load"))?;
            registry.builtin_names.push(plugin.meta.name.clone());
            registry.insert(plugin);
        }
        for path in component_files(plugins_dir)? {
            match std::fs::read(&path) {
                Err(e) => registry.problems.push((path, e.to_string())),
                Ok(bytes) => match runtime.load(&bytes, PluginSource::File(path.clone())) {
                    Ok(plugin) if registry.is_builtin(&plugin.meta.name) => {
                        if replace_marker(plugins_dir, &plugin.meta.name).exists() {
                            tracing::warn!(
                                "the user plugin {} replaces the built-in plugin of that name",
                                path.display()
                            );
                            registry.insert(plugin);
                        } else {
                            let name = plugin.meta.name.clone();
                            registry.problems.push((path, reserved_name(&name)));
                        }
                    }
                    Ok(plugin) => {
                        if registry.plugins.iter().any(|p| {
                            p.meta.name == plugin.meta.name
                                && p.meta.source != PluginSource::Builtin
                        }) {
                            registry.problems.push((
                                path,
                                format!(
                                    "another installed component is also named {:?}; ignored",
                                    plugin.meta.name
                                ),
                            ));
                        } else {
                            registry.insert(plugin);
                        }
                    }
                    Err(e) => registry.problems.push((path, e.to_string())),
                },
            }
        }
        for (path, problem) in &registry.problems {
            tracing::warn!("plugin {} not loaded: {problem}", path.display());
        }
        Ok(registry)
    }

    /// Whether `name` is a built-in plugin's (reserved) name.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin_names.iter().any(|n| n == name)
    }

    fn insert(&mut self, plugin: Plugin) {
        self.plugins.retain(|p| p.meta.name != plugin.meta.name);
        self.plugins.push(plugin);
    }

    /// Add (or replace) a plugin at run time, e.g. after an upload.
    pub fn add(&mut self, plugin: Plugin) {
        self.insert(plugin);
    }

    pub fn all(&self) -> &[Plugin] {
        &self.plugins
    }

    pub fn of_kind(&self, kind: PluginKind) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().filter(move |p| p.meta.kind == kind)
    }

    /// The plugin named `name`, of kind `kind`.
    pub fn get(&self, name: &str, kind: PluginKind) -> Result<&Plugin, PluginError> {
        match self.plugins.iter().find(|p| p.meta.name == name) {
            Some(p) if p.meta.kind == kind => Ok(p),
            Some(p) => Err(PluginError::WrongKind {
                plugin: name.to_string(),
                expected: kind.as_str(),
                actual: p.meta.kind.as_str(),
            }),
            None => {
                let names: Vec<&str> = self.of_kind(kind).map(|p| p.meta.name.as_str()).collect();
                let hint = match closest(name, &names) {
                    Some(c) => format!(
                        "; did you mean {c:?}? (available {}s: {})",
                        kind,
                        names.join(", ")
                    ),
                    None => format!(" (available {}s: {})", kind, names.join(", ")),
                };
                Err(PluginError::NotFound {
                    name: name.to_string(),
                    hint,
                })
            }
        }
    }

    /// The reporter whose format name is `format`.
    pub fn reporter_for(&self, format: &str) -> Result<&Plugin, PluginError> {
        self.of_kind(PluginKind::Reporter)
            .find(|p| p.meta.format.as_deref() == Some(format))
            .ok_or_else(|| {
                let formats: Vec<&str> = self
                    .of_kind(PluginKind::Reporter)
                    .filter_map(|p| p.meta.format.as_deref())
                    .collect();
                PluginError::NotFound {
                    name: format!("reporter for format {format}"),
                    hint: format!(" (formats: {})", formats.join(", ")),
                }
            })
    }
}

/// What the store keeps of an installed plugin.
pub fn install_record(
    meta: &crate::plugin::PluginMeta,
    origin: &Path,
) -> crate::store::PluginRecord {
    crate::store::PluginRecord {
        name: meta.name.clone(),
        version: meta.version.clone(),
        kind: meta.kind.to_string(),
        sha256: meta.sha256.clone(),
        origin: origin.display().to_string(),
        file: meta.source.to_string(),
        installed: crate::store::now_rfc3339(),
    }
}

/// The file whose presence says the user chose to replace the built-in `name`.
fn replace_marker(plugins_dir: &Path, name: &str) -> PathBuf {
    plugins_dir.join(format!(".{name}.replaces-builtin"))
}

fn reserved_name(name: &str) -> String {
    format!(
        "{name:?} is the name of a built-in plugin; to use this component instead of the built-in for every run of this data directory, install it with --replace-builtin (the dashboard: \"replace the built-in\"), or give it another name"
    )
}

/// Validate a component and copy it into `plugins_dir` as `<name>.wasm`. A built-in's name is
/// refused unless `replace_builtin` says the user means to replace it.
pub fn install(
    runtime: &Runtime,
    registry: &Registry,
    plugins_dir: &Path,
    bytes: &[u8],
    origin: &Path,
    replace_builtin: bool,
) -> anyhow::Result<Plugin> {
    let plugin = runtime.load(bytes, PluginSource::File(origin.to_path_buf()))?;
    let builtin = registry.is_builtin(&plugin.meta.name);
    if builtin && !replace_builtin {
        anyhow::bail!("{}", reserved_name(&plugin.meta.name));
    }
    std::fs::create_dir_all(plugins_dir)
        .with_context(|| format!("failed to create {}", plugins_dir.display()))?;
    let dest = plugins_dir.join(format!("{}.wasm", plugin.meta.name));
    let tmp = plugins_dir.join(format!(
        ".{}.wasm.tmp{}",
        plugin.meta.name,
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("failed to install {}", dest.display()))?;
    let marker = replace_marker(plugins_dir, &plugin.meta.name);
    if builtin {
        std::fs::write(&marker, b"")
            .with_context(|| format!("failed to write {}", marker.display()))?;
        tracing::warn!(
            "the user plugin {} now replaces the built-in plugin of that name",
            plugin.meta.name
        );
    } else {
        let _ = std::fs::remove_file(&marker);
    }
    // Reload from the installed path so the metadata names where it lives now.
    let mut meta = (*plugin.meta).clone();
    meta.source = PluginSource::File(dest);
    Ok(plugin.with_meta(meta))
}

/// Why `uninstall` refused.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("{name:?} is a built-in plugin: built-in plugins cannot be uninstalled")]
    Builtin { name: String },
    #[error("no installed plugin named {name:?}{hint}")]
    NotFound { name: String, hint: String },
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// What `uninstall` removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Uninstalled {
    pub name: String,
    /// The component files deleted from the plugins folder.
    pub files: Vec<PathBuf>,
    /// Whether the store held an install record for it (now deleted).
    pub record: bool,
}

/// Remove the installed plugin `name`: its component file(s) in `plugins_dir` and its install
/// record. `registry` is what the caller loaded (it maps manifest names to files: a file
/// copied in by hand may be named differently); a file that no longer loads is still found
/// under its install name, `NAME.wasm`. Built-ins are refused. Callers that keep a registry in
/// memory (the server) reload it afterwards.
pub fn uninstall(
    registry: &Registry,
    plugins_dir: &Path,
    store: &crate::store::Store,
    name: &str,
) -> Result<Uninstalled, UninstallError> {
    // A file plugin with a built-in's name shadows it in the registry; removing that file is
    // an uninstall like any other, after which the built-in is visible again.
    let is_builtin = registry.is_builtin(name);
    let mut files: Vec<PathBuf> = Vec::new();
    // Only names that `install` could have written reach a path: no `..`, no separators.
    if crate::plugin::manifest::is_identifier(name) {
        let installed = plugins_dir.join(format!("{name}.wasm"));
        if installed.is_file() {
            files.push(installed);
        }
    }
    for plugin in registry.all() {
        if let PluginSource::File(path) = &plugin.meta.source
            && plugin.meta.name == name
            && path.parent() == Some(plugins_dir)
            && !files.contains(path)
        {
            files.push(path.clone());
        }
    }
    if files.is_empty() && is_builtin {
        return Err(UninstallError::Builtin {
            name: name.to_string(),
        });
    }
    for file in &files {
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("failed to delete {}", file.display()))
                    .into());
            }
        }
    }
    if !files.is_empty() && crate::plugin::manifest::is_identifier(name) {
        // The marker a `--replace-builtin` install leaves beside a component named like a
        // built-in: without the component it would only confuse a later install.
        let _ = std::fs::remove_file(replace_marker(plugins_dir, name));
    }
    let record = store
        .delete_plugin(name)
        .with_context(|| format!("failed to delete the store record of plugin {name:?}"))?;
    if files.is_empty() && !record {
        let mut installed: Vec<String> = registry
            .all()
            .iter()
            .filter(|p| p.meta.source != PluginSource::Builtin)
            .map(|p| p.meta.name.clone())
            .collect();
        installed.extend(
            store
                .list_plugins()
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.name),
        );
        installed.sort();
        installed.dedup();
        let candidates: Vec<&str> = installed.iter().map(String::as_str).collect();
        let listing = if installed.is_empty() {
            " (no plugins are installed)".to_string()
        } else {
            format!(" (installed: {})", installed.join(", "))
        };
        let hint = match closest(name, &candidates) {
            Some(c) => format!("; did you mean {c:?}?{listing}"),
            None => listing,
        };
        return Err(UninstallError::NotFound {
            name: name.to_string(),
            hint,
        });
    }
    Ok(Uninstalled {
        name: name.to_string(),
        files,
        record,
    })
}

fn component_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo.
pub fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions ("blue" → "bleu") each cost one.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(closest("rouge1", &["rouge", "bleu"]), Some("rouge"));
        assert_eq!(closest("blue", &["rouge", "bleu"]), Some("bleu"));
        assert_eq!(closest("perplexity", &["rouge", "bleu"]), None);
    }
}
