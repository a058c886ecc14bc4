//! `adapterlab plugins new NAME --lang LANG`: writes a buildable metric-plugin project from the
//! templates in `host/templates/`, with the plugin contract (and, for Rust, the SDK) embedded
//! in this binary, so a project can be started anywhere without the adapterlab repository.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The languages `plugins new` writes projects in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust with the adapterlab SDK (cargo, target wasm32-wasip2).
    Rust,
    /// Python with componentize-py.
    Python,
    /// JavaScript with componentize-js.
    Js,
    /// C with clang + wasi-libc, bindings by wit-bindgen, componentized by jco.
    C,
}

impl Lang {
    fn templates(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Lang::Rust => RUST,
            Lang::Python => PYTHON,
            Lang::Js => JS,
            Lang::C => C,
        }
    }

    /// Where the contract's WIT files go, per version: the Rust project reads both versions
    /// through its SDK copy (the SDK builds 0.2.0 and keeps 0.1.0 under `v0_1`); the other
    /// languages' templates are written against 0.1.0, which the host keeps serving.
    fn wit_dirs(self) -> &'static [(&'static str, &'static [(&'static str, &'static str)])] {
        match self {
            Lang::Rust => &[
                ("adapterlab-sdk/wit/since_v0.2.0", WIT_V2),
                ("adapterlab-sdk/wit/since_v0.1.0", WIT_V1),
            ],
            Lang::Python | Lang::Js | Lang::C => &[("wit", WIT_V1)],
        }
    }
}

/// What was written.
pub struct Project {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    /// The command that builds `NAME.wasm`, run in `dir`.
    pub build: &'static str,
}

macro_rules! template {
    ($lang:literal, $path:literal) => {
        (
            $path,
            include_str!(concat!("../../../templates/plugin-", $lang, "/", $path)),
        )
    };
}

static RUST: &[(&str, &str)] = &[
    template!("rust", "Cargo.toml.in"),
    template!("rust", "src/lib.rs"),
    template!("rust", "build.sh"),
    template!("rust", "README.md"),
    template!("rust", ".gitignore"),
];
static PYTHON: &[(&str, &str)] = &[
    template!("python", "app.py"),
    template!("python", "build.sh"),
    template!("python", "README.md"),
    template!("python", ".gitignore"),
];
static JS: &[(&str, &str)] = &[
    template!("js", "metric.js"),
    template!("js", "package.json"),
    template!("js", "package-lock.json"),
    template!("js", "build.sh"),
    template!("js", "README.md"),
    template!("js", ".gitignore"),
];
static C: &[(&str, &str)] = &[
    template!("c", "metric.c"),
    template!("c", "package.json"),
    template!("c", "package-lock.json"),
    template!("c", "build.sh"),
    template!("c", "README.md"),
    template!("c", ".gitignore"),
];

/// `(path, contents)` of a file under `sdk/` (the path relative to `$dir`).
macro_rules! sdk_file {
    ($dir:literal, $path:literal) => {
        (
            $path,
            include_str!(concat!("../../../../sdk/", $dir, $path)),
        )
    };
}

/// The plugin contract 0.1.0, `sdk/wit/since_v0.1.0/`.
const WIT_V1: &[(&str, &str)] = &[
    sdk_file!("wit/since_v0.1.0/", "types.wit"),
    sdk_file!("wit/since_v0.1.0/", "worlds.wit"),
    sdk_file!("wit/since_v0.1.0/", "metric.wit"),
    sdk_file!("wit/since_v0.1.0/", "formatter.wit"),
    sdk_file!("wit/since_v0.1.0/", "reporter.wit"),
];

/// The plugin contract 0.2.0, `sdk/wit/since_v0.2.0/`.
const WIT_V2: &[(&str, &str)] = &[
    sdk_file!("wit/since_v0.2.0/", "types.wit"),
    sdk_file!("wit/since_v0.2.0/", "worlds.wit"),
    sdk_file!("wit/since_v0.2.0/", "metric.wit"),
    sdk_file!("wit/since_v0.2.0/", "formatter.wit"),
    sdk_file!("wit/since_v0.2.0/", "reporter.wit"),
];

