//! The models a server keeps loaded. A base is loaded once, on first use, and kept: the served
//! one (`serve --model`) for good, one other at a time. Adapters are attached to a base
//! unmerged (`adapterlab_model::engine::with_adapter`): the copy shares the base's frozen
//! weights, so switching adapters per request costs the adapter's tensors, never a reload.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use adapterlab_model::engine::LoadedModel;
use adapterlab_model::engine::{Engine, Quantize, load_model, with_adapter};
use anyhow::{Context as _, Result};

/// Adapted models kept ready; older ones are rebuilt on demand (cheap: the base stays).
const ADAPTERS_KEPT: usize = 4;

type Slot = Arc<Mutex<Option<Arc<LoadedModel>>>>;

pub struct Models {
    rt: Engine,
    served: String,
    bases: Mutex<Vec<(String, Slot)>>,
    adapters: Mutex<VecDeque<(AdapterKey, Arc<LoadedModel>)>>,
    device: Mutex<()>,
}

/// An adapter folder as it is now: retraining into the same folder makes a new key.
#[derive(Debug, Clone, PartialEq)]
struct AdapterKey {
    base: String,
    dir: PathBuf,
    modified: Option<SystemTime>,
}

impl Models {
    pub fn new(rt: Engine, served: impl Into<String>) -> Self {
        Models {
            rt,
            served: served.into(),
            bases: Mutex::new(Vec::new()),
            adapters: Mutex::new(VecDeque::new()),
            device: Mutex::new(()),
        }
    }

    /// The base model served by default (`serve --model`).
    pub fn served(&self) -> &str {
        &self.served
    }

    pub fn runtime(&self) -> &Engine {
        &self.rt
    }

    /// Held around each model computation (a generation batch, a chat answer), so requests and
    /// jobs take turns on the device instead of thrashing it.
    pub fn device(&self) -> &Mutex<()> {
        &self.device
    }

    pub fn lock_device(&self) -> MutexGuard<'_, ()> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `model` (loaded on first use) with the adapter in `adapter` on top, if any.
    pub fn get(&self, model: &str, adapter: Option<&Path>) -> Result<Arc<LoadedModel>> {
        let base = self.base(model)?;
        let Some(dir) = adapter else {
            return Ok(base);
        };
        let key = AdapterKey {
            base: model.to_string(),
            dir: dir.to_path_buf(),
            modified: std::fs::metadata(dir.join("adapter_model.safetensors"))
                .and_then(|m| m.modified())
                .ok(),
        };
        if let Some((_, m)) = self.adapters().iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let adapted = Arc::new(with_adapter(&base, dir)?);
        let mut adapters = self.adapters();
        adapters.retain(|(k, _)| *k != key);
        adapters.push_front((key, adapted.clone()));
        adapters.truncate(ADAPTERS_KEPT);
        Ok(adapted)
    }

    fn adapters(&self) -> MutexGuard<'_, VecDeque<(AdapterKey, Arc<LoadedModel>)>> {
        self.adapters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base(&self, model: &str) -> Result<Arc<LoadedModel>> {
        let slot = {
            let mut bases = self.bases.lock().unwrap_or_else(|e| e.into_inner());
            match bases.iter().find(|(name, _)| name == model) {
                Some((_, slot)) => slot.clone(),
                None => {
                    // Keep the served base and this one; another base in memory goes (those
                    // still in use live on until their requests finish).
                    let evicted: Vec<String> = bases
                        .iter()
                        .filter(|(name, _)| *name != self.served)
                        .map(|(name, _)| name.clone())
                        .collect();
                    bases.retain(|(name, _)| !evicted.contains(name));
                    self.adapters().retain(|(k, _)| !evicted.contains(&k.base));
                    let slot: Slot = Arc::default();
                    bases.push((model.to_string(), slot.clone()));
                    slot
                }
            }
        };
        // One load per base: concurrent first requests wait for it rather than load it twice.
        let mut loaded = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = loaded.as_ref() {
            return Ok(m.clone());
        }
        tracing::info!("loading model {model}");
        let m = Arc::new(
            load_model(model, None, Quantize::None, &self.rt)
                .with_context(|| format!("failed to load model {model}"))?,
        );
        *loaded = Some(m.clone());
        Ok(m)
    }
}
