//! The training configuration: HF TrainingArguments / SFTConfig / LoraConfig /
//! BitsAndBytesConfig key names, so a Python config ports one to one, with the reference
//! notebook's defaults. Unknown keys are errors that name the key and suggest the closest.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::plugin::registry::closest;
use crate::settings::Range;

crate::named_choice! {
    /// `lr_scheduler_type`: the learning-rate schedule after warm-up (HF's names).
    pub enum Scheduler {
        Cosine = "cosine",
        Linear = "linear",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
    }
}

crate::named_choice! {
    /// `optim`: HF's optimizer names for AdamW; every one runs the same 32-bit AdamW
    /// (`torch.optim.AdamW`); "paged" only changes where bitsandbytes keeps its state.
    pub enum Optimizer {
        AdamW32bit = "adamw_32bit",
        PagedAdamW32bit = "paged_adamw_32bit",
        AdamWTorch = "adamw_torch",
        AdamW = "adamw",
    }
}

crate::named_choice! {
    /// The sampler [`TrainConfig::sampling`] resolves `train_sampling_strategy` and
    /// `group_by_length` to.
    pub enum Sampling {
        Random = "random",
        Sequential = "sequential",
        GroupByLength = "group_by_length",
    }
}

crate::named_choice! {
    /// `packing_strategy`: how `packing` puts examples into rows, TRL's names (`data::pack`):
    /// best-fit decreasing cutting long examples (`bfd`, TRL's default) or splitting them into
    /// row-sized pieces (`bfd_split`; TRL before 1.0 named it `bfd-requeue`), or all examples
    /// run on and cut into rows (`wrapped`).
    pub enum PackingStrategy {
        Bfd = "bfd",
        BfdSplit = "bfd_split" | "bfd-requeue",
        Wrapped = "wrapped",
    }
}

crate::named_choice! {
    /// `save_strategy`: when a checkpoint is written, HF's names: every `save_steps` steps
    /// (`steps`), after each epoch (`epoch`), after an evaluation that makes a new best of
    /// `metric_for_best_model` (`best`), or never (`no`: a stopped run cannot resume).
    pub enum SaveStrategy {
        Steps = "steps",
        Epoch = "epoch",
        Best = "best",
        No = "no",
    }
}

crate::named_choice! {
    /// `attn_implementation`: the attention the model runs, transformers' names. `eager`
    /// materialises the masked scores (it reproduces transformers' `sdpa` and `eager`, the
    /// name `sdpa` is read as it); `flash_attention_2` never stores them (`ops::flash`), with
    /// packed rows kept apart as FlashAttention's varlen path does.
    pub enum AttnImplementation {
        Eager = "eager" | "sdpa",
        FlashAttention2 = "flash_attention_2",
    }
}

impl AttnImplementation {
    /// The model's attention kernel this name selects.
    pub fn kernel(self) -> adapterlab_model::engine::AttentionKernel {
        use adapterlab_model::engine::AttentionKernel;
        match self {
            AttnImplementation::Eager => AttentionKernel::Eager,
            AttnImplementation::FlashAttention2 => AttentionKernel::Flash,
        }
    }
}

crate::named_choice! {
    /// `quantization.bnb_4bit_compute_dtype`: the dtype the frozen base computes in on a
    /// GPU without `bf16` or `fp16` (which win, as autocast does; the CPU always computes in
    /// f32).
    pub enum ComputeDtype {
        Bfloat16 = "bfloat16" | "bf16",
        Float16 = "float16" | "fp16",
        Float32 = "float32" | "fp32",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model_name_or_path: String,
    /// A `tokenizer.json` (or a folder holding one) when the model's own is missing or to be
    /// replaced, as HF's example scripts' `tokenizer_name`; empty: the model's.
    pub tokenizer_name: String,
    /// A local JSON/JSONL/CSV/Parquet file or folder with splits, `bundled`, or a hub id.
    pub dataset: String,
    pub output_dir: String,
    /// A formatter plugin's name.
    pub formatter: String,
    /// TRL's `dataset_text_field`: rows holding this string field (and no prompt/completion)
    /// are text rows, trained on whole (language modeling, as TRL trains a text dataset).
    /// Unset by default: other rows go through `formatter`.
    pub dataset_text_field: String,
    /// TRL's `eos_token`: the token appended to each completion or text row (unless it ends
    /// with it already). Unset: the tokenizer's end-of-sequence token.
    pub eos_token: String,
    pub completion_only_loss: bool,
    pub max_seq_length: usize,
    /// Put several examples into each row of up to `max_seq_length` tokens (TRL's `packing`),
    /// each example keeping its own positions and attention (except `wrapped`). Batches then
    /// count packed rows.
    pub packing: bool,
    /// With `packing`: how examples are placed into rows (TRL's `packing_strategy`).
    pub packing_strategy: PackingStrategy,
    /// Whether the validation loss is computed on packed rows (TRL's `eval_packing`); unset
    /// (`null`): as `packing`.
    pub eval_packing: Option<bool>,
    /// The attention the model runs (transformers' `attn_implementation`).
    pub attn_implementation: AttnImplementation,
    pub num_train_epochs: f64,
    /// Overrides `num_train_epochs` when positive (as in HF: -1 means unset).
    pub max_steps: i64,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: Scheduler,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub optim: Optimizer,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// transformers 4's switch for the length-grouped sampler; `false` turns the default
    /// `train_sampling_strategy = "group_by_length"` into `"random"`.
    pub group_by_length: bool,
    /// The order of training rows, as transformers 5's `train_sampling_strategy`: `random` (a
    /// seeded permutation per epoch), `sequential` (file order every epoch, so another trainer
    /// can see the same rows in the same steps) or `group_by_length` (HF's
    /// `LengthGroupedSampler`, the default with `group_by_length`).
    pub train_sampling_strategy: Sampling,
    /// Recompute each decoder layer's activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`, checkpoint every this many layers (adapterlab's own key;
    /// 1, the default, is every layer as in transformers; 2 keeps every other layer's
    /// activations, for about half the memory saving at half the recomputation).
    pub gradient_checkpointing_every: usize,
    pub logging_steps: usize,
    /// HF's `logging_first_step`: log step 1 too (a first loss to compare runs by).
    pub logging_first_step: bool,
    /// When checkpoints are written ([`SaveStrategy`]).
    pub save_strategy: SaveStrategy,
    /// With `save_strategy = "steps"`: a checkpoint every this many steps (0: none).
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    /// When to evaluate on the validation split, as HF's `eval_strategy`: `steps` (every
    /// `eval_steps`, before training and at the end), `epoch` (after each epoch) or `no`.
    pub eval_strategy: String,
    /// With `eval_strategy = "steps"`: evaluate every this many steps (0: only before training
    /// and at the end).
    pub eval_steps: usize,
    /// Generation metrics at each evaluation: generate for some validation rows with the
    /// current adapter and score them with metric plugins (logged as `eval_<score>`).
    pub generation_eval: GenerationEvalSection,
    /// The logged evaluation value that picks the best checkpoint (`loss`, `rougeL` or
    /// `eval_rougeL`: both name `eval_rougeL`); empty: `loss` when `load_best_model_at_end`.
    pub metric_for_best_model: String,
    /// Whether larger is better for `metric_for_best_model`; unset: false for names ending in
    /// `loss`, true otherwise (HF's rule).
    pub greater_is_better: Option<bool>,
    /// Put the best checkpoint's adapter in `output_dir` at the end instead of the last one.
    pub load_best_model_at_end: bool,
    pub seed: u64,
    /// HF's mixed precision: with `bf16` (or `fp16`) a step's matmuls run in bfloat16
    /// (float16), as under torch's autocast, whatever `bnb_4bit_compute_dtype` says; with
    /// neither, in `bnb_4bit_compute_dtype`. Both false by default, as in HF. The CPU computes
    /// in f32 whatever they say; a run stores what it computed in (`compute`).
    pub bf16: bool,
    pub fp16: bool,
    /// Metric plugins to run on generations from the validation/test split after training.
    pub eval_after_train: Vec<String>,
    /// HF's `run_name`: the run's name in the trackers (unset: the run's id in the store, or
    /// the output folder).
    pub run_name: String,
    /// HF's `logging_dir`: where `report_to = tensorboard` writes its event files (unset:
    /// HF's default, `<output_dir>/runs/<date>_<host>`).
    pub logging_dir: String,
    /// Trackers to report to, as HF's `report_to`: `tensorboard`, `mlflow`, `all`, `none`
    /// (a bare string is a one-element list).
    pub report_to: Vec<String>,
    pub lora: LoraSection,
    pub quantization: QuantizationSection,
}

/// `[generation_eval]`: what an evaluation generates and how it is scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationEvalSection {
    /// Metric plugins (empty: no generation at evaluations).
    pub metrics: Vec<String>,
    /// How many validation rows (the first ones) are generated for: the evaluation's cost.
    pub rows: usize,
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    pub temperature: f64,
    /// 0 is off.
    pub top_k: usize,
    /// 1 is off.
    pub top_p: f64,
    /// 1 is off.
    pub repetition_penalty: f64,
}

