//! LoRA adapters on any [`Linear`](crate::nn::linear::Linear), as PEFT's `LoraLayer`/`Linear` define
//! them: `y = base(x) + dropout(x) @ A^T @ B^T * scaling`, with `A` `[r, in]` initialised like
//! `kaiming_uniform_(a=sqrt(5))` (uniform in ±1/sqrt(in)), `B` `[out, r]` zeros, and
//! `scaling = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`).
//!
//! `A` and `B` are candle [`Var`]s held in a [`VarMap`] under PEFT's tensor names
//! (`base_model.model.<module>.lora_A.weight`), so a trainer optimises the map and
//! [`crate::lora::peft`] saves it as is. Layers are chosen by their module path as PEFT matches
//! `target_modules`.
//!
//! **Architecture Invariant:** the base weight is never changed by an adapter: merging keeps a
//! separate merged copy, so unmerging is exact.

#[cfg(feature = "cuda")]
pub mod kernels;
pub mod merge;
pub mod peft;
pub mod train_node;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use crate::quant::weight::BaseWeight;

/// Which modules get an adapter, as PEFT's `target_modules` (and `exclude_modules`) say it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// A module matches a name if its path equals it or ends with `.name`.
    Names(Vec<String>),
    /// A regular expression the whole module path must match.
    Regex(String),
    /// PEFT's `"all-linear"`: every linear layer but the output layer (`lm_head`).
    AllLinear,
}

impl TargetModules {
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        TargetModules::Names(names.into_iter().map(Into::into).collect())
    }

    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::Names(names) => names.iter().any(|t| suffix_match(module, t)),
            TargetModules::Regex(re) => full_match(re, module),
            TargetModules::AllLinear => !suffix_match(module, "lm_head"),
        }
    }

    /// Every entry that matches none of `modules` (a regex is one entry): a typo in
    /// `target_modules` must be an error, never an adapter quietly missing a layer.
    pub fn unmatched(&self, modules: &[&str]) -> Vec<String> {
        match self {
            TargetModules::Names(names) => names
                .iter()
                .filter(|t| !modules.iter().any(|m| suffix_match(m, t)))
                .cloned()
                .collect(),
            TargetModules::Regex(re) if !modules.iter().any(|m| full_match(re, m)) => {
                vec![re.clone()]
            }
            TargetModules::AllLinear if !modules.iter().any(|m| self.matches(m)) => {
                vec!["all-linear".into()]
            }
            _ => Vec::new(),
        }
    }

    /// [`Self::unmatched`] as an error naming what the model does have.
    pub fn check_against(&self, modules: &[&str]) -> std::result::Result<(), LoraError> {
        let targets = self.unmatched(modules);
        if targets.is_empty() {
            return Ok(());
        }
        let mut kinds: Vec<&str> = modules
            .iter()
            .map(|m| m.rsplit('.').next().unwrap_or(m))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        Err(LoraError::UnmatchedTargets {
            targets,
            available: kinds.join(", "),
        })
    }
}

fn suffix_match(module: &str, target: &str) -> bool {
    module == target
        || module
            .strip_suffix(target)
            .is_some_and(|rest| rest.ends_with('.'))
}

fn full_match(re: &str, text: &str) -> bool {
    // An invalid pattern matches nothing; LoraConfig::validate reports it before use.
    regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(text))
}

/// PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key `k` for which the module path
/// matches `(.*\.)?(k)$`.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$"))
            .ok()
            .filter(|r| r.is_match(module))
            .map(|_| *v)
    })
}

/// The LoRA hyper-parameters (PEFT's `LoraConfig`, the parts that shape the computation).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    /// Applied to the adapter's input in training only.
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    pub exclude_modules: Option<TargetModules>,
    /// Scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Per-module rank, keyed by a pattern matched as PEFT does.
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only these layer indices (the number after `layers_pattern` in the path) get adapters.
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    /// dtype of A and B; PEFT keeps adapters in f32 under a 16-bit base.
    pub dtype: DType,
    /// Seed of A's initialisation (each layer mixes in its name).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(Vec::new()),
            exclude_modules: None,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            layers_pattern: None,
            dtype: DType::F32,
            seed: 0,
        }
    }
}

