//! The model commands: `params`, `generate`, `eval-loss`, `quantize`, `merge`. Thin: the work
//! is in the model crate (`adapterlab_model::engine`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use adapterlab_model::engine::generate::Decoding;
use adapterlab_model::engine::loss::Row;
use adapterlab_model::engine::{self, Engine, EvalLossOptions, GenerateOptions, Quantize};
use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::cli::Context;
use crate::data::Split;
use crate::infer::predict::{self, Sampling};
use crate::plugin::{CallContext, PluginKind};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QuantizeArg {
    Nf4,
    None,
}

impl From<QuantizeArg> for Quantize {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::Nf4 => Quantize::Nf4,
            QuantizeArg::None => Quantize::None,
        }
    }
}

/// The device models run on (see [`crate::infer::model_runtime`]).
pub fn model_runtime(ctx: &Context) -> Result<Engine> {
    crate::infer::model_runtime(ctx.data_dir.assets())
}

#[derive(Debug, Args)]
pub struct ParamsArgs {
    /// A checkpoint folder, a hub id, or `smollm2`; only config.json is read.
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// Comma-separated module names (default: PEFT's defaults for the architecture).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn params(args: ParamsArgs, ctx: &Context) -> Result<()> {
    let count = engine::params(
        &args.model,
        args.lora_r,
        &args.target_modules,
        &model_runtime(ctx)?,
    )?;
    if args.json {
        println!(
            "{}",
            json!({"trainable": count.trainable, "all": count.all, "trainable_percent": count.trainable_percent})
        );
    } else {
        println!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            group(count.trainable),
            group(count.all),
            count.trainable_percent
        );
    }
    Ok(())
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// `smollm2` (default model), a checkpoint folder, a `.gguf` file or a hub id.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// A PEFT adapter folder, a stored adapter's name or the id of the run that trained it;
    /// applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// One prompt.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub prompt: Option<String>,
    /// JSON Lines rows (`dialogue`/`summary` go through the formatter, or `prompt`); writes a
    /// predictions file for `adapterlab eval`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where `--data` predictions go (default: DATA with `.predictions.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The formatter plugin for `--data` rows.
    #[arg(long, default_value = "summarize")]
    pub formatter: String,
    /// Wrap each prompt in the model's chat template as one user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, value_enum, default_value = "none")]
    pub quantize: QuantizeArg,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long)]
    pub json: bool,
}

/// `--adapter` as the server takes it: a PEFT folder, a stored adapter's name, or the id of the
/// training run that made it. The store is opened only when the argument is not a folder.
fn resolve_adapter(ctx: &Context, adapter: Option<PathBuf>) -> Result<Option<PathBuf>> {
    let Some(spec) = adapter else {
        return Ok(None);
    };
    if spec.join("adapter_config.json").is_file() {
        return Ok(Some(spec));
    }
    let name = spec.to_string_lossy();
    let store = ctx
        .store()
        .with_context(|| format!("--adapter {name}: not a PEFT folder, and the store holding adapter names cannot be opened"))?;
    let found = crate::infer::run::resolve_adapter(&store, &name).context("--adapter")?;
    Ok(Some(found.dir))
}

pub fn generate(mut args: GenerateArgs, ctx: &Context) -> Result<()> {
    args.adapter = resolve_adapter(ctx, args.adapter.take())?;
    // Greedy unless a sampling flag is given; a warper alone samples at temperature 1.0.
    let sampled = !args.greedy
        && (args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some());
    let temperature = if sampled {
        args.temperature.unwrap_or(1.0)
    } else {
        0.0
    };
    let runtime = model_runtime(ctx)?;
    let Some(data) = &args.data else {
        let prompt = args.prompt.clone().context("give --prompt or --data")?;
        let opts = GenerateOptions {
            model: args.model.clone(),
            adapter: args.adapter.clone(),
            prompts: vec![prompt],
            chat: args.chat,
            max_new_tokens: args.max_new_tokens,
            decoding: Decoding::from_settings(temperature, args.top_k, args.top_p, args.seed),
            repetition_penalty: args.repetition_penalty,
            quantize: args.quantize.into(),
            batch_size: 1,
            runtime,
        };
        let g = engine::generate(opts)?.remove(0);
        if args.json {
            println!("{}", json!({"token_ids": g.token_ids, "text": g.text}));
        } else {
            println!("{}", g.text);
        }
        return Ok(());
    };
    // Rows become predictions the way generate runs and eval_after_train make them.
    let split = Split {
        origin: data.display().to_string(),
        rows: read_rows(data)?,
    };
    let rows = predict::prompt_rows(&split, &args.formatter, Some(&ctx.registry()?))?;
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        batch_size: args.batch_size.max(1),
    };
    let loaded = engine::load_model(
        &args.model,
        args.adapter.as_deref(),
        args.quantize.into(),
        &runtime,
    )?;
    let predictions = predict::predict(&loaded, &rows, &sampling, None, |_| Ok(()))?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| data.with_extension("predictions.jsonl"));
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&out)
            .with_context(|| format!("failed to create {}", out.display()))?,
    );
    for p in &predictions {
        writeln!(file, "{}", serde_json::to_string(p)?)?;
    }
    file.flush()?;
    if args.json {
        println!(
            "{}",
            json!({"predictions": out, "count": predictions.len()})
        );
    } else {
        eprintln!(
            "wrote {} predictions to {}",
            predictions.len(),
            out.display()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalLossArgs {
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON Lines rows: `prompt`/`completion` (used verbatim) or `dialogue`/`summary`
    /// (through the formatter).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "summarize")]
    pub formatter: String,
    /// Count only completion tokens (TRL's completion-only loss).
    #[arg(long)]
    pub completion_only: bool,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "none")]
    pub quantize: QuantizeArg,
    #[arg(long)]
    pub json: bool,
}

