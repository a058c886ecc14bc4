//! The checks a training run passes before it is queued (the server) or started (the CLI),
//! the same for both: everything that can be refused without loading the model is refused
//! here, naming the config key, instead of minutes into the run.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::data;
use crate::eval::pipeline;
use crate::plugin::{PluginKind, Registry};
use crate::train::config::TrainConfig;

/// Checks `config` against the plugins and the model's own config: the formatter exists, every
/// row of the dataset's splits renders, the metrics of `eval_after_train` and
/// `[generation_eval]` exist, and every target module names a layer of the model (read from
/// its `config.json`, not its weights).
pub fn check(config: &TrainConfig, registry: &Registry, assets_dir: &Path) -> Result<()> {
    registry
        .get(&config.formatter, PluginKind::Formatter)
        .context("config.formatter")?;
    let splits = data::load_splits(&config.dataset).context("config.dataset")?;
    data::render(
        &splits.train,
        &config.formatter,
        config.text_field(),
        Some(registry),
    )
    .context("config.dataset")?;
    if let Some(v) = &splits.validation {
        data::render(v, &config.formatter, config.text_field(), Some(registry))
            .context("config.dataset")?;
    }
    for (key, metrics) in [
        ("config.eval_after_train", &config.eval_after_train),
        (
            "config.generation_eval.metrics",
            &config.generation_eval.metrics,
        ),
    ] {
        if !metrics.is_empty() {
            pipeline::validate_metrics(registry, metrics, &Default::default()).context(key)?;
        }
    }
    adapterlab_model::engine::check_target_modules(
        &config.model_name_or_path,
        &config.lora.target_modules,
        &adapterlab_model::engine::Engine::cpu(assets_dir),
    )
    .context("config.lora.target_modules")?;
    Ok(())
}
