//! Reporting to the trackers people already use, with HF's `report_to` names: `tensorboard`
//! (event files under `<output_dir>/runs/`, which W&B imports with `wandb sync
//! --sync-tensorboard`) and `mlflow` (a tracking server's REST API). The trainer feeds every
//! logged step and evaluation here; `runs export` replays a stored run.
//!
//! **Architecture Invariant:** a tracker that fails never fails the training: its error is
//! reported once and the run goes on (the store keeps every step regardless).

pub mod mlflow;
pub mod tensorboard;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::store::RunEvent;

/// The `report_to` values adapterlab knows, as HF spells them.
pub const KNOWN: &[&str] = &["tensorboard", "mlflow", "none", "all"];

/// `report_to` as the user gave it, checked and expanded (`all` → both, `none` → none).
pub fn parse_report_to(values: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        match v.trim() {
            "none" => {}
            "all" => out.extend(["tensorboard".to_string(), "mlflow".to_string()]),
            "tensorboard" | "mlflow" => out.push(v.trim().to_string()),
            "wandb" => bail!(
                "report_to: `wandb` is not spoken directly; use report_to = [\"tensorboard\"] and `wandb sync --sync-tensorboard <output_dir>/runs`"
            ),
            other => bail!(
                "report_to: unknown tracker {other:?} (adapterlab reports to: tensorboard, mlflow; or none/all)"
            ),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The trackers of one training run.
pub struct Trackers {
    tensorboard: Option<tensorboard::EventWriter>,
    mlflow: Option<mlflow::MlflowRun>,
    /// Warnings already given, so a tracker that is down is reported once.
    warned: std::collections::BTreeSet<&'static str>,
}

/// HF's default `logging_dir`: `<output_dir>/runs/<date>_<host>`.
pub fn default_logging_dir(output_dir: &Path) -> PathBuf {
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[month repr:short][day]_[hour]-[minute]-[second]"
        ))
        .unwrap_or_default();
    output_dir
        .join("runs")
        .join(format!("{stamp}_{}", tensorboard::hostname()))
}

impl Trackers {
    /// Starts the trackers `report_to` names (already parsed) for a run writing to
    /// `output_dir`, logging `params` (every setting of the run) once.
    /// `logging_dir`: where TensorBoard's event files go (HF's key; see [`default_logging_dir`]).
    pub fn start(
        report_to: &[String],
        logging_dir: &Path,
        run_name: &str,
        params: &[(String, String)],
    ) -> Result<Self> {
        let mut trackers = Trackers {
            tensorboard: None,
            mlflow: None,
            warned: Default::default(),
        };
        if report_to.iter().any(|r| r == "tensorboard") {
            let mut writer = tensorboard::EventWriter::create(logging_dir)?;
            let table: String = params
                .iter()
                .map(|(k, v)| format!("| {k} | {v} |\n"))
                .collect();
            writer.text(
                0,
                "args",
                &format!("| setting | value |\n| --- | --- |\n{table}"),
            )?;
            writer.flush()?;
            trackers.tensorboard = Some(writer);
        }
        if report_to.iter().any(|r| r == "mlflow") {
            let run = mlflow::MlflowRun::start(
                mlflow::MlflowConfig::from_env()?,
                run_name,
                &[(
                    "adapterlab.version".into(),
                    env!("CARGO_PKG_VERSION").into(),
                )],
            )?;
            run.log_params(params)?;
            trackers.mlflow = Some(run);
        }
        Ok(trackers)
    }

    pub fn is_empty(&self) -> bool {
        self.tensorboard.is_none() && self.mlflow.is_none()
    }

    /// Logs what a training event holds; other events are ignored.
    pub fn event(&mut self, event: &RunEvent) {
        let RunEvent::Loss {
            step,
            epoch,
            loss,
            eval_loss,
            learning_rate,
            grad_norm,
            tokens_per_second,
            eval_metrics,
            ..
        } = event
        else {
            return;
        };
        // HF's names: TensorBoard's callback prefixes train/ and eval/, MLflow's logs the keys.
        let mut train: Vec<(&str, f64)> = Vec::new();
        for (name, v) in [
            ("loss", loss),
            ("learning_rate", learning_rate),
            ("grad_norm", grad_norm),
            ("tokens_per_second", tokens_per_second),
        ] {
            if let Some(v) = v {
                train.push((name, *v));
            }
        }
        if !train.is_empty() {
            train.push(("epoch", *epoch));
        }
        let eval: Vec<(&str, f64)> = eval_loss
            .iter()
            .map(|v| ("loss", *v))
            .chain(
                eval_metrics
                    .iter()
                    .map(|(k, v)| (k.strip_prefix("eval_").unwrap_or(k), *v)),
            )
            .collect();
        self.scalars(*step, &train, &eval);
    }

    /// Logs scalars at `step`: `train` ones (loss, learning_rate…) and `eval` ones.
    pub fn scalars(&mut self, step: u64, train: &[(&str, f64)], eval: &[(&str, f64)]) {
        if let Some(tb) = &mut self.tensorboard {
            let values: Vec<(String, f64)> = train
                .iter()
                .map(|(k, v)| (format!("train/{k}"), *v))
                .chain(eval.iter().map(|(k, v)| (format!("eval/{k}"), *v)))
                .collect();
            let result = tb.scalars(step, &values).and_then(|()| tb.flush());
            Self::warn_once(&mut self.warned, "tensorboard", result);
        }
        if let Some(ml) = &self.mlflow {
            let values: Vec<(String, f64)> = train
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .chain(eval.iter().map(|(k, v)| (format!("eval_{k}"), *v)))
                .collect();
            let result = ml.log_metrics(step, &values);
            Self::warn_once(&mut self.warned, "mlflow", result);
        }
    }

    /// Ends the run: uploads the adapter folder (MLflow) and sets the final status.
    pub fn finish(&mut self, adapter_dir: Option<&Path>, status: &str) {
        if let Some(tb) = &mut self.tensorboard {
            let result = tb.flush();
            Self::warn_once(&mut self.warned, "tensorboard", result);
        }
        if let Some(ml) = &self.mlflow {
            if let Some(dir) = adapter_dir {
                let result = ml.log_artifacts(dir, "adapter");
                Self::warn_once(&mut self.warned, "mlflow", result);
            }
            let result = ml.finish(status);
            Self::warn_once(&mut self.warned, "mlflow", result);
        }
    }

    fn warn_once(
        warned: &mut std::collections::BTreeSet<&'static str>,
        tracker: &'static str,
        result: Result<()>,
    ) {
        if let Err(e) = result
            && warned.insert(tracker)
        {
            eprintln!("warning: reporting to {tracker} failed (training goes on): {e:#}");
            tracing::warn!("reporting to {tracker} failed: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_to_takes_hf_names_and_refuses_the_rest() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_report_to(&s(&["none"])).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse_report_to(&s(&["all"])).unwrap(),
            ["mlflow", "tensorboard"]
        );
        assert_eq!(
            parse_report_to(&s(&["tensorboard", "tensorboard"])).unwrap(),
            ["tensorboard"]
        );
        assert!(
            parse_report_to(&s(&["wandb"]))
                .unwrap_err()
                .to_string()
                .contains("wandb sync")
        );
        assert!(parse_report_to(&s(&["tensorbord"])).is_err());
    }
}