pub fn eval_loss(mut args: EvalLossArgs, ctx: &Context) -> Result<()> {
    args.adapter = resolve_adapter(ctx, args.adapter.take())?;
    let rows = read_rows(&args.data)?;
    let opts = EvalLossOptions {
        model: args.model.clone(),
        adapter: args.adapter.clone(),
        rows: rows.clone(),
        completion_only: args.completion_only,
        max_length: args.max_length,
        batch_size: args.batch_size.max(1),
        quantize: args.quantize.into(),
        runtime: model_runtime(ctx)?,
    };
    let needs_formatter = rows.iter().any(|r| !r.contains_key("prompt"));
    let output = if needs_formatter {
        let session = Mutex::new(formatter_session(ctx, &args.formatter)?);
        let format = |row: &Row| -> Result<(String, Option<String>)> {
            let fields = row_fields(row);
            let mut out = session.lock().unwrap().format(&[fields])?;
            out.pop()
                .context("formatter returned nothing")?
                .map(|f| (f.prompt, f.completion))
                .map_err(anyhow::Error::msg)
        };
        engine::eval_loss(&opts, Some(&format))?
    } else {
        engine::eval_loss(&opts, None)?
    };
    if args.json {
        println!("{}", json!({"loss": output.loss, "tokens": output.tokens}));
    } else {
        println!("loss {:.6} over {} tokens", output.loss, output.tokens);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A local HF checkpoint folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn quantize(args: QuantizeArgs, _ctx: &Context) -> Result<()> {
    let report =
        adapterlab_model::engine::quantize_model_dir(&args.model, &args.out, &Default::default())
            .with_context(|| format!("failed to quantize {}", args.model.display()))?;
    eprintln!(
        "quantized {} linear layers to NF4 (double quant); wrote {}",
        report.quantized_modules.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `smollm2` (its GGUF copy, dequantized), a `.gguf` file, or a checkpoint folder.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// A new or empty folder for the HF checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// The dtype of the written weights (f32 is what training on the CPU computes in).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ExportDtype,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

/// Writes the base weights adapterlab trains on as an HF checkpoint transformers loads.
pub fn export(args: ExportArgs, ctx: &Context) -> Result<()> {
    let dtype = match args.dtype {
        ExportDtype::F32 => candle_core::DType::F32,
        ExportDtype::Bf16 => candle_core::DType::BF16,
        ExportDtype::F16 => candle_core::DType::F16,
    };
    let report = adapterlab_model::engine::export::export(
        &args.model,
        &args.out,
        dtype,
        &ctx.data_dir.assets(),
        &Default::default(),
    )
    .with_context(|| format!("failed to export {}", args.model))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "exported {} ({}, {} tensors, {}) to {}: {}",
            args.model,
            report.from,
            report.tensors,
            report.dtype,
            report.out.display(),
            report.files.join(", ")
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// A local HF checkpoint folder (dense or bitsandbytes NF4).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn merge(mut args: MergeArgs, ctx: &Context) -> Result<()> {
    if let Some(dir) = resolve_adapter(ctx, Some(args.adapter.clone()))? {
        args.adapter = dir;
    }
    let report = adapterlab_model::engine::merge_model_dir(
        &args.model,
        &args.adapter,
        &args.out,
        &Default::default(),
    )
    .with_context(|| {
        format!(
            "failed to merge {} into {}",
            args.adapter.display(),
            args.model.display()
        )
    })?;
    eprintln!(
        "merged the adapter into {} modules; wrote {}",
        report.merged_modules.len(),
        args.out.display()
    );
    Ok(())
}

/// Rows of a JSON Lines file, each an object; errors name the line.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(map)) => rows.push(map),
            Ok(_) => bail!("{}:{}: expected a JSON object", path.display(), i + 1),
            Err(e) => bail!("{}:{}: invalid JSON: {e}", path.display(), i + 1),
        }
    }
    if rows.is_empty() {
        bail!("{} holds no rows", path.display());
    }
    Ok(rows)
}

fn row_fields(row: &Row) -> Vec<(String, String)> {
    row.iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
        .collect()
}

fn formatter_session(ctx: &Context, name: &str) -> Result<crate::plugin::Session> {
    let registry = ctx.registry()?;
    Ok(registry
        .get(name, PluginKind::Formatter)?
        .session(CallContext::default())?)
}
