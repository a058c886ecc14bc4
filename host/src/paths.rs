//! Where adapterlab keeps its data: one data directory holding the store, installed
//! plugins, the compiled-component cache and downloaded assets.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// `explicit` (from `--data-dir` or `ADAPTERLAB_DATA_DIR`), else the platform's data dir
    /// (e.g. `~/.local/share/adapterlab`).
    pub fn resolve(explicit: Option<&Path>) -> Result<Self> {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => directories::ProjectDirs::from("", "", "adapterlab")
                .context("cannot determine the platform's data directory; pass --data-dir")?
                .data_dir()
                .to_path_buf(),
        };
        std::fs::create_dir_all(&root)
            .with_context(|| format!("failed to create data directory {}", root.display()))?;
        Ok(DataDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled database.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    /// User-installed plugin components (`*.wasm`).
    pub fn plugins(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// Precompiled components, keyed by wasm hash and engine version.
    pub fn component_cache(&self) -> PathBuf {
        self.root.join("cache").join("components")
    }

    /// Models and encoders fetched from the hub or from PyPI-packaged copies.
    pub fn assets(&self) -> PathBuf {
        self.root.join("assets")
    }

    /// Trained adapters and run outputs.
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }
}
