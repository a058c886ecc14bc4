//! PEFT adapter folders: `adapter_config.json` plus `adapter_model.safetensors`, read from and
//! written for HF PEFT.
//!
//! Tensor names are `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), without the adapter name, and the safetensors metadata is
//! `{"format": "pt"}`, as `PeftModel.save_pretrained` writes them.
//!
//! **Architecture Invariant:** this is the only module that knows PEFT's file names and JSON.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::io::tensors::{TensorIoError, TensorMap};
use crate::lora::{AdapterWeights, LoraConfig, LoraRegistry, TargetModules};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What can go wrong with an adapter folder; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("failed to read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("failed to write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: tensor {name}: {reason}", path.display())]
    BadTensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(transparent)]
    Io(#[from] TensorIoError),
    #[error("{}: {source}", path.display())]
    Lora {
        path: PathBuf,
        source: crate::lora::LoraError,
    },
}

/// `target_modules` as PEFT writes it: a list of names, a regex string, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModulesJson {
    List(Vec<String>),
    One(String),
}

impl ModulesJson {
    fn to_targets(&self) -> TargetModules {
        match self {
            ModulesJson::List(v) => TargetModules::Names(v.clone()),
            ModulesJson::One(s) if s == "all-linear" => TargetModules::AllLinear,
            ModulesJson::One(s) => TargetModules::Regex(s.clone()),
        }
    }

    fn from_targets(t: &TargetModules) -> Self {
        match t {
            TargetModules::Names(v) => {
                let mut v = v.clone();
                v.sort();
                ModulesJson::List(v)
            }
            TargetModules::Regex(s) => ModulesJson::One(s.clone()),
            TargetModules::AllLinear => ModulesJson::One("all-linear".into()),
        }
    }
}

/// An int or a list of ints (PEFT's `layers_to_transform`), or the same for strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `adapter_config.json` of a LoRA adapter. Fields we do not use are kept in `extra` so a
/// config read and written again loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: serde_json::Number,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<ModulesJson>,
    #[serde(default)]
    pub exclude_modules: Option<ModulesJson>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn bias_none() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// How an adapter is described when saved.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The base model's hub id or path (`base_model_name_or_path`).
    pub base_model_name_or_path: Option<String>,
    /// `CAUSAL_LM` for the decoder models here.
    pub task_type: String,
    pub inference_mode: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            base_model_name_or_path: None,
            task_type: "CAUSAL_LM".into(),
            inference_mode: true,
        }
    }
}

