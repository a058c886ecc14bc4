//! An MLflow run through the tracking server's REST API (`MLFLOW_TRACKING_URI`): the
//! experiment (`MLFLOW_EXPERIMENT_NAME`, created when missing), params, per-step metrics in
//! batches, the adapter as artifacts through the server's artifact proxy, and the final status.
//! Credentials: `MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// MLflow's limits on one `log-batch`.
const MAX_PARAMS_PER_BATCH: usize = 100;
const MAX_METRICS_PER_BATCH: usize = 1000;
/// MLflow refuses longer param values.
const MAX_PARAM_VALUE: usize = 6000;

/// Where and how to reach the tracking server.
#[derive(Debug, Clone)]
pub struct MlflowConfig {
    pub tracking_uri: String,
    pub experiment_name: String,
    pub token: Option<String>,
    pub basic: Option<(String, String)>,
}

impl MlflowConfig {
    /// From the environment variables the MLflow client reads.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let tracking_uri = var("MLFLOW_TRACKING_URI").context(
            "report_to = mlflow needs MLFLOW_TRACKING_URI, the URL of an MLflow tracking server (e.g. http://127.0.0.1:5000 from `mlflow server`)",
        )?;
        if !(tracking_uri.starts_with("http://") || tracking_uri.starts_with("https://")) {
            bail!(
                "MLFLOW_TRACKING_URI = {tracking_uri:?}: adapterlab logs to an MLflow tracking server over HTTP; start one with `mlflow server` and give its URL"
            );
        }
        Ok(MlflowConfig {
            tracking_uri,
            experiment_name: var("MLFLOW_EXPERIMENT_NAME").unwrap_or_else(|| "Default".into()),
            token: var("MLFLOW_TRACKING_TOKEN"),
            basic: var("MLFLOW_TRACKING_USERNAME")
                .map(|u| (u, var("MLFLOW_TRACKING_PASSWORD").unwrap_or_default())),
        })
    }
}

/// One MLflow run.
pub struct MlflowRun {
    http: reqwest::blocking::Client,
    config: MlflowConfig,
    pub experiment_id: String,
    pub run_id: String,
    artifact_uri: String,
}

impl MlflowRun {
    /// Creates (or finds) the experiment and starts a run named `run_name`.
    pub fn start(config: MlflowConfig, run_name: &str, tags: &[(String, String)]) -> Result<Self> {
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("adapterlab/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut run = MlflowRun {
            http,
            config,
            experiment_id: String::new(),
            run_id: String::new(),
            artifact_uri: String::new(),
        };
        run.experiment_id = run.experiment()?;
        let created = run.post(
            "runs/create",
            &json!({
                "experiment_id": run.experiment_id,
                "run_name": run_name,
                "start_time": now_ms(),
                "tags": tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
            }),
        )?;
        let info = &created["run"]["info"];
        run.run_id = info["run_id"]
            .as_str()
            .context("MLflow's runs/create answer has no run_id")?
            .to_string();
        run.artifact_uri = info["artifact_uri"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Ok(run)
    }

    fn experiment(&self) -> Result<String> {
        let url = self.url("experiments/get-by-name")?;
        let response = self
            .auth(
                self.http
                    .get(url)
                    .query(&[("experiment_name", &self.config.experiment_name)]),
            )
            .send()
            .with_context(|| format!("MLflow at {} cannot be reached", self.shown()))?;
        if response.status().is_success() {
            let v: Value = response.json()?;
            if let Some(id) = v["experiment"]["experiment_id"].as_str() {
                return Ok(id.to_string());
            }
        } else if response.status().as_u16() != 404 {
            let status = response.status();
            bail!(
                "MLflow experiments/get-by-name answered {status}: {}",
                crate::redact::redact(&response.text().unwrap_or_default())
            );
        }
        let created = self.post(
            "experiments/create",
            &json!({"name": self.config.experiment_name}),
        )?;
        created["experiment_id"]
            .as_str()
            .map(str::to_string)
            .context("MLflow's experiments/create answer has no experiment_id")
    }

    pub fn log_params(&self, params: &[(String, String)]) -> Result<()> {
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": crate::plugin::limits::truncate(v, MAX_PARAM_VALUE - 40)}))
                .collect();
            self.post(
                "runs/log-batch",
                &json!({"run_id": self.run_id, "params": params}),
            )?;
        }
        Ok(())
    }

    pub fn log_metrics(&self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let timestamp = now_ms();
        let metrics: Vec<Value> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| json!({"key": k, "value": v, "timestamp": timestamp, "step": step}))
            .collect();
        for chunk in metrics.chunks(MAX_METRICS_PER_BATCH) {
            self.post(
                "runs/log-batch",
                &json!({"run_id": self.run_id, "metrics": chunk}),
            )?;
        }
        Ok(())
    }

    /// Uploads every file of `dir` under `artifact_path`, through the server's artifact proxy.
    pub fn log_artifacts(&self, dir: &Path, artifact_path: &str) -> Result<()> {
        let Some(root) = self.artifact_uri.strip_prefix("mlflow-artifacts:/") else {
            bail!(
                "the MLflow server stores artifacts at {:?}, which adapterlab cannot write to; run it with artifact serving (`mlflow server`, the default since MLflow 2)",
                self.artifact_uri
            );
        };
        let root = root.trim_start_matches('/');
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("failed to read {}", dir.display()))?
            .flatten()
            .filter(|e| e.path().is_file())
            .collect();
        files.sort_by_key(|e| e.file_name());
        for entry in files {
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path())
                .with_context(|| format!("failed to read {}", entry.path().display()))?;
            let url = self.base()?.join(&format!(
                "api/2.0/mlflow-artifacts/artifacts/{root}/{artifact_path}/{name}"
            ))?;
            let response = self.auth(self.http.put(url).body(bytes)).send()?;
            if !response.status().is_success() {
                let status = response.status();
                bail!(
                    "MLflow refused the artifact {name}: {status} {}",
                    crate::redact::redact(&response.text().unwrap_or_default())
                );
            }
        }
        Ok(())
    }

    /// Ends the run: `FINISHED`, `FAILED` or `KILLED`.
    pub fn finish(&self, status: &str) -> Result<()> {
        self.post(
            "runs/update",
            &json!({"run_id": self.run_id, "status": status, "end_time": now_ms()}),
        )
        .map(|_| ())
    }

    fn base(&self) -> Result<reqwest::Url> {
        let mut base = self.config.tracking_uri.trim_end_matches('/').to_string();
        base.push('/');
        reqwest::Url::parse(&base)
            .with_context(|| format!("MLFLOW_TRACKING_URI {:?} is not a URL", self.shown()))
    }

    fn url(&self, method: &str) -> Result<reqwest::Url> {
        Ok(self.base()?.join(&format!("api/2.0/mlflow/{method}"))?)
    }

    fn shown(&self) -> String {
        crate::redact::redact(&self.config.tracking_uri)
    }

    fn auth(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        match (&self.config.token, &self.config.basic) {
            (Some(token), _) => request.bearer_auth(token),
            (None, Some((user, password))) => request.basic_auth(user, Some(password)),
            (None, None) => request,
        }
    }

    fn post(&self, method: &str, body: &Value) -> Result<Value> {
        let response = self
            .auth(self.http.post(self.url(method)?).json(body))
            .send()
            .with_context(|| format!("MLflow at {} cannot be reached", self.shown()))?;
        let status = response.status();
        let text = response.text().unwrap_or_default();
        if !status.is_success() {
            bail!(
                "MLflow {method} answered {status}: {}",
                crate::redact::redact(&text)
            );
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