impl Default for GenerationEvalSection {
    fn default() -> Self {
        GenerationEvalSection {
            metrics: Vec::new(),
            rows: 32,
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraSection {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Empty: every linear layer of the architecture.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub bias: String,
    /// PEFT's `task_type`: a LoraConfig copied from a notebook carries it; adapterlab trains
    /// causal LMs only (and writes `CAUSAL_LM` into `adapter_config.json`).
    pub task_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuantizationSection {
    pub load_in_4bit: bool,
    pub bnb_4bit_quant_type: String,
    pub bnb_4bit_use_double_quant: bool,
    pub bnb_4bit_compute_dtype: ComputeDtype,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model_name_or_path: "smollm2".into(),
            tokenizer_name: String::new(),
            dataset: "bundled".into(),
            output_dir: "outputs".into(),
            formatter: "summarize".into(),
            dataset_text_field: String::new(),
            eos_token: String::new(),
            completion_only_loss: true,
            max_seq_length: 512,
            packing: false,
            packing_strategy: PackingStrategy::Bfd,
            eval_packing: None,
            attn_implementation: AttnImplementation::Eager,
            num_train_epochs: 5.0,
            max_steps: -1,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 4,
            learning_rate: 2e-4,
            lr_scheduler_type: Scheduler::Cosine,
            warmup_ratio: 0.01,
            warmup_steps: 0,
            max_grad_norm: 0.1,
            optim: Optimizer::AdamW32bit,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            group_by_length: true,
            train_sampling_strategy: Sampling::GroupByLength,
            gradient_checkpointing: false,
            gradient_checkpointing_every: 1,
            logging_steps: 20,
            logging_first_step: false,
            save_strategy: SaveStrategy::Steps,
            save_steps: 20,
            save_total_limit: None,
            eval_strategy: "steps".into(),
            eval_steps: 0,
            generation_eval: GenerationEvalSection::default(),
            metric_for_best_model: String::new(),
            greater_is_better: None,
            load_best_model_at_end: false,
            seed: 42,
            bf16: false,
            fp16: false,
            eval_after_train: Vec::new(),
            run_name: String::new(),
            logging_dir: String::new(),
            report_to: Vec::new(),
            lora: LoraSection::default(),
            quantization: QuantizationSection::default(),
        }
    }
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.1,
            target_modules: Vec::new(),
            use_rslora: false,
            bias: "none".into(),
            task_type: "CAUSAL_LM".into(),
        }
    }
}

impl Default for QuantizationSection {
    fn default() -> Self {
        QuantizationSection {
            load_in_4bit: true,
            bnb_4bit_quant_type: "nf4".into(),
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: ComputeDtype::Bfloat16,
        }
    }
}

/// Top-level keys that serialise to nothing when unset, with the type of their value.
const OPTIONAL_KEYS: &[(&str, Optional)] = &[
    ("save_total_limit", Optional::Count),
    ("greater_is_better", Optional::Bool),
    ("eval_packing", Optional::Bool),
];

#[derive(Clone, Copy)]
enum Optional {
    Count,
    Bool,
}

impl Optional {
    fn of(key: &str) -> Option<Optional> {
        OPTIONAL_KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, o)| *o)
    }

    /// A value of the key's type, for the type check.
    fn example(self) -> toml::Value {
        match self {
            Optional::Count => toml::Value::Integer(0),
            Optional::Bool => toml::Value::Boolean(false),
        }
    }

    fn json_types(self) -> serde_json::Value {
        match self {
            Optional::Count => serde_json::json!(["integer", "null"]),
            Optional::Bool => serde_json::json!(["boolean", "null"]),
        }
    }
}
/// The tables of a config.
const SECTIONS: &[&str] = &["lora", "quantization", "generation_eval"];

/// The keys a config may hold, by section ("" is the top level).
/// Other names of top-level keys, read as the key they name: `(alias, key, whose name)`. A
/// config is stored under the key.
const KEY_ALIASES: &[(&str, &str, &str)] = &[
    ("max_length", "max_seq_length", "TRL's name since 0.20"),
    (
        "evaluation_strategy",
        "eval_strategy",
        "transformers' name before 4.46",
    ),
];

/// A file's or a request's aliases renamed to their keys; an alias beside its key is refused
/// (which one is meant is unclear).
fn resolve_aliases(table: &mut toml::Table, origin: &str) -> Result<()> {
    for (alias, key, whose) in KEY_ALIASES {
        let Some(value) = table.remove(*alias) else {
            continue;
        };
        if table.contains_key(*key) {
            bail!("{origin}: `{alias}` ({whose}) and `{key}` are the same setting; give one");
        }
        table.insert(key.to_string(), value);
    }
    Ok(())
}

