//! A checkpoint's files as transformers writes them (`config.json`, `model.safetensors` or the
//! shards `model.safetensors.index.json` lists, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`), found in a local folder or fetched by hub id through hf-hub.
//!
//! **Architecture Invariant:** this is the only module that looks into checkpoint folders or
//! talks to the hub; every error names the file it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The files of a checkpoint, found locally or fetched.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
    pub dir: PathBuf,
}

pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// The files of a checkpoint folder, checking that every shard the index names is there.
pub fn local_files(dir: &Path) -> Result<CheckpointFiles> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{} has no config.json", dir.display());
    }
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let shards = shards_of_index(&index)?;
        for (shard, tensor) in &shards {
            let p = dir.join(shard);
            if !p.is_file() {
                bail!(
                    "{} lists {shard} (holding {tensor}, among others) but the file is missing",
                    index.display()
                );
            }
        }
        shards.keys().map(|s| dir.join(s)).collect()
    } else {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    };
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        config,
        weights,
        tokenizer: opt("tokenizer.json"),
        tokenizer_config: opt("tokenizer_config.json"),
        generation_config: opt("generation_config.json"),
        dir: dir.to_path_buf(),
    })
}

/// Shard file → one tensor it holds (for error messages), from an index file.
fn shards_of_index(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("failed to read {}", index.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut shards = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: weight_map[{tensor}] is not a file name",
                index.display()
            )
        })?;
        shards
            .entry(file.to_string())
            .or_insert_with(|| tensor.clone());
    }
    if shards.is_empty() {
        bail!("{} lists no tensors", index.display());
    }
    Ok(shards)
}

/// Fetches one file of a hub repo by name, returning its local path.
pub type FetchFile = Box<dyn Fn(&str) -> Result<PathBuf>>;

/// Where and how to reach the hub: transformers' environment variables by default.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The hub cache root (`HF_HOME`, else `~/.cache/huggingface`); files live under `hub/`.
    pub home: PathBuf,
    /// `HF_ENDPOINT`.
    pub endpoint: Option<String>,
    /// `HF_HUB_OFFLINE`: only look in the cache.
    pub offline: bool,
}

impl Hub {
    pub fn from_env() -> Self {
        let offline = matches!(
            std::env::var("HF_HUB_OFFLINE").as_deref(),
            Ok("1" | "true" | "TRUE" | "True" | "yes" | "YES" | "ON" | "on")
        );
        Hub {
            home: hf_hub::Cache::from_env()
                .path()
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            offline,
        }
    }

    fn cache(&self) -> hf_hub::Cache {
        hf_hub::Cache::new(self.home.join("hub"))
    }

    /// A function fetching one file of repo `id` (from the cache only when offline).
    pub fn fetcher(&self, id: &str) -> Result<FetchFile> {
        let id = id.to_string();
        if self.offline {
            let repo = self.cache().model(id.clone());
            return Ok(Box::new(move |f: &str| {
                repo.get(f).with_context(|| {
                    format!("{id}/{f} is not in the hub cache and HF_HUB_OFFLINE is set")
                })
            }));
        }
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(self.cache()).with_progress(false);
        if let Some(e) = &self.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        let repo = builder
            .build()
            .context("failed to set up the hub client")?
            .model(id.clone());
        Ok(Box::new(move |f: &str| {
            repo.get(f).with_context(|| {
                format!("failed to fetch {id}/{f} from the hub (is it reachable? HF_ENDPOINT sets another; HF_HUB_OFFLINE=1 uses the cache only)")
            })
        }))
    }
}

/// Fetches (or, offline, only looks up in the cache) a checkpoint by hub id.
pub fn hub_files(id: &str, hub: &Hub) -> Result<CheckpointFiles> {
    let get = hub.fetcher(id)?;
    let config = get("config.json")?;
    let weights = match get("model.safetensors") {
        Ok(p) => vec![p],
        Err(single_err) => {
            let index = get("model.safetensors.index.json")
                .map_err(|_| single_err)
                .with_context(|| {
                    format!("{id} has neither model.safetensors nor model.safetensors.index.json")
                })?;
            shards_of_index(&index)?
                .keys()
                .map(|s| get(s))
                .collect::<Result<Vec<_>>>()?
        }
    };
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(CheckpointFiles {
        config,
        weights,
        tokenizer: get("tokenizer.json").ok(),
        tokenizer_config: get("tokenizer_config.json").ok(),
        generation_config: get("generation_config.json").ok(),
        dir,
    })
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// Starts reading the weight files into the page cache in the background, so a load finds them
/// there instead of faulting them in as it copies each tensor (a 7B checkpoint is 14 GB; from
/// a cold cache the loader's own page faults read it a readahead window at a time, one tensor
/// after another). `madvise(WILLNEED)` on a mapping of each file hands the whole file to the
/// kernel's readahead at once and costs next to nothing when the files are cached already.
/// Skipped when the files would take more than half the memory available (reading ahead would
/// then evict what the load has not used yet) and off Linux, where `/proc/meminfo` is absent.
/// An I/O hint only: failures are logged and change nothing but speed.
#[cfg(target_os = "linux")]
pub fn prefetch_weights(paths: &[PathBuf]) {
    let total: u64 = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let Some(available) = mem_available_bytes() else {
        return;
    };
    if total > available / 2 {
        tracing::debug!(total, available, "weights too large to prefetch");
        return;
    }
    let paths = paths.to_vec();
    std::thread::spawn(move || {
        for p in paths {
            let advised = std::fs::File::open(&p).and_then(|f| {
                // SAFETY: a read-only mapping used only for the advice, never read through.
                let map = unsafe { memmap2::Mmap::map(&f) }?;
                map.advise(memmap2::Advice::WillNeed)
            });
            if let Err(e) = advised {
                tracing::debug!(path = %p.display(), "prefetch: {e}");
            }
        }
    });
}

/// Elsewhere the loader reads as the files are mapped (see the Linux version).
#[cfg(not(target_os = "linux"))]
pub fn prefetch_weights(_paths: &[PathBuf]) {}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
#[cfg(target_os = "linux")]
fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses files that are not safetensors before mmap-ing them, with the file's name.
pub fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{} is too short to be safetensors", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata()?.len();
    if n == 0 || n > size.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{} is not a safetensors file (header length {n}, file size {size})",
            path.display()
        );
    }
    Ok(())
}