/// What can be wrong with a LoRA set-up.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA rank must be at least 1 (module {module})")]
    ZeroRank { module: String },
    #[error("lora_dropout must be in [0, 1), got {0}")]
    BadDropout(f32),
    #[error("invalid module pattern {pattern:?}: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("{at}: shape {found:?}, but layer {module} needs {expected:?}")]
    Shape {
        at: String,
        module: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{at}: missing (layer {module} has the other LoRA matrix)")]
    MissingHalf { at: String, module: String },
    #[error("{origin}: adapter tensors for modules the model does not have: {modules:?}")]
    Unused {
        origin: String,
        modules: Vec<String>,
    },
    #[error(
        "target_modules {targets:?} match no linear layer of the model (its linear layers are named: {available})"
    )]
    UnmatchedTargets {
        targets: Vec<String>,
        available: String,
    },
}

impl LoraConfig {
    pub fn validate(&self) -> std::result::Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::ZeroRank {
                module: "(default r)".into(),
            });
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LoraError::BadDropout(self.lora_dropout));
        }
        let mut patterns: Vec<String> = self
            .rank_pattern
            .keys()
            .chain(self.alpha_pattern.keys())
            .cloned()
            .collect();
        for t in [Some(&self.target_modules), self.exclude_modules.as_ref()]
            .into_iter()
            .flatten()
        {
            if let TargetModules::Regex(re) = t {
                patterns.push(re.clone());
            }
        }
        for p in patterns {
            regex::Regex::new(&p).map_err(|e| LoraError::BadPattern {
                pattern: p.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// `(r, alpha)` for the module, or `None` when it gets no adapter.
    pub fn for_module(&self, module: &str) -> Option<(usize, f64)> {
        if !self.target_modules.matches(module)
            || self
                .exclude_modules
                .as_ref()
                .is_some_and(|e| e.matches(module))
        {
            return None;
        }
        if let Some(layers) = &self.layers_to_transform {
            let idx = layer_index(module, self.layers_pattern.as_deref())?;
            if !layers.contains(&idx) {
                return None;
            }
        }
        let r = pattern_value(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        Some((r, alpha))
    }

    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// The layer number in a module path, found after one of the layer-list names (PEFT's
/// `layers_pattern`, by default the usual ones: `layers`, `h`, `blocks`, `layer`).
fn layer_index(module: &str, patterns: Option<&[String]>) -> Option<usize> {
    let defaults = ["layers", "h", "blocks", "layer"].map(String::from);
    let patterns = patterns.unwrap_or(&defaults);
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).find_map(|w| {
        if patterns.iter().any(|p| p == w[0]) {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// PEFT's tensor names for a module's adapter (saved without the adapter name).
pub fn peft_names(module: &str) -> (String, String) {
    (
        format!("base_model.model.{module}.lora_A.weight"),
        format!("base_model.model.{module}.lora_B.weight"),
    )
}

/// One layer's adapter.
#[derive(Debug)]
pub struct LoraLayer {
    pub module: String,
    pub a: Var,
    pub b: Var,
    pub r: usize,
    pub alpha: f64,
    pub scaling: f64,
    pub dropout: f32,
    training: Arc<AtomicBool>,
    /// When set, dropout masks come from a seeded generator keyed by this value (see
    /// [`LoraRegistry::set_dropout_key`]) instead of candle's unseeded one.
    dropout_key: Arc<DropoutKey>,
    merged: RwLock<Option<Tensor>>,
    /// The frozen weight under this adapter, so a whole model can be merged through its
    /// registry ([`LoraRegistry::merge_all`]).
    base: std::sync::OnceLock<Arc<dyn BaseWeight>>,
}

/// The key of seeded dropout: `(seed, call)` shared by every layer of a registry; `None` until
/// a trainer sets it.
#[derive(Debug, Default)]
pub struct DropoutKey(Mutex<Option<(u64, u64)>>);

impl DropoutKey {
    fn get(&self) -> Option<(u64, u64)> {
        *self.0.lock().expect("dropout key")
    }
}

impl LoraLayer {
    /// `dropout(x) @ A^T @ B^T * scaling`, computed and returned in the adapter's dtype (PEFT
    /// casts the input to it too).
    pub fn delta_y(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Training under a 16-bit compute dtype runs the adapter in that dtype, as
        // torch.autocast does in the reference (PEFT + bitsandbytes) trainer; the f32 weights
        // stay the optimizer's. Otherwise PEFT's inference math: the adapter's own dtype.
        // Inference on untracked inputs, and a checkpointed layer's first pass, want no graph:
        // the weights are read detached, so the model's tensors do not start tracking ops here
        // (and the NF4 base keeps its graph-free kernels).
        let (a, b) = if (!train && !x.track_op()) || crate::ops::handover::no_grad() {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        } else {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        };
        let work = if train && matches!(x.dtype(), DType::BF16 | DType::F16) {
            x.dtype()
        } else {
            a.dtype()
        };
        let a = a.to_dtype(work)?;
        let b = b.to_dtype(work)?;
        let xa = x.to_dtype(work)?;
        let dims = xa.dims().to_vec();
        let (lead, k) = dims.split_at(dims.len() - 1);
        let m: usize = lead.iter().product();
        let xa = xa.reshape((m, k[0]))?;
        let xa = if train && self.dropout > 0.0 {
            match self.seeded_key() {
                Some(key) => crate::ops::profile::scope("lora.dropout", xa.device(), || {
                    crate::ops::dropout::seeded_dropout(&xa, key, self.dropout)
                })?,
                None => candle_nn::ops::dropout(&xa, self.dropout)?,
            }
        } else {
            xa
        };
        let ha = xa.matmul(&a.t()?)?;
        // The scaling goes into B ([out, r]), not over the [m, out] product.
        let h = ha.matmul(&(&b * self.scaling)?.t()?)?;
        let mut out_shape = lead.to_vec();
        out_shape.push(b.dims()[0]);
        h.reshape(out_shape)
    }

    /// What [`train_node::lora_linear`] takes for a training forward on an input of `dtype`:
    /// the adapter's weights and scaling (the node computes in `dtype` with copies of them, as
    /// [`LoraLayer::delta_y`] does) and the seeded dropout; `None` where only the op-by-op path
    /// applies (unseeded dropout, an input in another dtype than the adapter computes in).
    pub(crate) fn train_inputs(
        &self,
        dtype: DType,
    ) -> Option<(train_node::Adapter<'_>, Option<train_node::Dropout>)> {
        let work = if matches!(dtype, DType::BF16 | DType::F16) {
            dtype
        } else {
            self.a.dtype()
        };
        let dropout = match (self.dropout > 0.0, self.seeded_key()) {
            (false, _) => None,
            (true, Some(key)) => Some(train_node::Dropout {
                key,
                p: self.dropout,
            }),
            (true, None) => return None,
        };
        if work != dtype {
            return None;
        }
        let adapter = train_node::Adapter {
            a: self.a.as_tensor(),
            b: self.b.as_tensor(),
            scaling: self.scaling,
        };
        Some((adapter, dropout))
    }

    /// This layer's seeded-dropout key for the current forward pass: the registry's
    /// `(seed, call)` mixed with the module name, or `None` while dropout is unseeded.
    pub(crate) fn seeded_key(&self) -> Option<u64> {
        self.dropout_key.get().map(|(seed, call)| {
            seed ^ fnv1a(&self.module).rotate_left(17) ^ call.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        })
    }

    /// Whether the inference kernels (`lora::kernels`) can take `x` through this adapter: no
    /// dropout, no graph, 16-bit inputs on a GPU, f32 adapter weights.
    #[cfg(feature = "cuda")]
    fn inference_kernels_take(&self, x: &Tensor, train: bool) -> bool {
        !train
            && !x.track_op()
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::BF16 | DType::F16)
            && self.a.dtype() == DType::F32
            && self.b.dtype() == DType::F32
    }

    /// `y + delta_y(x)` at inference on the GPU, in two kernels (the op-by-op version launched
    /// eight per layer per token, most of unmerged decoding's time, and in a prefill wrote f32
    /// temporaries three times the output's size); `None` where it does not apply (training, a
    /// graph, the CPU, 32-bit inputs).
    pub fn add_to(&self, y: &Tensor, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        {
            let k = x.dim(candle_core::D::Minus1)?;
            let rows = x.elem_count() / k.max(1);
            if self.inference_kernels_take(x, train) && y.dtype() == x.dtype() {
                let n = y.dim(candle_core::D::Minus1)?;
                let out = crate::lora::kernels::lora_inference(
                    &y.contiguous()?.reshape((rows, n))?,
                    &x.contiguous()?.reshape((rows, k))?,
                    &self.a.as_tensor().detach().contiguous()?,
                    &self.b.as_tensor().detach().contiguous()?,
                    self.scaling,
                )?;
                return out.reshape(y.shape()).map(Some);
            }
        }
        let _ = (y, x, train);
        Ok(None)
    }

    /// `x W^T + delta_y(x)` for an NF4 base at inference on a few rows on the GPU: the adapter's
    /// first product (`lora_h`), then the base's decoding kernel adding the second in its
    /// epilogue, two launches where [`Self::add_to`] after the base takes three; one where the
    /// tensor-core kernel computes `h` in blocks of its own launch. The same bits
    /// as that path; `None` where either does not apply (see `add_to` and
    /// `Nf4Weight::decode_kernel`). `epilogue` applied to that sum by the decoding kernel
    /// (`None` where the kernel does not apply one).
    pub fn add_with_nf4_gemv(
        &self,
        base: &crate::quant::weight::Nf4Weight,
        x: &Tensor,
        train: bool,
        epilogue: crate::ops::epilogue::Epilogue,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        {
            let k = x.dim(candle_core::D::Minus1)?;
            let rows = x.elem_count() / k.max(1);
            if self.inference_kernels_take(x, train)
                && let Some(kernel) = base.decode_kernel(x)?
                && kernel.adds_lora()
                && (matches!(epilogue, crate::ops::epilogue::Epilogue::None)
                    || kernel.applies_epilogue())
            {
                use crate::quant::kernels::{LoraEpilogue, LoraH};
                let x2 = x.contiguous()?.reshape((rows, k))?;
                let a = self.a.as_tensor().detach().contiguous()?;
                // The kernel computes h itself where it can: one launch a linear, not two.
                let given;
                let h = if kernel.computes_lora_h(rows, a.dim(0)?)
                    && crate::lora::kernels::h_in_launch()?
                {
                    LoraH::FromA(&a)
                } else {
                    given = crate::lora::kernels::lora_h(&x2, &a)?;
                    LoraH::Given(&given)
                };
                let b = self.b.as_tensor().detach().contiguous()?;
                let lora = LoraEpilogue {
                    h,
                    b: &b,
                    scaling: self.scaling as f32,
                };
                let y = base.forward_from_nf4(&x2, kernel, Some(&lora), epilogue)?;
                let mut shape = x.dims().to_vec();
                *shape.last_mut().expect("x has a feature dimension") = y.dim(1)?;
                return y.reshape(shape).map(Some);
            }
        }
        let _ = (base, x, train, epilogue);
        Ok(None)
    }

    /// Whether forward passes in [`LoraRegistry`]'s training mode (dropout on).
    pub fn training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// `scaling * B @ A` in f32, `[out, in]`, outside any graph: with the weights' graph
    /// tracking on, a merged weight kept every f32 temporary of its merge alive (~18 bytes a
    /// weight; Falcon-7B's merge ran out of 80 GB).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.as_tensor().detach().to_dtype(DType::F32)?;
        let b = self.b.as_tensor().detach().to_dtype(DType::F32)?;
        b.matmul(&a)? * self.scaling
    }

    /// `W + scaling * B @ A`, summed in f32 and rounded once to `W`'s dtype (as PEFT's merge
    /// into a 16-bit weight does).
    pub fn merged_weight(&self, base: &dyn BaseWeight) -> Result<Tensor> {
        let w = base.dequantize()?;
        let dtype = w.dtype();
        (w.to_dtype(DType::F32)? + self.delta_weight()?.to_device(w.device())?)?.to_dtype(dtype)
    }

    /// Keep a merged copy of the weight; forward passes use it instead of base + adapter.
    pub fn merge(&self, base: &dyn BaseWeight) -> Result<()> {
        let merged = self.merged_weight(base)?;
        *self.merged.write().expect("merge lock") = Some(merged);
        Ok(())
    }

    /// Drop the merged copy; the base was never changed, so this is exact.
    pub fn unmerge(&self) {
        *self.merged.write().expect("merge lock") = None;
    }

    pub fn merged(&self) -> Option<Tensor> {
        self.merged.read().expect("merge lock").clone()
    }

    /// Records the weight this adapter sits on (once, when the layer is built).
    pub fn attach_base(&self, base: Arc<dyn BaseWeight>) {
        let _ = self.base.set(base);
    }
}

/// An adapter's tensors to load into layers as they are built (from [`crate::lora::peft`]).
#[derive(Debug)]
pub struct AdapterWeights {
    /// The file the tensors came from, for errors.
    pub origin: String,
    /// `module -> (A, B)`; either may be missing, which is reported when the layer is built.
    pub pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)>,
}

/// All adapters of one model: config, the [`VarMap`] of their weights, the training switch, and
/// (when loading) the tensors still to place. The [`crate::nn::linear::LinearBuilder`] fills it.
pub struct LoraRegistry {
    config: LoraConfig,
    varmap: VarMap,
    layers: Mutex<Vec<Arc<LoraLayer>>>,
    training: Arc<AtomicBool>,
    dropout_key: Arc<DropoutKey>,
    adapter: Option<AdapterWeights>,
    used: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for LoraRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraRegistry")
            .field("config", &self.config)
            .field("layers", &self.layers.lock().map(|l| l.len()).unwrap_or(0))
            .field("training", &self.training.load(Ordering::Relaxed))
            .field("adapter", &self.adapter.as_ref().map(|a| &a.origin))
            .finish()
    }
}

impl LoraRegistry {
    /// Fresh adapters (A random, B zero) on every matching layer.
    pub fn new(config: LoraConfig) -> std::result::Result<Self, LoraError> {
        config.validate()?;
        Ok(Self::with(config, None))
    }

    /// Adapters whose weights come from a saved adapter; every matching layer must find its
    /// tensors, and [`Self::finish`] reports tensors no layer took.
    pub fn from_adapter(
        config: LoraConfig,
        weights: AdapterWeights,
    ) -> std::result::Result<Self, LoraError> {
        config.validate()?;
        Ok(Self::with(config, Some(weights)))
    }

    fn with(config: LoraConfig, adapter: Option<AdapterWeights>) -> Self {
        LoraRegistry {
            config,
            varmap: VarMap::new(),
            layers: Mutex::new(Vec::new()),
            training: Arc::new(AtomicBool::new(false)),
            dropout_key: Arc::new(DropoutKey::default()),
            adapter,
            used: Mutex::new(HashSet::new()),
        }
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapters' weights, under PEFT's names, for an optimizer.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Turns dropout on (training) or off (evaluation) for every adapter.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Make dropout reproducible: the next forward passes draw their masks from `(seed, call)`.
    /// A trainer sets a new `call` (e.g. its micro-batch counter) before each forward pass.
    pub fn set_dropout_key(&self, seed: u64, call: u64) {
        *self.dropout_key.0.lock().expect("dropout key") = Some((seed, call));
    }

    pub fn layers(&self) -> Vec<Arc<LoraLayer>> {
        self.layers.lock().expect("lora layers").clone()
    }

    /// Merges every adapter into a copy of its base weight (inference; see
    /// [`LoraLayer::merge`]); [`Self::unmerge_all`] returns to the unmerged adapters.
    pub fn merge_all(&self) -> Result<()> {
        for layer in self.layers() {
            let base = layer.base.get().cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: no base weight to merge into", layer.module))
            })?;
            layer.merge(base.as_ref())?;
            tracing::debug!(
                module = %layer.module,
                used_mib = crate::ops::profile::device_memory_used(layer.a.as_tensor().device()),
                "merged"
            );
        }
        Ok(())
    }

    pub fn unmerge_all(&self) {
        for layer in self.layers() {
            layer.unmerge();
        }
    }

    /// Build the adapter for `module` if the config targets it.
    pub fn layer_for(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> candle_core::Result<Option<Arc<LoraLayer>>> {
        let Some((r, alpha)) = self.config.for_module(module) else {
            return Ok(None);
        };
        if r == 0 {
            return Err(candle_core::Error::wrap(LoraError::ZeroRank {
                module: module.into(),
            }));
        }
        let dtype = self.config.dtype;
        let (name_a, name_b) = peft_names(module);
        let (a, b) = match &self.adapter {
            None => {
                let bound = 1.0 / (in_dim as f64).sqrt();
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.config.seed ^ fnv1a(module));
                let vals: Vec<f32> = (0..r * in_dim)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(vals, (r, in_dim), device)?.to_dtype(dtype)?;
                (a, Tensor::zeros((out_dim, r), dtype, device)?)
            }
            Some(w) => {
                let at = |name: &str| format!("{}: tensor {name}", w.origin);
                let (a, b) = w.pairs.get(module).cloned().unwrap_or((None, None));
                let (a, b) = match (a, b) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => {
                        // Targeted by the config but absent from the file: PEFT would fail too.
                        return Err(candle_core::Error::wrap(LoraError::MissingHalf {
                            at: at(&name_a),
                            module: module.into(),
                        }));
                    }
                    (None, Some(_)) => {
                        return Err(candle_core::Error::wrap(LoraError::MissingHalf {
                            at: at(&name_a),
                            module: module.into(),
                        }));
                    }
                    (Some(_), None) => {
                        return Err(candle_core::Error::wrap(LoraError::MissingHalf {
                            at: at(&name_b),
                            module: module.into(),
                        }));
                    }
                };
                let check = |t: &Tensor, name: &str, expected: [usize; 2]| {
                    if t.dims() == expected {
                        Ok(())
                    } else {
                        Err(candle_core::Error::wrap(LoraError::Shape {
                            at: at(name),
                            module: module.into(),
                            expected: expected.to_vec(),
                            found: t.dims().to_vec(),
                        }))
                    }
                };
                let r_file = a.dims().first().copied().unwrap_or(0);
                check(&a, &name_a, [r_file, in_dim])?;
                check(&b, &name_b, [out_dim, r_file])?;
                if r_file != r {
                    return Err(candle_core::Error::wrap(LoraError::Shape {
                        at: at(&name_a),
                        module: module.into(),
                        expected: vec![r, in_dim],
                        found: a.dims().to_vec(),
                    }));
                }
                self.used
                    .lock()
                    .expect("used set")
                    .insert(module.to_string());
                (
                    a.to_device(device)?.to_dtype(dtype)?,
                    b.to_device(device)?.to_dtype(dtype)?,
                )
            }
        };
        let a = Var::from_tensor(&a)?;
        let b = Var::from_tensor(&b)?;
        {
            let mut data = self.varmap.data().lock().expect("varmap");
            data.insert(name_a, a.clone());
            data.insert(name_b, b.clone());
        }
        let layer = Arc::new(LoraLayer {
            module: module.to_string(),
            a,
            b,
            r,
            alpha,
            scaling: self.config.scaling(r, alpha),
            dropout: self.config.lora_dropout,
            training: self.training.clone(),
            dropout_key: self.dropout_key.clone(),
            merged: RwLock::new(None),
            base: std::sync::OnceLock::new(),
        });
        self.layers.lock().expect("lora layers").push(layer.clone());
        Ok(Some(layer))
    }

    /// Call once the model is built: with a loaded adapter, every tensor in the file must have
    /// gone to a layer (else the adapter was made for another model).
    pub fn finish(&self) -> std::result::Result<(), LoraError> {
        let Some(w) = &self.adapter else {
            return Ok(());
        };
        let used = self.used.lock().expect("used set");
        let mut unused: Vec<String> = w
            .pairs
            .keys()
            .filter(|m| !used.contains(*m))
            .cloned()
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort();
        Err(LoraError::Unused {
            origin: w.origin.clone(),
            modules: unused,
        })
    }

    /// Current adapter weights by PEFT name (what `adapter_model.safetensors` holds).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for l in self.layers() {
            let (na, nb) = peft_names(&l.module);
            out.push((na, l.a.as_tensor().clone()));
            out.push((nb, l.b.as_tensor().clone()));
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }
}

