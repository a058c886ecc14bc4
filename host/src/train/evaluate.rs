//! Evaluation during training (`eval_strategy`): the validation loss and, with
//! `[generation_eval]`, generations for the first validation rows scored by the metric plugins
//! (through the eval pipeline, in a scratch store), each logged as HF logs it and offered as the
//! best model by `metric_for_best_model`; and `eval_after_train`'s generations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use adapterlab_model::engine::loss::loss_on_packed;
use adapterlab_model::engine::{LoadedModel, LoraRegistry};
use anyhow::{Context as _, Result, bail};
use serde_json::json;

use crate::data;
use crate::eval::input::PredictionRow;
use crate::infer::predict::{self, PromptRow, Sampling};
use crate::store::{RunEvent, Store};
use crate::train::TrainEnv;
use crate::train::checkpoint::ResumeState;
use crate::train::config::TrainConfig;
use crate::train::setup::Prepared;
use crate::train::trainer::round4;

/// Evaluations during training: the validation loss, and with `generation_eval` the
/// generations' metrics; each logged as HF logs it and offered as the best model.
pub(crate) struct Evaluator<'a> {
    pub config: &'a TrainConfig,
    pub env: &'a TrainEnv,
    pub loaded: &'a LoadedModel,
    pub val_rows: Option<&'a [data::Packed]>,
    pub generation: Option<&'a GenerationEval>,
}

impl Evaluator<'_> {
    /// Whether this rank evaluates at all (rank 0 evaluates alone; the others meet it at the
    /// next step's all-reduce).
    pub fn evaluates(&self) -> bool {
        self.config.eval_strategy != "no" && self.env.is_main()
    }

    /// Whether the run has anything to evaluate on.
    pub fn has_data(&self) -> bool {
        self.val_rows.is_some() || self.generation.is_some()
    }

    /// Whether an evaluation falls after `step` (HF's `eval_strategy`).
    pub fn due(&self, step: usize, steps_per_epoch: usize) -> bool {
        self.config.evaluates_at(step, steps_per_epoch) && self.env.is_main()
    }

    /// The validation loss, or `None` without a validation row that has a target token.
    fn loss(&self, registry: &LoraRegistry) -> Result<Option<f64>> {
        let Some(val) = self.val_rows else {
            return Ok(None);
        };
        registry.set_training(false);
        // Without packing `data::encode` has left out the rows without a target token.
        if !val.iter().any(|r| data::n_targets(&r.row) > 0) {
            return Ok(None);
        }
        let batch = self.config.per_device_eval_batch_size.max(1);
        Ok(Some(loss_on_packed(&self.loaded.model, val, batch)?.loss))
    }

    /// One evaluation: the validation loss, and with `generation_eval` the generation metrics.
    /// `in_history`: a log_history entry too (the pre-training one is an event only, since HF's
    /// log_history has no step-0 entry without `eval_on_start`), and a candidate for the best.
    pub fn run(
        &self,
        registry: &LoraRegistry,
        state: &mut ResumeState,
        epoch: f64,
        in_history: bool,
    ) -> Result<Option<f64>> {
        let started = Instant::now();
        let loss = self.loss(registry)?;
        let scores = match self.generation {
            Some(g) => {
                registry.set_training(false);
                g.score(self.loaded, self.env, state.global_step)?
            }
            None => BTreeMap::new(),
        };
        let runtime = started.elapsed().as_secs_f64();
        if loss.is_none() && scores.is_empty() {
            return Ok(None);
        }
        let mut metrics: BTreeMap<String, f64> = scores
            .iter()
            .map(|(k, v)| (format!("eval_{k}"), *v))
            .collect();
        if let Some(g) = self.generation {
            metrics.insert("eval_runtime".into(), round4(runtime));
            metrics.insert(
                "eval_samples_per_second".into(),
                round4(g.rows.len() as f64 / runtime.max(1e-9)),
            );
        }
        if in_history {
            let mut entry = json!({"epoch": epoch, "step": state.global_step});
            if let Some(l) = loss {
                entry["eval_loss"] = json!(l);
            }
            for (k, v) in &metrics {
                entry[k] = json!(v);
            }
            state.log_history.push(entry);
        }
        let shown: Vec<String> = loss
            .map(|l| format!("eval_loss {l:.4}"))
            .into_iter()
            .chain(scores.iter().map(|(k, v)| format!("eval_{k} {v:.4}")))
            .collect();
        self.env.log(format!(
            "evaluation at step {}: {} ({runtime:.1} s)",
            state.global_step,
            shown.join(", ")
        ));
        self.env.record(RunEvent::Loss {
            step: state.global_step as u64,
            epoch,
            loss: None,
            eval_loss: loss,
            learning_rate: None,
            grad_norm: None,
            tokens_per_second: None,
            eta_seconds: None,
            memory_bytes: None,
            gpu_memory_bytes: None,
            eval_metrics: metrics.clone(),
        });
        // The pre-training evaluation is a baseline, not a candidate (HF's `eval_on_start`).
        if in_history {
            self.offer_best(state, loss, &metrics);
        }
        Ok(loss)
    }

    /// `metric_for_best_model`: the evaluation just made becomes the best if it beats it.
    fn offer_best(
        &self,
        state: &mut ResumeState,
        loss: Option<f64>,
        metrics: &BTreeMap<String, f64>,
    ) {
        let Some(name) = self.config.best_metric_name() else {
            return;
        };
        let value = if name == "eval_loss" {
            loss
        } else {
            metrics.get(&name).copied()
        };
        let Some(v) = value.filter(|v| v.is_finite()) else {
            return;
        };
        let better = match state.best_metric {
            None => true,
            Some(best) if self.config.greater_is_better() => v > best,
            Some(best) => v < best,
        };
        if better {
            state.best_metric = Some(v);
            state.best_step = Some(state.global_step);
        }
    }
}