impl AdapterConfig {
    /// The config PEFT's `LoraConfig(...).save_pretrained` writes for `lora`.
    pub fn from_lora(lora: &LoraConfig, opts: &SaveOptions) -> Self {
        let alpha = if lora.lora_alpha.fract() == 0.0 && lora.lora_alpha.abs() < 1e15 {
            serde_json::Number::from(lora.lora_alpha as i64)
        } else {
            serde_json::Number::from_f64(lora.lora_alpha)
                .unwrap_or_else(|| serde_json::Number::from(0))
        };
        // The other fields PEFT 0.21.2 writes, with its defaults, so the file has PEFT's full
        // shape. `peft_version` is left out: it would claim a PEFT version that did not write it.
        let mut extra = serde_json::Map::new();
        for (k, v) in [
            ("alora_invocation_tokens", serde_json::Value::Null),
            ("arrow_config", serde_json::Value::Null),
            ("auto_mapping", serde_json::Value::Null),
            ("corda_config", serde_json::Value::Null),
            ("ensure_weight_tying", serde_json::json!(false)),
            ("eva_config", serde_json::Value::Null),
            ("kasa_config", serde_json::Value::Null),
            ("layer_replication", serde_json::Value::Null),
            ("loftq_config", serde_json::json!({})),
            ("lora_ga_config", serde_json::Value::Null),
            ("megatron_config", serde_json::Value::Null),
            ("megatron_core", serde_json::json!("megatron.core")),
            ("monteclora_config", serde_json::Value::Null),
            ("qalora_group_size", serde_json::json!(16)),
            ("target_parameters", serde_json::Value::Null),
            ("trainable_token_indices", serde_json::Value::Null),
            ("use_bdlora", serde_json::Value::Null),
            ("use_qalora", serde_json::json!(false)),
            ("velora_config", serde_json::Value::Null),
        ] {
            extra.insert(k.to_string(), v);
        }
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: Some(opts.task_type.clone()),
            r: lora.r,
            lora_alpha: alpha,
            lora_dropout: f64::from(lora.lora_dropout),
            target_modules: Some(ModulesJson::from_targets(&lora.target_modules)),
            exclude_modules: lora.exclude_modules.as_ref().map(ModulesJson::from_targets),
            use_rslora: lora.use_rslora,
            bias: "none".into(),
            fan_in_fan_out: false,
            base_model_name_or_path: opts.base_model_name_or_path.clone(),
            revision: None,
            inference_mode: opts.inference_mode,
            modules_to_save: None,
            rank_pattern: lora.rank_pattern.clone(),
            alpha_pattern: lora.alpha_pattern.clone(),
            layers_to_transform: lora.layers_to_transform.clone().map(OneOrMany::Many),
            layers_pattern: lora.layers_pattern.clone().map(OneOrMany::Many),
            use_dora: false,
            lora_bias: false,
            init_lora_weights: serde_json::Value::Bool(true),
            extra,
        }
    }

    /// The computation this config describes, refusing what we do not implement.
    pub fn to_lora(&self, path: &Path) -> Result<LoraConfig, PeftError> {
        let unsupported = |reason: String| PeftError::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        if self.peft_type != "LORA" {
            return Err(unsupported(format!(
                "peft_type {:?} (only LORA)",
                self.peft_type
            )));
        }
        if self.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out: true (Conv1D models)".into()));
        }
        if self.use_dora {
            return Err(unsupported("use_dora: true".into()));
        }
        if self.bias != "none" || self.lora_bias {
            return Err(unsupported(format!(
                "trained biases (bias {:?}, lora_bias {})",
                self.bias, self.lora_bias
            )));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported(format!(
                "modules_to_save {:?}",
                self.modules_to_save
            )));
        }
        let target_modules = self
            .target_modules
            .as_ref()
            .map(ModulesJson::to_targets)
            .ok_or_else(|| unsupported("no target_modules".into()))?;
        let lora = LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha.as_f64().unwrap_or(0.0),
            lora_dropout: self.lora_dropout as f32,
            target_modules,
            exclude_modules: self.exclude_modules.as_ref().map(ModulesJson::to_targets),
            use_rslora: self.use_rslora,
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            layers_to_transform: self.layers_to_transform.as_ref().map(OneOrMany::to_vec),
            layers_pattern: self.layers_pattern.as_ref().map(OneOrMany::to_vec),
            ..Default::default()
        };
        lora.validate().map_err(|source| PeftError::Lora {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(lora)
    }
}

/// A LoRA adapter read from a PEFT folder.
#[derive(Debug)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub lora: LoraConfig,
    pub weights: AdapterWeights,
}

impl PeftAdapter {
    /// A registry that places this adapter's weights on the layers as the model is built.
    pub fn into_registry(self) -> Result<Arc<LoraRegistry>, PeftError> {
        let path = self.dir.join(CONFIG_FILE);
        LoraRegistry::from_adapter(self.lora, self.weights)
            .map(Arc::new)
            .map_err(|source| PeftError::Lora { path, source })
    }

    /// `(A, B, scaling)` for each module, for merging into a checkpoint.
    pub fn modules(&self) -> Result<Vec<(String, Tensor, Tensor, f64)>, PeftError> {
        let file = self.dir.join(WEIGHTS_FILE);
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.weights.pairs.keys().collect();
        names.sort();
        for module in names {
            let (a, b) = &self.weights.pairs[module];
            let (na, nb) = crate::lora::peft_names(module);
            let missing = |name: String| PeftError::BadTensor {
                path: file.clone(),
                name,
                reason: "missing (its pair is there)".into(),
            };
            let a = a.clone().ok_or_else(|| missing(na.clone()))?;
            let b = b.clone().ok_or_else(|| missing(nb.clone()))?;
            let (r_a, r_b) = (a.dims()[0], b.dims().get(1).copied().unwrap_or(0));
            if r_a != r_b {
                return Err(PeftError::BadTensor {
                    path: file.clone(),
                    name: nb,
                    reason: format!("rank {r_b} but lora_A has rank {r_a}"),
                });
            }
            let (r, alpha) = self
                .lora
                .for_module(module)
                .unwrap_or((r_a, self.lora.lora_alpha));
            if r != r_a {
                return Err(PeftError::BadTensor {
                    path: file.clone(),
                    name: na,
                    reason: format!("rank {r_a} but the config says {r}"),
                });
            }
            out.push((module.clone(), a, b, self.lora.scaling(r, alpha)));
        }
        Ok(out)
    }
}

