//! What a training run needs from its caller besides the config ([`TrainEnv`]), and how the
//! run speaks back through it: lines for the person watching, events in the store, the
//! trackers of `report_to`. Only rank 0 speaks; the other ranks would repeat it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::plugin::Registry;
use crate::store::{RunEvent, Store};
use crate::train::dist::Comm;

/// What a training run needs from its caller besides the config.
#[derive(Clone, Default)]
pub struct TrainEnv {
    /// Where default models are cached (`DataDir::assets()`).
    pub assets_dir: PathBuf,
    /// Plugins, for the formatter.
    pub registry: Option<Registry>,
    /// The store and the run to record logged steps into.
    pub store: Option<(Store, String)>,
    /// `latest` or a checkpoint folder.
    pub resume_from_checkpoint: Option<String>,
    /// Draw a progress bar on the terminal.
    pub progress_bar: bool,
    /// Set to stop after the current step (the server's cancel).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Why `cancel` stopped the run when its user did not (a full disk): the run then ends
    /// failed with that reason instead of cancelled. `None`: every stop is the user's.
    pub stopped_because: Option<crate::eval::pipeline::StopReason>,
    /// Stop after this many steps of this invocation (tests: simulate an interruption).
    pub stop_after_steps: Option<usize>,
    /// When set at the moment the run stops early (a server shutdown), a checkpoint of the
    /// current step is written first, so that a resume loses no step.
    pub checkpoint_on_stop: Option<Arc<AtomicBool>>,
    /// Loss events of steps up to this one are already in the store (a resumed run redoes the
    /// steps after its checkpoint); they are not recorded twice.
    pub skip_loss_through: Option<u64>,
    /// The same for step events, counted apart: a step records its step event before its loss
    /// event, so a kill between the two leaves the step's loss to be recorded on the redo.
    pub skip_steps_through: Option<u64>,
    /// The trackers of `report_to`, started by [`run`].
    pub trackers: Option<Arc<std::sync::Mutex<crate::track::Trackers>>>,
    /// Data parallelism: this rank's communicator (`None`: one process, one device). Only
    /// rank 0 writes (checkpoints, `trainer_state.json`, the adapter, the store, trackers).
    pub comm: Option<Comm>,
    /// The GPU this rank trains on (`LOCAL_RANK`).
    pub device_ordinal: usize,
    /// Sum this rank's window of gradients in this many contiguous groups of micro-batches,
    /// in order, as that many ranks would before their all-reduce: how one process reproduces
    /// N ranks bit for bit (the data-parallel tests' reference). 0 or 1: one group.
    pub sum_in_groups: usize,
}

impl TrainEnv {
    pub(crate) fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    pub(crate) fn world_size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// Rank 0, the one that writes and reports.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// A line for the person watching: on the terminal, and in the run's events for the dashboard.
    /// Only rank 0 speaks; the others would repeat it.
    pub(crate) fn log(&self, message: String) {
        if !self.is_main() {
            return;
        }
        eprintln!("{message}");
        self.record(RunEvent::Log {
            level: "info".into(),
            message,
        });
    }

    pub(crate) fn record(&self, event: RunEvent) {
        if !self.is_main() {
            return;
        }
        if let Some(trackers) = &self.trackers {
            trackers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .event(&event);
        }
        // A resumed run redoes the steps after its checkpoint; the store has their events.
        let recorded = match &event {
            RunEvent::Loss { step, .. } => self.skip_loss_through.is_some_and(|t| *step <= t),
            RunEvent::Step { step, .. } => self.skip_steps_through.is_some_and(|t| *step <= t),
            _ => false,
        };
        if recorded {
            return;
        }
        if let Some((store, run_id)) = &self.store
            && let Err(e) = store.push_event(run_id, &event)
        {
            tracing::warn!("failed to record a training event: {e:#}");
        }
    }

    /// After a checkpoint: the store's record of the run is made durable as far as the checkpoint
    /// goes, so a crash loses no logged step that a resume would not redo.
    pub(crate) fn flush_store(&self) {
        if let Some((store, _)) = &self.store
            && let Err(e) = store.flush()
        {
            tracing::warn!("failed to flush the store: {e:#}");
        }
    }

    pub(crate) fn record_progress(&self, done: usize, total: usize) {
        if let Some((store, run_id)) = &self.store {
            let _ = store.update_run(run_id, |r| {
                r.progress.done = done as u64;
                r.progress.total = total as u64;
                r.progress.unit = "steps".into();
            });
            self.record(RunEvent::Progress {
                done: done as u64,
                total: total as u64,
                unit: "steps".into(),
            });
        }
    }
}