/// The Rust SDK crate (without its WIT files, which come from `WIT`).
static SDK: &[(&str, &str)] = &[
    sdk_file!("", "Cargo.toml"),
    sdk_file!("", "src/lib.rs"),
    sdk_file!("", "src/metric.rs"),
    sdk_file!("", "src/formatter.rs"),
    sdk_file!("", "src/reporter.rs"),
    sdk_file!("", "src/hash.rs"),
    sdk_file!("", "src/v0_1.rs"),
];

/// `[a-z][a-z0-9-]*`: a valid manifest name, a file name on every system, and (with `-` as
/// `_`) a Rust crate and score-name prefix. Manifest names stop at 64 characters.
pub fn check_name(name: &str) -> Result<()> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "invalid plugin name {name:?}: use a lowercase letter followed by lowercase letters, digits or '-' (at most 64), e.g. \"word-overlap\""
        );
    }
    Ok(())
}

/// Write the project `parent/name/`. Refuses a bad name and a folder that exists and is not
/// empty; an existing empty folder is used.
pub fn create(name: &str, lang: Lang, parent: &Path) -> Result<Project> {
    check_name(name)?;
    let dir = parent.join(name);
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} already exists and is not empty: choose another name or --dir, or remove it",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{} already exists and is not a folder", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    }
    let score = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{score}}", &score)
            .replace("{{crate}}", &score)
            .replace("{{host_version}}", env!("CARGO_PKG_VERSION"))
    };
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (path, text) in lang.templates() {
        let path = path.strip_suffix(".in").unwrap_or(path);
        files.push((PathBuf::from(path), fill(text)));
    }
    for (dir, wit) in lang.wit_dirs() {
        for (path, text) in *wit {
            files.push((Path::new(dir).join(path), text.to_string()));
        }
    }
    if lang == Lang::Rust {
        for (path, text) in SDK {
            files.push((Path::new("adapterlab-sdk").join(path), text.to_string()));
        }
    }
    let mut written = Vec::new();
    for (rel, text) in files {
        let path = dir.join(&rel);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("failed to create {}", folder.display()))?;
        }
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        if rel.extension().is_some_and(|e| e == "sh") {
            make_executable(&path)?;
        }
        written.push(path);
    }
    Ok(Project {
        dir,
        files: written,
        build: "./build.sh",
    })
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("failed to make {} executable", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "word-overlap", "m2", "x-1-y"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Word",
            "1st",
            "-a",
            "a_b",
            "a.b",
            "../x",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// A file added to the SDK or the contract must be embedded too, or the copies that
    /// `plugins new` writes stop building.
    #[test]
    fn embeds_every_sdk_source_and_contract_file() {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
        for (dir, embedded, ext) in [
            ("src", SDK, "rs"),
            ("wit/since_v0.1.0", WIT_V1, "wit"),
            ("wit/since_v0.2.0", WIT_V2, "wit"),
        ] {
            for entry in std::fs::read_dir(sdk.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == ext) {
                    let name = path.file_name().unwrap().to_str().unwrap();
                    let rel = if ext == "rs" {
                        format!("src/{name}")
                    } else {
                        name.to_string()
                    };
                    assert!(
                        embedded.iter().any(|(p, _)| *p == rel),
                        "{} is not embedded in plugins new",
                        path.display()
                    );
                }
            }
        }
    }

    #[test]
    fn every_language_gets_a_build_script_and_the_contract() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js, Lang::C] {
            let tmp = tempfile::tempdir().unwrap();
            let project = create("my-metric", lang, tmp.path()).unwrap();
            assert!(project.dir.join("build.sh").is_file(), "{lang:?}");
            assert!(project.dir.join("README.md").is_file(), "{lang:?}");
            for (dir, _) in lang.wit_dirs() {
                let wit = project.dir.join(dir).join("worlds.wit");
                assert!(wit.is_file(), "{lang:?}");
            }
            for file in &project.files {
                let text = std::fs::read_to_string(file).unwrap();
                assert!(
                    !text.contains("{{"),
                    "{} keeps a placeholder",
                    file.display()
                );
            }
            assert!(
                create("my-metric", lang, tmp.path()).is_err(),
                "refuses a non-empty folder"
            );
        }
    }
}
