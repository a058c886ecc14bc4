//! The services behind plugins' `embed` and `chat` capabilities during an evaluation: the
//! host's encoder (loaded on first use) and its LLM client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::llm::LlmClient;
use crate::plugin::wit::types::{ChatRequest, ChatResponse, EncoderInfo, TokenEmbeddings};
use crate::plugin::{HostServices, Interrupt};

/// A loaded encoder that returns contextual token embeddings.
pub trait Encoder: Send + Sync {
    fn info(&self) -> EncoderInfo;
    fn embed(&self, texts: &[String]) -> Result<Vec<TokenEmbeddings>, String>;
}

/// Loads encoders by (model, layer); `None` means the default.
pub trait EncoderLoader: Send + Sync {
    fn load(&self, model: Option<&str>, layer: Option<u32>) -> Result<Arc<dyn Encoder>, String>;
}

/// An encoder as a metric asks for it: its model (`None`: the default) and layer.
type EncoderKey = (Option<String>, Option<u32>);

pub struct EvalServices {
    llm: Option<(LlmClient, tokio::runtime::Handle)>,
    encoders: Option<Arc<dyn EncoderLoader>>,
    loaded: Mutex<HashMap<EncoderKey, Arc<dyn Encoder>>>,
}

impl EvalServices {
    pub fn new(
        llm: Option<(LlmClient, tokio::runtime::Handle)>,
        encoders: Option<Arc<dyn EncoderLoader>>,
    ) -> Self {
        EvalServices {
            llm,
            encoders,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    fn encoder(&self, model: Option<&str>, layer: Option<u32>) -> Result<Arc<dyn Encoder>, String> {
        let key = (model.map(str::to_string), layer);
        if let Some(e) = self.loaded.lock().unwrap().get(&key) {
            return Ok(e.clone());
        }
        let loader = self
            .encoders
            .as_ref()
            .ok_or("no encoder is available in this host")?;
        // Loading takes seconds; holding the lock keeps two metrics from loading it twice.
        let mut loaded = self.loaded.lock().unwrap();
        if let Some(e) = loaded.get(&key) {
            return Ok(e.clone());
        }
        let encoder = loader.load(model, layer)?;
        loaded.insert(key, encoder.clone());
        Ok(encoder)
    }

    pub fn llm(&self) -> Option<&LlmClient> {
        self.llm.as_ref().map(|(c, _)| c)
    }

    /// The encoders plugins used, as `model (layer N)`, for the run's metadata.
    pub fn encoders_used(&self) -> Vec<String> {
        let loaded = self.loaded.lock().unwrap();
        let mut names: Vec<String> = loaded
            .values()
            .map(|e| e.info())
            .map(|i| format!("{} (layer {})", i.model, i.layer))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Record what stood behind the capabilities (LLM usage, encoders) on the run.
    pub fn record(&self, store: &crate::store::Store, run_id: &str) -> anyhow::Result<()> {
        let usage = self.llm().map(|l| l.usage());
        let encoders = self.encoders_used();
        store.update_run(run_id, |r| {
            if let Some(u) = &usage {
                r.usage = u.clone();
            }
            if !encoders.is_empty() {
                r.metadata.insert("encoder".into(), encoders.join(", "));
            }
        })?;
        Ok(())
    }
}

impl HostServices for EvalServices {
    fn encoder_info(&self, model: Option<&str>, layer: Option<u32>) -> Result<EncoderInfo, String> {
        Ok(self.encoder(model, layer)?.info())
    }

    fn embed(
        &self,
        model: Option<&str>,
        layer: Option<u32>,
        texts: &[String],
    ) -> Result<Vec<TokenEmbeddings>, String> {
        self.encoder(model, layer)?.embed(texts)
    }

    fn chat(&self, request: &ChatRequest, stop: &Interrupt) -> Result<ChatResponse, String> {
        let (client, handle) = self.llm.as_ref().ok_or("no LLM client is configured")?;
        handle.block_on(async {
            tokio::select! {
                response = client.complete(request) => response,
                reason = stopped(stop) => Err(format!("chat request abandoned: {reason}")),
            }
        })
    }

    fn chat_many(
        &self,
        requests: &[ChatRequest],
        stop: &Interrupt,
    ) -> Vec<Result<ChatResponse, String>> {
        let Some((client, handle)) = &self.llm else {
            return requests
                .iter()
                .map(|_| Err("no LLM client is configured".to_string()))
                .collect();
        };
        handle.block_on(async {
            tokio::select! {
                responses = client.complete_many(requests) => responses,
                reason = stopped(stop) => {
                    let e = format!("chat request abandoned: {reason}");
                    requests.iter().map(|_| Err(e.clone())).collect()
                }
            }
        })
    }
}

/// Resolves once `stop` says the calling plugin must stop. Dropping the request future that
/// raced it aborts the HTTP request, retries and back-off sleeps included.
async fn stopped(stop: &Interrupt) -> &'static str {
    loop {
        if let Some(reason) = stop.reason() {
            return reason;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The host's default encoder loader: the model core's BERT, assets in the data directory.
pub fn default_encoders(data_dir: &crate::paths::DataDir) -> Option<Arc<dyn EncoderLoader>> {
    Some(Arc::new(crate::eval::encoder::BertLoader {
        assets_dir: data_dir.assets(),
    }))
}