fn known_keys(section: &str) -> Vec<String> {
    let value =
        toml::Value::try_from(TrainConfig::default()).expect("the default config serialises");
    let table = match section {
        "" => value.as_table().cloned(),
        s => value.get(s).and_then(|v| v.as_table()).cloned(),
    }
    .unwrap_or_default();
    let mut keys: Vec<String> = table.keys().cloned().collect();
    if section.is_empty() {
        // Optional keys that serialise to nothing when unset.
        keys.extend(OPTIONAL_KEYS.iter().map(|(k, _)| k.to_string()));
    }
    keys
}

/// Check every key of a parsed TOML table against the known ones.
fn check_keys(table: &toml::Table, origin: &str) -> Result<()> {
    for (key, value) in table {
        if SECTIONS.contains(&key.as_str()) {
            let Some(inner) = value.as_table() else {
                bail!("{origin}: `{key}` must be a table ([{key}])");
            };
            let known = known_keys(key);
            for inner_key in inner.keys() {
                if !known.contains(inner_key) {
                    bail!(
                        "{origin}: unknown key `{key}.{inner_key}`{}",
                        suggestion(inner_key, &known)
                    );
                }
            }
            continue;
        }
        let known = known_keys("");
        if !known.contains(key) {
            // A LoRA or quantization key at the top level is a common slip.
            for section in SECTIONS {
                if known_keys(section).contains(key) {
                    bail!(
                        "{origin}: unknown key `{key}`; it belongs in the [{section}] table (`{section}.{key}`)"
                    );
                }
            }
            if let Some((_, instead)) = NOT_TAKEN.iter().find(|(k, _)| k == key) {
                bail!("{origin}: `{key}` is not an adapterlab key: {instead}");
            }
            bail!("{origin}: unknown key `{key}`{}", suggestion(key, &known));
        }
    }
    Ok(())
}

/// HF's and TRL's keys that a ported config often carries and adapterlab does not take, with
/// what to do instead: refused like any unknown key (a setting that matched nothing would read
/// as applied), but with the way out.
const NOT_TAKEN: &[(&str, &str)] = &[
    (
        "push_to_hub",
        "after training, `adapterlab push OUTPUT_DIR --repo OWNER/NAME [--private]` publishes the \
         adapter with its card and stored results (HF_TOKEN)",
    ),
    ("hub_model_id", "see `adapterlab push --repo OWNER/NAME`"),
    ("hub_private_repo", "see `adapterlab push --private`"),
    ("hub_strategy", "see `adapterlab push`"),
    (
        "hub_token",
        "`adapterlab push` reads HF_TOKEN or the Hugging Face token file",
    ),
    ("do_train", "`adapterlab train` trains; remove the key"),
    (
        "do_eval",
        "evaluations follow eval_strategy; remove the key",
    ),
    (
        "do_predict",
        "eval_after_train generates on the validation or test split",
    ),
    (
        "overwrite_output_dir",
        "output_dir is written into; a run continues with --resume-from-checkpoint",
    ),
    (
        "dataloader_num_workers",
        "PyTorch's data loading; adapterlab tokenizes up front, remove the key",
    ),
    (
        "dataloader_pin_memory",
        "PyTorch's data loading; remove the key",
    ),
    (
        "remove_unused_columns",
        "rows keep their fields for the formatter; remove the key",
    ),
    (
        "ddp_find_unused_parameters",
        "PyTorch DDP's; remove the key",
    ),
    ("torch_compile", "PyTorch's; remove the key"),
    (
        "dataset_num_proc",
        "datasets' workers; adapterlab tokenizes in one pass, remove the key",
    ),
];

/// Check every value's type against the default config's, so a wrong type is reported with
/// its key (serde's own message does not say which key it was reading).
fn check_types(table: &toml::Table, origin: &str) -> Result<()> {
    let defaults =
        toml::Value::try_from(TrainConfig::default()).expect("the default config serialises");
    fn kind(v: &toml::Value) -> &'static str {
        match v {
            toml::Value::String(_) => "a string",
            toml::Value::Integer(_) => "an integer",
            toml::Value::Float(_) => "a number",
            toml::Value::Boolean(_) => "true or false",
            toml::Value::Datetime(_) => "a date",
            toml::Value::Array(_) => "a list",
            toml::Value::Table(_) => "a table",
        }
    }
    fn check(
        table: &toml::Table,
        defaults: &toml::Value,
        prefix: &str,
        origin: &str,
    ) -> Result<()> {
        for (key, value) in table {
            let name = format!("{prefix}{key}");
            // Optional keys serialise to nothing when unset.
            let optional = (prefix.is_empty())
                .then(|| Optional::of(key))
                .flatten()
                .map(Optional::example);
            let expected = match (defaults.get(key), &optional) {
                (Some(d), _) => d,
                (None, Some(example)) => example,
                (None, None) => continue,
            };
            match (expected, value) {
                (toml::Value::Table(_), toml::Value::Table(inner)) => {
                    check(inner, expected, &format!("{name}."), origin)?
                }
                (toml::Value::Float(_), toml::Value::Integer(_)) => {}
                // Counts are unsigned; only max_steps takes -1 (unset), checked in validate.
                (toml::Value::Integer(_), toml::Value::Integer(v))
                    if *v < 0 && name != "max_steps" =>
                {
                    bail!("{origin}: `{name}` must be 0 or more, not {v}");
                }
                // Every list key holds strings (target_modules, eval_after_train).
                (toml::Value::Array(_), toml::Value::Array(given)) => {
                    if let Some(bad) = given.iter().find(|v| !v.is_str()) {
                        bail!("{origin}: `{name}` must be a list of strings, not {bad}");
                    }
                }
                (e, v) if std::mem::discriminant(e) != std::mem::discriminant(v) => {
                    bail!("{origin}: `{name}` must be {}, not {v}", kind(e));
                }
                _ => {}
            }
        }
        Ok(())
    }
    check(table, &defaults, "", origin)
}