/// Read an adapter folder written by PEFT (or by [`save_adapter`]). Tensors stay on the CPU
/// until layers take them.
pub fn load_adapter(dir: &Path) -> Result<PeftAdapter, PeftError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| PeftError::Read {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| PeftError::Read {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let lora = config.to_lora(&cfg_path)?;
    let file = dir.join(WEIGHTS_FILE);
    if !file.is_file() {
        let reason = if dir.join("adapter_model.bin").is_file() {
            "missing; only adapter_model.bin (pickle) is there, which is not supported: re-save with safe_serialization=True".to_string()
        } else {
            "missing".to_string()
        };
        return Err(PeftError::Read { path: file, reason });
    }
    let map = TensorMap::read_file(&file)?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, t) in map.iter() {
        let (module, is_a) = parse_lora_name(name).ok_or_else(|| PeftError::BadTensor {
            path: file.clone(),
            name: name.clone(),
            reason: "not a LoRA matrix of a linear layer (embedding LoRA, DoRA, modules_to_save are not supported)".into(),
        })?;
        if t.rank() != 2 || !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(PeftError::BadTensor {
                path: file.clone(),
                name: name.clone(),
                reason: format!(
                    "expected a 2-D float matrix, found {:?} {:?}",
                    t.dims(),
                    t.dtype()
                ),
            });
        }
        let slot = pairs.entry(module).or_default();
        if is_a {
            slot.0 = Some(t.clone())
        } else {
            slot.1 = Some(t.clone())
        }
    }
    Ok(PeftAdapter {
        dir: dir.to_path_buf(),
        config,
        lora,
        weights: AdapterWeights {
            origin: file.display().to_string(),
            pairs,
        },
    })
}

/// `base_model.model.<module>.lora_A.weight` -> (`<module>`, true). Also accepts a name with the
/// adapter name left in (`lora_A.default.weight`), which some hand-written saves have.
fn parse_lora_name(name: &str) -> Option<(String, bool)> {
    let rest = name
        .strip_prefix("base_model.model.")?
        .strip_suffix(".weight")?;
    for (tag, is_a) in [(".lora_A", true), (".lora_B", false)] {
        if let Some(m) = rest.strip_suffix(tag) {
            return Some((m.to_string(), is_a));
        }
        if let Some(pos) = rest.rfind(&format!("{tag}.")) {
            let adapter = &rest[pos + tag.len() + 1..];
            if !adapter.is_empty() && !adapter.contains('.') {
                return Some((rest[..pos].to_string(), is_a));
            }
        }
    }
    None
}