/// `[generation_eval]` made ready: the validation rows to generate for, the metric plugins,
/// the decoding settings.
pub(crate) struct GenerationEval {
    pub rows: Vec<PromptRow>,
    plugins: Vec<crate::plugin::Plugin>,
    metrics: Vec<String>,
    sampling: Sampling,
}

impl GenerationEval {
    pub fn prepare(
        config: &TrainConfig,
        env: &TrainEnv,
        splits: &data::Splits,
    ) -> Result<Option<Self>> {
        let g = &config.generation_eval;
        if g.metrics.is_empty() || config.eval_strategy == "no" {
            if let Some(name) = config.best_metric_name().filter(|n| n != "eval_loss") {
                bail!(
                    "metric_for_best_model: {name} is not logged; only eval_loss is without generation_eval.metrics"
                );
            }
            return Ok(None);
        }
        let registry = env
            .registry
            .as_ref()
            .context("generation_eval needs the plugin registry")?;
        let split = splits.validation.as_ref().with_context(|| {
            format!(
                "generation_eval needs a validation split in {}",
                config.dataset
            )
        })?;
        let head = data::Split {
            origin: split.origin.clone(),
            rows: split.rows.iter().take(g.rows).cloned().collect(),
        };
        let rows = predict::prompt_rows(&head, &config.formatter, Some(registry))?;
        let plugins =
            crate::eval::pipeline::validate_metrics(registry, &g.metrics, &Default::default())
                .context("generation_eval.metrics")?;
        if let Some(name) = config.best_metric_name() {
            let logged: Vec<String> = std::iter::once("eval_loss".to_string())
                .chain(
                    plugins
                        .iter()
                        .flat_map(|p| p.meta.scores.iter().map(|s| format!("eval_{}", s.name))),
                )
                .collect();
            if !logged.contains(&name) {
                bail!(
                    "metric_for_best_model: {name} is not logged (logged: {})",
                    logged.join(", ")
                );
            }
        }
        Ok(Some(GenerationEval {
            rows,
            plugins,
            metrics: g.metrics.clone(),
            sampling: Sampling {
                max_new_tokens: g.max_new_tokens,
                temperature: g.temperature as f32,
                top_p: (g.top_p < 1.0).then_some(g.top_p as f32),
                top_k: (g.top_k > 0).then_some(g.top_k),
                repetition_penalty: g.repetition_penalty as f32,
                seed: config.seed,
                batch_size: config.per_device_eval_batch_size.max(1),
            },
        }))
    }

    /// Generates for the rows with the adapter as it is now and scores the generations with
    /// the metric plugins (in a scratch store): each score's mean.
    pub fn score(
        &self,
        loaded: &LoadedModel,
        env: &TrainEnv,
        step: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let predictions = predict::predict(loaded, &self.rows, &self.sampling, None, |_| Ok(()))?;
        let request = crate::eval::pipeline::EvalRequest {
            name: format!("generation_eval step {step}"),
            rows: predictions,
            metrics: self.metrics.clone(),
            settings: Default::default(),
            score_references: false,
            metadata: Default::default(),
            llm_base_url: None,
        };
        let scratch = Store::temporary()?;
        let run = crate::eval::pipeline::create_run(&scratch, &request, &self.plugins)?;
        let eval_env = crate::eval::pipeline::EvalEnv {
            store: scratch,
            services: Arc::new(crate::plugin::NoServices),
            cancel: env.cancel.clone().unwrap_or_default(),
            on_progress: Arc::new(|_, _| {}),
            stopped_because: crate::eval::pipeline::EvalEnv::user_stops(),
        };
        let done = crate::eval::pipeline::execute(&eval_env, &run.id, &request, &self.plugins)?;
        if let Some(e) = &done.error {
            env.log(format!("generation_eval at step {step}: {e}"));
        }
        Ok(done
            .aggregates
            .iter()
            .map(|(k, e)| (k.clone(), e.mean))
            .collect())
    }
}
/// `eval_after_train`: the trained model's generations on the validation (else test) split,
/// for the metric plugins, and that split's name.
pub(crate) fn eval_after_train(
    config: &TrainConfig,
    env: &TrainEnv,
    prepared: &Prepared,
) -> Result<(Vec<PredictionRow>, &'static str)> {
    let (name, split) = match (&prepared.splits.validation, &prepared.splits.test) {
        (Some(v), _) => ("validation", v),
        (None, Some(t)) => ("test", t),
        (None, None) => bail!(
            "eval_after_train needs a validation or test split in {}",
            config.dataset
        ),
    };
    prepared.registry.set_training(false);
    let rows = predict::prompt_rows(split, &config.formatter, env.registry.as_ref())?;
    env.log(format!(
        "generating on {} rows of {} for eval_after_train",
        rows.len(),
        split.origin
    ));
    let predictions =
        predict::predict(&prepared.loaded, &rows, &Sampling::default(), None, |_| {
            Ok(())
        })?;
    Ok((predictions, name))
}