/// A stable 64-bit hash of a module path, so each layer's initialisation differs but is the same
/// from run to run.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::weight::DenseWeight;

    #[test]
    fn target_matching_follows_peft() {
        let t = TargetModules::names(["query_key_value", "dense"]);
        assert!(t.matches("transformer.h.0.self_attention.query_key_value"));
        assert!(t.matches("transformer.h.0.self_attention.dense"));
        assert!(t.matches("dense"));
        assert!(
            !t.matches("transformer.h.0.mlp.dense_h_to_4h"),
            "suffix must be a whole segment"
        );
        assert!(!t.matches("transformer.h.0.mlp.xdense"));
        let re = TargetModules::Regex(r".*\.(q|v)_proj".into());
        assert!(re.matches("model.layers.3.self_attn.q_proj"));
        assert!(!re.matches("model.layers.3.self_attn.k_proj"));
        assert!(TargetModules::AllLinear.matches("model.layers.0.mlp.up_proj"));
        assert!(!TargetModules::AllLinear.matches("lm_head"));
    }

    #[test]
    fn patterns_layers_and_scaling() {
        let mut c = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: TargetModules::names(["q_proj", "v_proj"]),
            ..Default::default()
        };
        c.rank_pattern.insert("v_proj".into(), 4);
        c.alpha_pattern
            .insert(r"layers\.1\.self_attn\.q_proj".into(), 2.0);
        assert_eq!(
            c.for_module("model.layers.0.self_attn.q_proj"),
            Some((8, 16.0))
        );
        assert_eq!(
            c.for_module("model.layers.0.self_attn.v_proj"),
            Some((4, 16.0))
        );
        assert_eq!(
            c.for_module("model.layers.1.self_attn.q_proj"),
            Some((8, 2.0))
        );
        assert_eq!(c.for_module("model.layers.1.self_attn.k_proj"), None);
        assert_eq!(c.scaling(8, 16.0), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(16, 16.0), 4.0);
        c.layers_to_transform = Some(vec![1]);
        assert_eq!(c.for_module("model.layers.0.self_attn.q_proj"), None);
        assert!(c.for_module("model.layers.1.self_attn.q_proj").is_some());
        c.exclude_modules = Some(TargetModules::Regex(r".*layers\.1\..*".into()));
        assert_eq!(c.for_module("model.layers.1.self_attn.q_proj"), None);
        c.target_modules = TargetModules::Regex("(".into());
        assert!(matches!(c.validate(), Err(LoraError::BadPattern { .. })));
    }

    #[test]
    fn fresh_adapter_init_is_peft_like_and_zero_effect() {
        let reg = LoraRegistry::new(LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::names(["fc"]),
            ..Default::default()
        })
        .unwrap();
        let l = reg
            .layer_for("block.fc", 100, 7, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert!(
            reg.layer_for("block.other", 100, 7, &Device::Cpu)
                .unwrap()
                .is_none()
        );
        let a =
            l.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(a.iter().all(|v| v.abs() < 0.1), "|A| < 1/sqrt(100)");
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.09, "uses the whole range: {spread}");
        assert_eq!(
            l.b.as_tensor()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert_eq!(l.scaling, 2.0);
        let x = Tensor::ones((2, 3, 100), DType::F32, &Device::Cpu).unwrap();
        let d = l.delta_y(&x, false).unwrap();
        assert_eq!(d.dims(), &[2, 3, 7]);
        assert_eq!(
            d.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let names: Vec<String> = reg
            .varmap()
            .data()
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"base_model.model.block.fc.lora_A.weight".to_string()));
        // Same seed and name, same init.
        let reg2 = LoraRegistry::new(reg.config().clone()).unwrap();
        let l2 = reg2
            .layer_for("block.fc", 100, 7, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            l2.a.as_tensor().to_vec2::<f32>().unwrap(),
            l.a.as_tensor().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn merge_equals_base_plus_delta_and_unmerge_restores() {
        let dev = Device::Cpu;
        let reg = LoraRegistry::new(LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: TargetModules::names(["fc"]),
            ..Default::default()
        })
        .unwrap();
        let l = reg.layer_for("fc", 3, 2, &dev).unwrap().unwrap();
        l.b.set(&Tensor::new(&[[1f32, 0.5], [-1.0, 2.0]], &dev).unwrap())
            .unwrap();
        let w = Tensor::new(&[[0.1f32, 0.2, 0.3], [0.4, 0.5, 0.6]], &dev).unwrap();
        let base = DenseWeight { weight: w.clone() };
        l.merge(&base).unwrap();
        let merged = l.merged().unwrap();
        // A graph behind the merged weight would keep the merge's f32 temporaries alive.
        assert!(!merged.track_op());
        let x = Tensor::new(&[[1f32, -2.0, 0.5]], &dev).unwrap();
        let y_merged = x.matmul(&merged.t().unwrap()).unwrap();
        let y_sep = (x.matmul(&w.t().unwrap()).unwrap() + l.delta_y(&x, false).unwrap()).unwrap();
        let diff = (y_merged - y_sep)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        l.unmerge();
        assert!(l.merged().is_none());
    }

    #[test]
    fn loading_checks_halves_shapes_and_leftovers() {
        let dev = Device::Cpu;
        let cfg = LoraConfig {
            r: 2,
            target_modules: TargetModules::names(["fc", "proj"]),
            ..Default::default()
        };
        let z = |s: (usize, usize)| Some(Tensor::zeros(s, DType::F32, &dev).unwrap());
        let pairs = HashMap::from([
            ("m.fc".to_string(), (z((2, 3)), z((4, 2)))),
            ("m.proj".to_string(), (z((2, 3)), None)),
            ("m.gone".to_string(), (z((2, 3)), z((4, 2)))),
        ]);
        let reg = LoraRegistry::from_adapter(
            cfg,
            AdapterWeights {
                origin: "ad/adapter_model.safetensors".into(),
                pairs,
            },
        )
        .unwrap();
        assert!(reg.layer_for("m.fc", 3, 4, &dev).unwrap().is_some());
        let e = reg.layer_for("m.proj", 3, 4, &dev).unwrap_err().to_string();
        assert!(e.contains("ad/adapter_model.safetensors: tensor base_model.model.m.proj.lora_B.weight: missing"), "{e}");
        let e = reg.layer_for("m.fc", 5, 4, &dev).unwrap_err().to_string();
        assert!(
            e.contains(
                "base_model.model.m.fc.lora_A.weight: shape [2, 3], but layer m.fc needs [2, 5]"
            ),
            "{e}"
        );
        let e = reg.finish().unwrap_err().to_string();
        assert!(e.contains("m.gone") && !e.contains("m.fc"), "{e}");
    }
}
