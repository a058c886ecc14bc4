//! Named tensor maps and their safetensors files, the way HF writes them: one
//! `model.safetensors`, or shards `model-00001-of-0000N.safetensors` with a
//! `model.safetensors.index.json`, and the metadata `{"format": "pt"}` that transformers and PEFT
//! expect. Merging and quantizing work on these maps by HF tensor name, so they need not know
//! the architecture.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// What can go wrong reading or writing tensor files.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("failed to write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{}: {reason}", path.display())]
    BadIndex { path: PathBuf, reason: String },
    #[error("no model.safetensors or model.safetensors.index.json in {}", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{origin}: tensor {name} is missing")]
    Missing { origin: String, name: String },
}

/// Tensors by name, remembering where they came from so errors can say which file.
#[derive(Debug, Clone, Default)]
pub struct TensorMap {
    origin: String,
    tensors: BTreeMap<String, Tensor>,
}

impl TensorMap {
    pub fn new(origin: impl Into<String>) -> Self {
        TensorMap {
            origin: origin.into(),
            tensors: BTreeMap::new(),
        }
    }

    pub fn from_tensors(
        origin: impl Into<String>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Self {
        TensorMap {
            origin: origin.into(),
            tensors: tensors.into_iter().collect(),
        }
    }

    /// Read every tensor of one safetensors file onto the CPU.
    pub fn read_file(path: &Path) -> Result<Self, TensorIoError> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| {
            TensorIoError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(TensorMap {
            origin: path.display().to_string(),
            tensors: tensors.into_iter().collect(),
        })
    }

    /// The weight files of an HF model folder, in order: the single file or the shards named
    /// by the index.
    pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>, TensorIoError> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.is_file() {
            return Err(TensorIoError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|e| TensorIoError::Read {
            path: index.clone(),
            source: candle_core::Error::wrap(e),
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TensorIoError::BadIndex {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| TensorIoError::BadIndex {
                path: index.clone(),
                reason: "no weight_map object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        Ok(files.into_iter().map(|f| dir.join(f)).collect())
    }

    /// Read all weights of an HF model folder (single file or shards) into one map.
    pub fn read_model_dir(dir: &Path) -> Result<Self, TensorIoError> {
        let mut all = TensorMap::new(dir.display().to_string());
        for file in Self::model_files(dir)? {
            all.tensors.extend(Self::read_file(&file)?.tensors);
        }
        Ok(all)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }
    /// The tensor, or an error naming the file and the tensor.
    pub fn require(&self, name: &str) -> Result<&Tensor, TensorIoError> {
        self.tensors
            .get(name)
            .ok_or_else(|| TensorIoError::Missing {
                origin: self.origin.clone(),
                name: name.to_string(),
            })
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn into_inner(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    /// Write one safetensors file with the metadata `{"format": "pt"}`.
    pub fn write_file(&self, path: &Path) -> Result<(), TensorIoError> {
        write_safetensors(self.tensors.iter().map(|(k, v)| (k.as_str(), v)), path)
    }

    /// Write an HF model's weights into `dir`: one `model.safetensors`, or, when
    /// `max_shard_bytes` is given and the tensors exceed it, shards plus the index file.
    /// Returns the files written.
    pub fn write_model_dir(
        &self,
        dir: &Path,
        max_shard_bytes: Option<u64>,
    ) -> Result<Vec<PathBuf>, TensorIoError> {
        std::fs::create_dir_all(dir).map_err(|e| TensorIoError::Write {
            path: dir.to_path_buf(),
            source: Box::new(e),
        })?;
        let sizes: Vec<(&String, u64)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k, (t.elem_count() * t.dtype().size_in_bytes()) as u64))
            .collect();
        let total: u64 = sizes.iter().map(|(_, s)| s).sum();
        let limit = max_shard_bytes.unwrap_or(u64::MAX);
        if total <= limit {
            let path = dir.join("model.safetensors");
            self.write_file(&path)?;
            return Ok(vec![path]);
        }
        // Greedy in name order, as HF does in its own order: a tensor larger than the limit gets a
        // shard of its own.
        let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
        let mut current = 0u64;
        for (name, size) in sizes {
            if current + size > limit && !shards.last().is_some_and(Vec::is_empty) {
                shards.push(Vec::new());
                current = 0;
            }
            shards.last_mut().expect("one shard at least").push(name);
            current += size;
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut files = Vec::new();
        for (i, names) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            let path = dir.join(&file);
            write_safetensors(names.iter().map(|k| (k.as_str(), &self.tensors[*k])), &path)?;
            for k in names {
                weight_map.insert((*k).clone(), serde_json::Value::String(file.clone()));
            }
            files.push(path);
        }
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).expect("json of strings and numbers");
        std::fs::write(&path, text + "\n").map_err(|e| TensorIoError::Write {
            path: path.clone(),
            source: Box::new(e),
        })?;
        files.push(path);
        Ok(files)
    }
}

/// Rewrite an HF model folder's weights file by file: `f` gets each weight file's tensors and
/// returns what to write in its place. A single file stays a single file (or is sharded when
/// `max_shard_bytes` asks for it); shards keep their names and a new index is written. Other
/// files (tokenizer, generation config...) are copied; `config.json` is left to the caller.
/// Only one input file is in memory at a time.
pub fn transform_model_dir<E: From<TensorIoError>>(
    src: &Path,
    dst: &Path,
    max_shard_bytes: Option<u64>,
    mut f: impl FnMut(TensorMap) -> Result<TensorMap, E>,
) -> Result<Vec<PathBuf>, E> {
    let files = TensorMap::model_files(src)?;
    std::fs::create_dir_all(dst).map_err(|e| TensorIoError::Write {
        path: dst.to_path_buf(),
        source: Box::new(e),
    })?;
    copy_side_files(src, dst)?;
    if files.len() == 1 {
        let out = f(TensorMap::read_file(&files[0])?)?;
        return Ok(out.write_model_dir(dst, max_shard_bytes)?);
    }
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut written = Vec::new();
    for file in &files {
        let out = f(TensorMap::read_file(file)?)?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dst.join(&name);
        out.write_file(&path)?;
        for (k, t) in out.iter() {
            total += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            weight_map.insert(k.clone(), serde_json::Value::String(name.clone()));
        }
        written.push(path);
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dst.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("json of strings and numbers");
    std::fs::write(&path, text + "\n").map_err(|e| TensorIoError::Write {
        path: path.clone(),
        source: Box::new(e),
    })?;
    written.push(path);
    Ok(written)
}

/// Copy the files of a model folder that are not weights, not the weight index and not
/// `config.json`.
fn copy_side_files(src: &Path, dst: &Path) -> Result<(), TensorIoError> {
    let entries = std::fs::read_dir(src).map_err(|e| TensorIoError::Read {
        path: src.to_path_buf(),
        source: candle_core::Error::wrap(e),
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".index.json")
            || name.ends_with(".pt");
        if !path.is_file() || is_weights || name == "config.json" {
            continue;
        }
        std::fs::copy(&path, dst.join(&name)).map_err(|e| TensorIoError::Write {
            path: dst.join(&name),
            source: Box::new(e),
        })?;
    }
    Ok(())
}

/// Read a model folder's `config.json` as JSON.
pub fn read_config(dir: &Path) -> Result<serde_json::Value, TensorIoError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TensorIoError::Read {
        path: path.clone(),
        source: candle_core::Error::wrap(e),
    })?;
    serde_json::from_str(&text).map_err(|e| TensorIoError::BadIndex {
        path,
        reason: e.to_string(),
    })
}

/// Write `config.json` (pretty, sorted keys as transformers writes it).
pub fn write_config(dir: &Path, config: &serde_json::Value) -> Result<PathBuf, TensorIoError> {
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).expect("a JSON value serializes");
    std::fs::write(&path, text + "\n").map_err(|e| TensorIoError::Write {
        path: path.clone(),
        source: Box::new(e),
    })?;
    Ok(path)
}

/// Write named tensors to one safetensors file with HF's metadata `{"format": "pt"}`.
pub fn write_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    path: &Path,
) -> Result<(), TensorIoError> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // Tensors must be contiguous on the CPU for their bytes to be written.
    let mut owned = Vec::new();
    for (name, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .map_err(|e| TensorIoError::Write {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?;
        owned.push((name, t));
    }
    safetensors::tensor::serialize_to_file(owned.iter().map(|(k, v)| (*k, v)), Some(metadata), path)
        .map_err(|e| TensorIoError::Write {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
}

/// The metadata of a safetensors file (e.g. to check `{"format": "pt"}`).
pub fn read_metadata(path: &Path) -> Result<Option<HashMap<String, String>>, TensorIoError> {
    let bytes = std::fs::read(path).map_err(|e| TensorIoError::Read {
        path: path.to_path_buf(),
        source: candle_core::Error::wrap(e),
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| TensorIoError::Read {
            path: path.to_path_buf(),
            source: candle_core::Error::wrap(e),
        })?;
    Ok(meta.metadata().clone())
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    #[test]
    fn single_file_roundtrip_keeps_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = TensorMap::new("test");
        m.insert(
            "a.weight",
            Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        );
        m.insert("b", Tensor::new(&[1u8, 2, 3], &Device::Cpu).unwrap());
        let files = m.write_model_dir(dir.path(), None).unwrap();
        assert_eq!(files, vec![dir.path().join("model.safetensors")]);
        let meta = read_metadata(&files[0]).unwrap().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        let back = TensorMap::read_model_dir(dir.path()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.require("b").unwrap().dtype(), DType::U8);
        let e = back.require("c").unwrap_err().to_string();
        assert!(
            e.contains("tensor c is missing") && e.contains(dir.path().to_str().unwrap()),
            "{e}"
        );
    }

    #[test]
    fn sharded_write_has_index_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = TensorMap::new("test");
        for i in 0..5 {
            m.insert(
                format!("t{i}"),
                Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap(),
            );
        }
        let files = m.write_model_dir(dir.path(), Some(900)).unwrap();
        assert_eq!(files.len(), 4, "{files:?}"); // 3 shards of <=2 tensors + index
        assert!(
            dir.path()
                .join("model-00001-of-00003.safetensors")
                .is_file()
        );
        let back = TensorMap::read_model_dir(dir.path()).unwrap();
        assert_eq!(back.len(), 5);
    }
}