/// Every named choice in `table` is one of its names ([`CHOICES`], the table the published
/// schema lists too), checked before the table becomes a [`TrainConfig`] so that the error names
/// the key (the enum-typed ones would otherwise fail with serde's message naming only the value).
fn check_choices(table: &toml::Table, origin: &str) -> Result<()> {
    let values = serde_json::to_value(table).unwrap_or_default();
    // The quantization type only matters when quantizing.
    let load_in_4bit = values
        .pointer("/quantization/load_in_4bit")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(TrainConfig::default().quantization.load_in_4bit);
    for (key, names) in CHOICES {
        let given = key.split('.').try_fold(&values, |v, k| v.get(k));
        let given: Vec<&str> = match given {
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => continue,
        };
        // report_to has its own messages (what to use instead of wandb), from
        // `track::parse_report_to`.
        if (*key == "quantization.bnb_4bit_quant_type" && !load_in_4bit) || *key == "report_to" {
            continue;
        }
        if let Some(bad) = given.iter().find(|g| !names.contains(g)) {
            // The QLoRA notebooks' usual choice: say why it is missing and what costs the same.
            let hint = if *key == "optim" && bad.contains("8bit") {
                " (bitsandbytes' 8-bit optimizer states are not implemented; an adapter's AdamW \
                 states take a few MB in 32 bits, so paged_adamw_32bit costs next to nothing more)"
            } else {
                ""
            };
            bail!(
                "{origin}: `{key}` is {bad:?}; expected one of {}{hint}",
                names.join(", ")
            );
        }
    }
    Ok(())
}

fn suggestion(key: &str, known: &[String]) -> String {
    let names: Vec<&str> = known.iter().map(String::as_str).collect();
    match closest(key, &names) {
        Some(c) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

impl TrainConfig {
    /// The dtype a step computes in on a GPU: `fp16`'s or `bf16`'s (HF's autocast), else
    /// `bnb_4bit_compute_dtype`.
    pub fn gpu_compute_dtype(&self) -> ComputeDtype {
        if self.fp16 {
            ComputeDtype::Float16
        } else if self.bf16 {
            ComputeDtype::Bfloat16
        } else {
            self.quantization.bnb_4bit_compute_dtype
        }
    }

    /// Read a TOML file, apply `KEY=VALUE` overrides (`lora.r=8` for table keys), validate.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("failed to read {}", p.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("{} is not valid TOML", p.display()))?;
                (table, p.display().to_string())
            }
            None => (toml::Table::new(), "config".to_string()),
        };
        resolve_aliases(&mut table, &origin)?;
        check_keys(&table, &origin)?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        check_keys(&table, "--set")?;
        lists_from_strings(&mut table);
        check_types(&table, &origin)?;
        check_choices(&table, &origin)?;
        let config: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {}", e.message()))?;
        config.validate(&origin)?;
        Ok(config)
    }

    /// Build from a JSON object (the API's `config`), with the same checks.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        // TOML has no null: an unset key is an absent one.
        fn without_nulls(v: &serde_json::Value) -> serde_json::Value {
            match v {
                serde_json::Value::Object(m) => m
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), without_nulls(v)))
                    .collect(),
                other => other.clone(),
            }
        }
        let mut table: toml::Table = toml::Value::try_from(without_nulls(value))
            .ok()
            .and_then(|v| v.as_table().cloned())
            .context("config must be an object of train keys")?;
        resolve_aliases(&mut table, "config")?;
        check_keys(&table, "config")?;
        lists_from_strings(&mut table);
        check_types(&table, "config")?;
        check_choices(&table, "config")?;
        let config: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("config: {}", e.message()))?;
        config.validate("config")?;
        Ok(config)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        let fail = |field: &str, why: String| anyhow::anyhow!("{origin}: `{field}` {why}");
        // The named choices were checked by `check_choices` before the config was built.
        if self.gradient_checkpointing_every == 0 {
            return Err(fail(
                "gradient_checkpointing_every",
                "must be at least 1".into(),
            ));
        }
        if self.learning_rate <= 0.0 || !self.learning_rate.is_finite() {
            return Err(fail("learning_rate", "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(fail("warmup_ratio", "must be in [0, 1)".into()));
        }
        if self.max_seq_length < 8 {
            return Err(fail("max_seq_length", "must be at least 8".into()));
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return Err(fail(
                "per_device_train_batch_size",
                "and gradient_accumulation_steps must be positive".into(),
            ));
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return Err(fail(
                "num_train_epochs",
                "must be positive when max_steps is unset".into(),
            ));
        }
        if self.lora.r == 0 {
            return Err(fail("lora.r", "must be positive".into()));
        }
        if !(0.0..1.0).contains(&self.lora.lora_dropout) {
            return Err(fail("lora.lora_dropout", "must be in [0, 1)".into()));
        }
        if self.bf16 && self.fp16 {
            return Err(fail("bf16", "and fp16 cannot both be true".into()));
        }
        crate::track::parse_report_to(&self.report_to)
            .map_err(|e| fail("report_to", format!("{e:#}")))?;
        self.validate_evaluation(origin)?;
        self.check_bounds()
            .map_err(|(field, why)| fail(field, why))?;
        Ok(())
    }
}

/// List keys that also take one bare string, as HF's do (`report_to = "tensorboard"`).
const LIST_KEYS: &[&str] = &[
    "eval_after_train",
    "lora.target_modules",
    "report_to",
    "generation_eval.metrics",
];

/// A bare string where a list key expects a list becomes a one-element list.
fn lists_from_strings(table: &mut toml::Table) {
    for key in LIST_KEYS {
        let (section, name) = match key.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, *key),
        };
        let target = match section {
            Some(s) => table.get_mut(s).and_then(|v| v.as_table_mut()),
            None => Some(&mut *table),
        };
        if let Some(t) = target
            && let Some(toml::Value::String(v)) = t.get(name)
        {
            let one = toml::Value::Array(vec![toml::Value::String(v.clone())]);
            t.insert(name.to_string(), one);
        }
    }
}