/// Write `adapter_config.json` and `adapter_model.safetensors` for the registry's adapters,
/// as PEFT's `save_pretrained` does. Returns the two paths.
pub fn save_adapter(
    dir: &Path,
    registry: &LoraRegistry,
    opts: &SaveOptions,
) -> Result<(PathBuf, PathBuf), PeftError> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let config = AdapterConfig::from_lora(registry.config(), opts);
    let cfg_path = dir.join(CONFIG_FILE);
    // Through a Value: its map is sorted, like PEFT's json.dumps(..., indent=2, sort_keys=True).
    let text = serde_json::to_value(&config)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .map_err(|e| PeftError::Write {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| PeftError::Write {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let file = dir.join(WEIGHTS_FILE);
    let tensors: Vec<(String, Tensor)> = registry
        .tensors()
        .into_iter()
        .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()
        .map_err(|e| PeftError::Write {
            path: file.clone(),
            reason: e.to_string(),
        })?;
    TensorMap::from_tensors(file.display().to_string(), tensors).write_file(&file)?;
    Ok((cfg_path, file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::linear::LinearBuilder;

    #[test]
    fn lora_names_parse() {
        assert_eq!(
            parse_lora_name(
                "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight"
            ),
            Some((
                "transformer.h.0.self_attention.query_key_value".into(),
                true
            ))
        );
        assert_eq!(
            parse_lora_name("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
            Some(("model.layers.1.mlp.down_proj".into(), false))
        );
        assert_eq!(
            parse_lora_name("base_model.model.x.lora_A.default.weight"),
            Some(("x".into(), true))
        );
        assert_eq!(parse_lora_name("base_model.model.x.lora_embedding_A"), None);
        assert_eq!(
            parse_lora_name("base_model.model.x.lora_magnitude_vector"),
            None
        );
        assert_eq!(parse_lora_name("model.x.lora_A.weight"), None);
    }

    #[test]
    fn config_reads_peft_json_and_refuses_what_is_not_modelled() {
        let json = r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "tiiuae/falcon-7b",
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
            "layers_pattern": null, "layers_to_transform": null, "lora_alpha": 32, "lora_dropout": 0.05,
            "modules_to_save": null, "peft_type": "LORA", "r": 16, "rank_pattern": {}, "revision": null,
            "target_modules": ["query_key_value"], "task_type": "CAUSAL_LM", "something_new": [1, 2]}"#;
        let c: AdapterConfig = serde_json::from_str(json).unwrap();
        let l = c.to_lora(Path::new("a/adapter_config.json")).unwrap();
        assert_eq!((l.r, l.lora_alpha, l.lora_dropout), (16, 32.0, 0.05));
        assert_eq!(l.target_modules, TargetModules::names(["query_key_value"]));
        assert_eq!(
            c.extra.get("something_new"),
            Some(&serde_json::json!([1, 2]))
        );
        let back: AdapterConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let mut d = c.clone();
        d.use_dora = true;
        let e = d
            .to_lora(Path::new("a/adapter_config.json"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "a/adapter_config.json: use_dora: true");
        let all: AdapterConfig =
            serde_json::from_str(&json.replace(r#"["query_key_value"]"#, r#""all-linear""#))
                .unwrap();
        assert_eq!(
            all.to_lora(Path::new("x")).unwrap().target_modules,
            TargetModules::AllLinear
        );
    }

    #[test]
    fn save_then_load_roundtrip_through_a_model() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::ones((6, 4), DType::F32, &dev).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(
            HashMap::from([
                ("m.q.weight".to_string(), w.clone()),
                ("m.k.weight".to_string(), w.clone()),
            ]),
            DType::F32,
            &dev,
        );
        let cfg = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            lora_dropout: 0.1,
            target_modules: TargetModules::names(["q", "k"]),
            ..Default::default()
        };
        let b = LinearBuilder::dense().with_lora(cfg.clone()).unwrap();
        let q = b.load(vb.pp("m.q"), 4, 6, false).unwrap();
        b.load(vb.pp("m.k"), 4, 6, false).unwrap();
        q.lora
            .as_ref()
            .unwrap()
            .b
            .set(&Tensor::full(0.5f32, (6, 2), &dev).unwrap())
            .unwrap();
        let (cfg_path, file) = save_adapter(
            dir.path(),
            b.lora().unwrap(),
            &SaveOptions {
                base_model_name_or_path: Some("tiny".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let meta = crate::io::tensors::read_metadata(&file).unwrap().unwrap();
        assert_eq!(meta["format"], "pt");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["lora_alpha"], 4);
        assert_eq!(json["target_modules"], serde_json::json!(["k", "q"]));
        assert_eq!(json["task_type"], "CAUSAL_LM");
        let names: Vec<String> = TensorMap::read_file(&file)
            .unwrap()
            .names()
            .cloned()
            .collect();
        assert_eq!(
            names,
            [
                "base_model.model.m.k.lora_A.weight",
                "base_model.model.m.k.lora_B.weight",
                "base_model.model.m.q.lora_A.weight",
                "base_model.model.m.q.lora_B.weight"
            ]
        );

        let ad = load_adapter(dir.path()).unwrap();
        assert_eq!(ad.lora.r, 2);
        let b2 = LinearBuilder::dense().with_lora_registry(ad.into_registry().unwrap());
        let q2 = b2.load(vb.pp("m.q"), 4, 6, false).unwrap();
        b2.load(vb.pp("m.k"), 4, 6, false).unwrap();
        b2.lora().unwrap().finish().unwrap();
        let x = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
        use candle_core::Module;
        assert_eq!(
            q.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            q2.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn load_errors_name_files_and_tensors() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let e = load_adapter(dir.path()).unwrap_err().to_string();
        assert!(e.contains("adapter_config.json"), "{e}");
        let cfg = AdapterConfig::from_lora(
            &LoraConfig {
                r: 2,
                target_modules: TargetModules::names(["q"]),
                ..Default::default()
            },
            &SaveOptions::default(),
        );
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let e = load_adapter(dir.path()).unwrap_err().to_string();
        assert!(e.contains("adapter_model.safetensors: missing"), "{e}");
        let z = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let map = TensorMap::from_tensors(
            "x",
            [
                ("base_model.model.m.q.lora_A.weight".to_string(), z.clone()),
                ("base_model.model.m.q.lora_embedding_A".to_string(), z),
            ],
        );
        map.write_file(&dir.path().join(WEIGHTS_FILE)).unwrap();
        let e = load_adapter(dir.path()).unwrap_err().to_string();
        assert!(e.contains("adapter_model.safetensors: tensor base_model.model.m.q.lora_embedding_A: not a LoRA matrix"), "{e}");
    }
}