impl TrainConfig {
    /// The evaluation keys, checked together: they only make sense as a set.
    fn validate_evaluation(&self, origin: &str) -> Result<()> {
        let fail = |field: &str, why: String| anyhow::anyhow!("{origin}: `{field}` {why}");
        if !matches!(self.eval_strategy.as_str(), "steps" | "epoch" | "no") {
            return Err(fail(
                "eval_strategy",
                format!(
                    "is {:?}; expected \"steps\", \"epoch\" or \"no\"",
                    self.eval_strategy
                ),
            ));
        }
        let g = &self.generation_eval;
        if !(1..=100_000).contains(&g.rows) {
            return Err(fail(
                "generation_eval.rows",
                format!("is {}; expected 1 to 100000", g.rows),
            ));
        }
        if !(1..=4096).contains(&g.max_new_tokens) {
            return Err(fail(
                "generation_eval.max_new_tokens",
                format!("is {}; expected 1 to 4096", g.max_new_tokens),
            ));
        }
        if !(0.0..=10.0).contains(&g.temperature) {
            return Err(fail(
                "generation_eval.temperature",
                format!("is {}; expected 0 to 10", g.temperature),
            ));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(fail(
                "generation_eval.top_p",
                format!("is {}; expected (0, 1]", g.top_p),
            ));
        }
        if !(g.repetition_penalty > 0.0 && g.repetition_penalty <= 100.0) {
            return Err(fail(
                "generation_eval.repetition_penalty",
                format!("is {}; expected (0, 100]", g.repetition_penalty),
            ));
        }
        if !g.metrics.is_empty() && self.eval_strategy == "no" {
            return Err(fail(
                "generation_eval.metrics",
                "needs evaluations: eval_strategy is \"no\"".into(),
            ));
        }
        if self.save_strategy == SaveStrategy::Best && self.eval_strategy == "no" {
            return Err(fail(
                "save_strategy",
                "is \"best\", which saves after evaluations: eval_strategy is \"no\"".into(),
            ));
        }
        if self.load_best_model_at_end && self.save_strategy != SaveStrategy::Best {
            // HF's rule: the best evaluation must have a checkpoint.
            if self.eval_strategy == "no" || self.save_strategy.as_str() != self.eval_strategy {
                return Err(fail(
                    "load_best_model_at_end",
                    format!(
                        "needs save_strategy ({}) and eval_strategy ({}) to match (steps or \
                         epoch), or save_strategy = \"best\", so the best evaluation has a \
                         checkpoint",
                        self.save_strategy.as_str(),
                        self.eval_strategy
                    ),
                ));
            }
            if self.save_strategy == SaveStrategy::Steps
                && (self.eval_steps == 0
                    || self.save_steps == 0
                    || !self.save_steps.is_multiple_of(self.eval_steps))
            {
                return Err(fail(
                    "load_best_model_at_end",
                    format!(
                        "needs save_steps ({}) to be a positive multiple of eval_steps ({}), as in HF, so the best evaluation has a checkpoint",
                        self.save_steps, self.eval_steps
                    ),
                ));
            }
        }
        if let Some(name) = self.best_metric_name() {
            let known = name == "eval_loss" || self.generation_eval.metrics.iter().any(|_| true);
            if !known {
                return Err(fail(
                    "metric_for_best_model",
                    format!(
                        "{:?} is not logged: only eval_loss is, unless generation_eval.metrics names metric plugins",
                        self.metric_for_best_model
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The logged key that picks the best checkpoint (`eval_` added as HF does), if any.
    pub fn best_metric_name(&self) -> Option<String> {
        let name = match self.metric_for_best_model.trim() {
            "" if self.load_best_model_at_end || self.save_strategy == SaveStrategy::Best => "loss",
            "" => return None,
            n => n,
        };
        Some(if name.starts_with("eval_") {
            name.to_string()
        } else {
            format!("eval_{name}")
        })
    }

    /// Whether the step schedule writes a checkpoint after `step` (`save_strategy`; `best` is
    /// decided by the evaluations, see [`TrainConfig::saves_best`]).
    pub fn saves_at(&self, step: usize, steps_per_epoch: usize) -> bool {
        match self.save_strategy {
            SaveStrategy::Steps => self.save_steps > 0 && step.is_multiple_of(self.save_steps),
            SaveStrategy::Epoch => step.is_multiple_of(steps_per_epoch.max(1)),
            SaveStrategy::Best | SaveStrategy::No => false,
        }
    }

    /// Whether an evaluation falls after `step` (`eval_strategy`; the one before training and
    /// the one at the end are the trainer's).
    pub fn evaluates_at(&self, step: usize, steps_per_epoch: usize) -> bool {
        match self.eval_strategy.as_str() {
            "steps" => self.eval_steps > 0 && step.is_multiple_of(self.eval_steps),
            "epoch" => step.is_multiple_of(steps_per_epoch.max(1)),
            _ => false,
        }
    }

    /// Whether a new best evaluation writes a checkpoint (`save_strategy = "best"`).
    pub fn saves_best(&self) -> bool {
        self.save_strategy == SaveStrategy::Best
    }

    /// The sampler training uses: `train_sampling_strategy`, with `group_by_length = false`
    /// turning the length-grouped default into `random` (transformers 4's meaning of it).
    pub fn sampling(&self) -> Sampling {
        match self.train_sampling_strategy {
            Sampling::GroupByLength if !self.group_by_length => Sampling::Random,
            s => s,
        }
    }

    /// `dataset_text_field`, when set.
    pub fn text_field(&self) -> Option<&str> {
        Some(self.dataset_text_field.as_str()).filter(|f| !f.is_empty())
    }

    /// Whether the step just made is logged (HF's `logging_steps`, `logging_first_step`, and
    /// the last step).
    pub fn logs_at(&self, step: usize, max_steps: usize) -> bool {
        step.is_multiple_of(self.logging_steps.max(1))
            || step == max_steps
            || (self.logging_first_step && step == 1)
    }

    /// Whether training batches are packed rows (`packing`).
    pub fn packs_train(&self) -> bool {
        self.packing
    }

    /// Whether the validation loss is computed on packed rows: `eval_packing`, unset as
    /// `packing` (TRL's rule).
    pub fn packs_eval(&self) -> bool {
        self.eval_packing.unwrap_or(self.packing)
    }

    /// HF's rule: larger is better unless told otherwise or the name ends in `loss`.
    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better
            .unwrap_or_else(|| !self.best_metric_name().is_some_and(|n| n.ends_with("loss")))
    }
}

impl TrainConfig {
    /// Every numeric setting within a range that a run can actually use: an absurd value
    /// (a rank of 10^12, a batch of 10^9) would otherwise reach an allocation that aborts
    /// the whole process, taking every other job with it. The bounds are generous; the
    /// message names the field and its range.
    fn check_bounds(&self) -> std::result::Result<(), (&'static str, String)> {
        let values = serde_json::to_value(self).unwrap_or_default();
        for range in RANGES {
            let value = range.key.split('.').try_fold(&values, |v, k| v.get(k));
            // JSON has no NaN or infinity: a non-finite value serialises as null, like an
            // unset option; only save_total_limit may be unset.
            let v = match value {
                Some(serde_json::Value::Null) | None if range.key == "save_total_limit" => continue,
                Some(v) => v.as_f64(),
                None => None,
            };
            let Some(v) = v else {
                return Err((range.key, "must be a finite number".into()));
            };
            // max_steps: -1 (or 0) is "unset", as in HF; then the epochs count.
            if range.key == "max_steps" && (v == -1.0 || v == 0.0) {
                continue;
            }
            if range.key == "num_train_epochs" && self.max_steps > 0 {
                if !v.is_finite() || v < 0.0 || v > range.max {
                    return Err((
                        range.key,
                        format!("is {v}; allowed range: [0, {}]", range.max),
                    ));
                }
                continue;
            }
            if let Err(why) = range.check(v) {
                return Err((range.key, why));
            }
        }
        Ok(())
    }
}

/// Every numeric setting's range (see [`TrainConfig::validate`]).
pub const RANGES: &[Range] = &[
    Range::int("lora.r", 1, BOUNDS.lora_r),
    Range::real("lora.lora_alpha", 0.0, true, 1e6),
    Range::real("lora.lora_dropout", 0.0, false, 0.999_999),
    Range::int("max_seq_length", 8, BOUNDS.max_seq_length),
    Range::int("per_device_train_batch_size", 1, BOUNDS.batch_size),
    Range::int("per_device_eval_batch_size", 1, BOUNDS.batch_size),
    Range::int("gradient_accumulation_steps", 1, BOUNDS.batch_size),
    Range::int("max_steps", 1, BOUNDS.max_steps),
    Range::real("num_train_epochs", 0.0, true, 1e4),
    Range::real("learning_rate", 0.0, true, 1.0),
    Range::real("warmup_ratio", 0.0, false, 0.999_999),
    Range::int("warmup_steps", 0, BOUNDS.max_steps),
    Range::real("max_grad_norm", 0.0, false, 1e6),
    Range::real("weight_decay", 0.0, false, 10.0),
    Range::real("adam_beta1", 0.0, false, 0.999_999),
    Range::real("adam_beta2", 0.0, false, 0.999_999_999),
    Range::real("adam_epsilon", 0.0, true, 1.0),
    Range::int("gradient_checkpointing_every", 1, 1024),
    Range::int("logging_steps", 0, BOUNDS.max_steps),
    Range::int("save_steps", 0, BOUNDS.max_steps),
    Range::int("eval_steps", 0, BOUNDS.max_steps),
    Range::int("save_total_limit", 1, 100_000),
    Range::int("seed", 0, u32::MAX as u64),
    Range::int("generation_eval.rows", 1, 100_000),
    Range::int("generation_eval.max_new_tokens", 1, 4096),
    Range::real("generation_eval.temperature", 0.0, false, 10.0),
    Range::int("generation_eval.top_k", 0, 1_000_000),
    Range::real("generation_eval.top_p", 0.0, true, 1.0),
    Range::real("generation_eval.repetition_penalty", 0.0, true, 100.0),
];

/// The settings that take one of a few names, with those names.
pub const CHOICES: &[(&str, &[&str])] = &[
    ("lr_scheduler_type", Scheduler::NAMES),
    ("optim", Optimizer::NAMES),
    ("eval_strategy", &["steps", "epoch", "no"]),
    ("train_sampling_strategy", Sampling::NAMES),
    ("packing_strategy", PackingStrategy::NAMES),
    ("save_strategy", SaveStrategy::NAMES),
    ("attn_implementation", AttnImplementation::NAMES),
    ("lora.bias", &["none"]),
    ("lora.task_type", &["CAUSAL_LM"]),
    ("quantization.bnb_4bit_quant_type", &["nf4"]),
    ("quantization.bnb_4bit_compute_dtype", ComputeDtype::NAMES),
    ("report_to", &["tensorboard", "mlflow", "none", "all"]),
];

/// The training settings as JSON Schema, from the config type itself: every key with its
/// type and default, the ranges of [`RANGES`] and the names of [`CHOICES`]. The server
/// publishes it and the dashboard builds its form defaults and checks from it, so no default
/// or bound is written twice.
pub fn schema() -> serde_json::Value {
    fn node(prefix: &str, value: &serde_json::Value) -> serde_json::Value {
        use serde_json::{Value, json};
        let mut out = match value {
            Value::Object(map) => {
                let props: serde_json::Map<String, Value> = map
                    .iter()
                    .map(|(k, v)| {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        (k.clone(), node(&key, v))
                    })
                    .collect();
                return json!({"type": "object", "properties": props, "additionalProperties": false});
            }
            Value::Bool(b) => json!({"type": "boolean", "default": b}),
            Value::Number(n) if n.is_i64() || n.is_u64() => {
                json!({"type": "integer", "default": n})
            }
            Value::Number(n) => json!({"type": "number", "default": n}),
            Value::String(s) => json!({"type": "string", "default": s}),
            Value::Array(a) => json!({"type": "array", "items": {"type": "string"}, "default": a}),
            Value::Null => json!({"type": ["integer", "boolean", "null"], "default": null}),
        };
        if let Some(r) = RANGES.iter().find(|r| r.key == prefix) {
            r.describe(&mut out);
            if prefix == "max_steps" {
                out["description"] = json!("-1: unset (the epochs count)");
            }
        }
        if let Some((_, names)) = CHOICES.iter().find(|(k, _)| *k == prefix) {
            match out["type"].as_str() {
                Some("array") => out["items"]["enum"] = json!(names),
                _ => out["enum"] = json!(names),
            }
        }
        out
    }
    let mut defaults = serde_json::to_value(TrainConfig::default()).unwrap_or_default();
    // Optional keys are absent from the defaults; the schema still names them.
    for (key, _) in OPTIONAL_KEYS {
        defaults[*key] = serde_json::Value::Null;
    }
    let mut schema = node("", &defaults);
    for (key, optional) in OPTIONAL_KEYS {
        schema["properties"][*key]["type"] = optional.json_types();
    }
    schema
}

/// The largest values the numeric settings may take (see [`TrainConfig::validate`]).
pub struct Bounds {
    pub lora_r: u64,
    pub max_seq_length: u64,
    pub batch_size: u64,
    pub max_steps: u64,
}

pub const BOUNDS: Bounds = Bounds {
    lora_r: 4096,
    max_seq_length: 131_072,
    batch_size: 4096,
    max_steps: 100_000_000,
};

fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item:?} must look like KEY=VALUE");
    };
    // An alias overrides its key, as the key itself would.
    let key = KEY_ALIASES
        .iter()
        .find(|(alias, _, _)| *alias == key)
        .map_or(key, |(_, key, _)| *key);
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|t| t.get("v").cloned())
        .unwrap_or_else(|| {
            // A list given as a,b,c (e.g. target_modules) or a bare string.
            if raw.contains(',') {
                toml::Value::Array(
                    raw.split(',')
                        .map(|s| toml::Value::String(s.trim().to_string()))
                        .collect(),
                )
            } else {
                toml::Value::String(raw.to_string())
            }
        });
    // List keys take one bare name as a one-element list (`--set eval_after_train=rouge`).
    let value = match value {
        toml::Value::String(s) if LIST_KEYS.contains(&key) => {
            toml::Value::Array(vec![toml::Value::String(s)])
        }
        v => v,
    };
    match key.split_once('.') {
        Some((section, inner)) => {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let t = entry
                .as_table_mut()
                .with_context(|| format!("--set {key}: `{section}` is not a table"))?;
            t.insert(inner.to_string(), value);
        }
        None => {
            table.insert(key.to_string(), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantization_type_is_checked_only_when_quantizing() {
        let e = load_str("[quantization]\nbnb_4bit_quant_type = \"fp4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("quantization.bnb_4bit_quant_type") && e.contains("nf4"),
            "{e}"
        );
        let c = load_str(
            "[quantization]\nload_in_4bit = false\nbnb_4bit_quant_type = \"fp4\"\n",
            &[],
        )
        .unwrap();
        assert!(!c.quantization.load_in_4bit);
    }

    fn load_str(text: &str, overrides: &[&str]) -> Result<TrainConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        TrainConfig::load(
            Some(&path),
            &overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn non_finite_values_are_refused_naming_the_key() {
        for (key, value) in [
            ("max_grad_norm", "inf"),
            ("adam_epsilon", "nan"),
            ("warmup_ratio", "-inf"),
        ] {
            let e = load_str(&format!("{key} = {value}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn the_published_schema_holds_every_default_range_and_choice() {
        let s = schema();
        let at = |key: &str| {
            key.split('.')
                .fold(&s, |node, k| &node["properties"][k])
                .clone()
        };
        let defaults = serde_json::to_value(TrainConfig::default()).unwrap();
        assert_eq!(
            at("per_device_train_batch_size")["default"],
            defaults["per_device_train_batch_size"]
        );
        assert_eq!(at("lora.r")["maximum"], 4096.0);
        assert_eq!(at("learning_rate")["exclusiveMinimum"], 0.0);
        assert_eq!(at("lr_scheduler_type")["enum"][0], "cosine");
        assert_eq!(at("report_to")["items"]["enum"][0], "tensorboard");
        for range in RANGES {
            assert!(
                at(range.key).is_object() && !at(range.key).is_null(),
                "{} is not in the schema",
                range.key
            );
            assert!(
                at(range.key)["maximum"].is_number(),
                "{} has no maximum",
                range.key
            );
        }
        for (key, _) in CHOICES {
            assert!(!at(key).is_null(), "{key} is not in the schema");
        }
    }

    #[test]
    fn attn_implementation_reads_transformers_names() {
        let parse = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::load(None, &sets)
        };
        assert_eq!(
            parse(&[]).unwrap().attn_implementation,
            AttnImplementation::Eager
        );
        for (name, want) in [
            ("eager", AttnImplementation::Eager),
            ("sdpa", AttnImplementation::Eager),
            ("flash_attention_2", AttnImplementation::FlashAttention2),
        ] {
            let c = parse(&[&format!("attn_implementation={name}")]).unwrap();
            assert_eq!(c.attn_implementation, want, "{name}");
        }
        let err = parse(&["attn_implementation=flash_attention_3"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`attn_implementation`") && err.contains("flash_attention_2"),
            "{err}"
        );
    }

    #[test]
    fn packing_keys_read_as_trl_names_them() {
        let parse = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::load(None, &sets)
        };
        let c = parse(&[]).unwrap();
        assert_eq!(
            (c.packing, c.packing_strategy),
            (false, PackingStrategy::Bfd)
        );
        let c = parse(&["packing=true", "packing_strategy=bfd"]).unwrap();
        assert!(c.packing);
        for (name, strategy) in [
            ("bfd_split", PackingStrategy::BfdSplit),
            ("bfd-requeue", PackingStrategy::BfdSplit),
            ("wrapped", PackingStrategy::Wrapped),
        ] {
            let c = parse(&["packing=true", &format!("packing_strategy={name}")]).unwrap();
            assert_eq!(c.packing_strategy, strategy, "{name}");
        }
        assert_eq!(parse(&[]).unwrap().eval_packing, None);
        let c = parse(&["packing=true", "eval_packing=false"]).unwrap();
        assert_eq!((c.packs_train(), c.packs_eval()), (true, false));
        let c = parse(&["eval_packing=true"]).unwrap();
        assert_eq!((c.packs_train(), c.packs_eval()), (false, true));
        assert!(parse(&["packing=true"]).unwrap().packs_eval());
        for bad in ["best_fit", "ffd", "BFD"] {
            let err = parse(&["packing=true", &format!("packing_strategy={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`packing_strategy`") && err.contains("expected one of bfd"),
                "{err}"
            );
        }
        let err = parse(&["packing=yes"]).unwrap_err().to_string();
        assert!(err.contains("packing"), "{err}");
    }

    #[test]
    fn sampling_follows_train_sampling_strategy_and_group_by_length() {
        let parse = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::load(None, &sets).map(|c| c.sampling())
        };
        assert_eq!(parse(&[]).unwrap(), Sampling::GroupByLength);
        assert_eq!(parse(&["group_by_length=false"]).unwrap(), Sampling::Random);
        assert_eq!(
            parse(&["train_sampling_strategy=sequential"]).unwrap(),
            Sampling::Sequential
        );
        assert_eq!(
            parse(&[
                "group_by_length=false",
                "train_sampling_strategy=sequential"
            ])
            .unwrap(),
            Sampling::Sequential
        );
        let err = parse(&["train_sampling_strategy=shuffled"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("train_sampling_strategy"), "{err}");
    }

    #[test]
    fn defaults_are_the_reference_notebooks() {
        let c = TrainConfig::default();
        assert_eq!(
            (c.lora.r, c.lora.lora_alpha, c.lora.lora_dropout),
            (16, 32.0, 0.1)
        );
        assert_eq!(
            (c.learning_rate, c.warmup_ratio, c.max_grad_norm),
            (2e-4, 0.01, 0.1)
        );
        assert_eq!(
            (
                c.gradient_accumulation_steps,
                c.max_seq_length,
                c.num_train_epochs
            ),
            (4, 512, 5.0)
        );
        assert!(c.quantization.load_in_4bit && c.quantization.bnb_4bit_use_double_quant);
        assert_eq!(c.lr_scheduler_type, Scheduler::Cosine);
    }

    #[test]
    fn a_notebooks_lora_task_type_is_read_and_only_causal_lm_accepted() {
        let load = |v: &str| TrainConfig::load(None, &[format!("lora.task_type={v}")]);
        assert_eq!(load("CAUSAL_LM").unwrap().lora.task_type, "CAUSAL_LM");
        let e = format!("{:#}", load("SEQ_CLS").unwrap_err());
        assert!(
            e.contains("`lora.task_type`") && e.contains("CAUSAL_LM"),
            "{e}"
        );
    }

    #[test]
    fn trl_and_older_transformers_names_are_read_as_their_keys() {
        let c = TrainConfig::load(None, &["max_length=256".into()]).unwrap();
        assert_eq!(c.max_seq_length, 256);
        let c = load_str("evaluation_strategy = \"epoch\"\nmax_length = 128\n", &[]).unwrap();
        assert_eq!((c.eval_strategy.as_str(), c.max_seq_length), ("epoch", 128));
        // On the command line an alias overrides the file's key.
        let c = load_str("max_seq_length = 128\n", &["max_length=64"]).unwrap();
        assert_eq!(c.max_seq_length, 64);
        let e = load_str("max_seq_length = 128\nmax_length = 64\n", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("same setting"), "{e:#}");
        let c = TrainConfig::from_json(&serde_json::json!({"max_length": 100})).unwrap();
        assert_eq!(c.max_seq_length, 100);
        // Stored under the key.
        assert!(
            toml::Value::try_from(&c)
                .unwrap()
                .get("max_length")
                .is_none()
        );
    }

    #[test]
    fn hf_keys_adapterlab_does_not_take_are_refused_with_the_way_out() {
        let e = TrainConfig::load(None, &["push_to_hub=true".into()]).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("`push_to_hub` is not an adapterlab key") && e.contains("adapterlab push"),
            "{e}"
        );
        // Every such key is really not taken.
        let known = known_keys("");
        for (key, _) in NOT_TAKEN {
            assert!(!known.contains(&key.to_string()), "{key}");
        }
    }

    #[test]
    fn an_8bit_optimizer_is_refused_with_what_to_use() {
        let e = TrainConfig::load(None, &["optim=paged_adamw_8bit".to_string()]).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("`optim`") && e.contains("paged_adamw_32bit"),
            "{e}"
        );
    }

    #[test]
    fn bf16_and_fp16_choose_the_compute_dtype_as_autocast_does() {
        let dtype = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::load(None, &sets).map(|c| c.gpu_compute_dtype())
        };
        // Neither: bnb_4bit_compute_dtype (bfloat16 by default).
        assert_eq!(dtype(&[]).unwrap(), ComputeDtype::Bfloat16);
        assert_eq!(
            dtype(&["quantization.bnb_4bit_compute_dtype=float16"]).unwrap(),
            ComputeDtype::Float16
        );
        // A notebook's `fp16=True` alone is accepted (HF's defaults are both false) and wins.
        assert_eq!(dtype(&["fp16=true"]).unwrap(), ComputeDtype::Float16);
        assert_eq!(
            dtype(&["bf16=true", "quantization.bnb_4bit_compute_dtype=float32"]).unwrap(),
            ComputeDtype::Bfloat16
        );
        let both = dtype(&["bf16=true", "fp16=true"]).unwrap_err();
        assert!(format!("{both:#}").contains("fp16"), "{both:#}");
    }

    #[test]
    fn reads_hf_names_and_overrides() {
        let c = load_str(
            "model_name_or_path = \"tiiuae/falcon-7b\"\nlearning_rate = 1e-4\n[lora]\nr = 8\ntarget_modules = [\"query_key_value\"]\n",
            &["max_steps=50", "lora.lora_alpha=16", "lora.target_modules=dense,dense_h_to_4h", "eval_after_train=rouge"],
        )
        .unwrap();
        assert_eq!(c.model_name_or_path, "tiiuae/falcon-7b");
        assert_eq!(c.learning_rate, 1e-4);
        assert_eq!(c.max_steps, 50);
        assert_eq!(c.lora.r, 8);
        assert_eq!(c.lora.lora_alpha, 16.0);
        assert_eq!(c.lora.target_modules, ["dense", "dense_h_to_4h"]);
        assert_eq!(c.eval_after_train, ["rouge"]);
    }

    #[test]
    fn unknown_keys_name_the_key_and_suggest() {
        let e = load_str("lerning_rate = 1e-4\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `lerning_rate`") && e.contains("did you mean `learning_rate`"),
            "{e}"
        );
        let e = load_str("r = 8\n", &[]).unwrap_err().to_string();
        assert!(e.contains("belongs in the [lora] table"), "{e}");
        let e = load_str("[lora]\nalpha = 8\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `lora.alpha`"), "{e}");
        let e = load_str("", &["lora.rr=3"]).unwrap_err().to_string();
        assert!(e.contains("did you mean `r`"), "{e}");
    }

    #[test]
    fn json_configs_as_the_api_gets_them() {
        // Whole numbers for float keys, nested sections, nulls for unset optional keys.
        let c = TrainConfig::from_json(&serde_json::json!({
            "model_name_or_path": "smollm2", "num_train_epochs": 5, "learning_rate": 0.0002,
            "max_steps": 10, "save_total_limit": null,
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
            "quantization": {"load_in_4bit": false}
        }))
        .unwrap();
        assert_eq!(
            (c.num_train_epochs, c.max_steps, c.lora.lora_alpha),
            (5.0, 10, 16.0)
        );
        assert!(!c.quantization.load_in_4bit);
        assert_eq!(c.save_total_limit, None);
        let e = TrainConfig::from_json(&serde_json::json!({"lora": {"lora_aplha": 8}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `lora.lora_aplha`") && e.contains("did you mean `lora_alpha`"),
            "{e}"
        );
        let e = TrainConfig::from_json(&serde_json::json!({"model": "smollm2"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `model`"), "{e}");
        let e = TrainConfig::from_json(&serde_json::json!({"learning_rate": "fast"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`learning_rate` must be a number, not \"fast\""),
            "{e}"
        );
        let e = TrainConfig::from_json(&serde_json::json!({"lora": {"target_modules": [1]}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`lora.target_modules` must be a list of strings"),
            "{e}"
        );
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/train-qlora.toml");
        let c = TrainConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.lora, LoraSection::default());
        assert_eq!(c.quantization, QuantizationSection::default());
    }

    #[test]
    fn absurd_values_are_refused_with_the_field_and_its_range() {
        for (set, field) in [
            ("lora.r=1000000000000", "lora.r"),
            (
                "per_device_train_batch_size=1000000000",
                "per_device_train_batch_size",
            ),
            ("max_seq_length=1000000000000", "max_seq_length"),
            ("max_steps=1000000000000000", "max_steps"),
            ("learning_rate=1e308", "learning_rate"),
            ("max_grad_norm=-1", "max_grad_norm"),
            ("lora.lora_alpha=-1", "lora.lora_alpha"),
            ("save_total_limit=0", "save_total_limit"),
            (
                "gradient_accumulation_steps=100000000",
                "gradient_accumulation_steps",
            ),
            ("adam_beta2=2", "adam_beta2"),
            ("max_steps=-5", "max_steps"),
            ("num_train_epochs=1e308", "num_train_epochs"),
        ] {
            let e = load_str("", &[set]).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{field}`")) && e.contains("allowed"),
                "{set}: {e}"
            );
        }
        let e = load_str("", &["per_device_train_batch_size=-1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`per_device_train_batch_size` must be 0 or more"),
            "{e}"
        );
        let e = load_str("", &["lora.r=-5"]).unwrap_err().to_string();
        assert!(e.contains("`lora.r`"), "{e}");
        // The largest allowed values still load.
        load_str(
            "",
            &["lora.r=4096", "max_seq_length=131072", "save_total_limit=1"],
        )
        .unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = load_str("lr_scheduler_type = \"exp\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lr_scheduler_type"), "{e}");
        let e = load_str("learning_rate = \"fast\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("learning_rate") || e.contains("invalid type"),
            "{e}"
        );
    }
}
