//! Keeps a full disk from wedging the server. sled treats a failed write as fatal for the
//! whole database until it is reopened, so the server must stop writing before the disk is
//! full rather than after: a watcher checks the data directory's free space a few times a
//! second; below [`LOW`] it marks the server degraded, stops the running jobs (they are
//! marked failed), refuses new runs, and releases a reserve file it keeps, so that the
//! writes already under way find room. Once space is back above [`LOW`] + [`RESERVE`], the
//! reserve is taken again and new runs are accepted, without a restart.
//!
//! When a write failed anyway (the disk filled to its last byte faster than the watcher
//! looked), sled refuses every later write; once there is room again, the watcher asks the
//! server to reopen its store, which it does by executing itself again on the same listening
//! socket (`server::serve_on`): same process id, same port, queued connections kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Room kept back for writes in flight when the disk fills.
pub const RESERVE: u64 = 32 << 20;
/// Free space below which the disk counts as full.
pub const LOW: u64 = 8 << 20;

#[derive(Default)]
pub struct DiskState {
    full: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl DiskState {
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Free bytes on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn reserve_path(root: &Path) -> PathBuf {
    root.join(".reserve")
}

/// Writes the reserve file (zeros, synced, so the space is really taken).
fn take_reserve(root: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = reserve_path(root);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE) {
        return Ok(());
    }
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..(RESERVE >> 20) {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

/// Starts the watcher thread. `on_full` is called once each time the disk becomes full (to
/// stop the running jobs).
pub fn watch(
    root: PathBuf,
    state: Arc<DiskState>,
    on_full: impl Fn(&str) + Send + 'static,
    on_room: impl Fn() + Send + 'static,
    store_ok: impl Fn() -> Result<(), String> + Send + 'static,
    on_store_broken: impl Fn(&str) + Send + 'static,
) {
    if let Err(e) = take_reserve(&root) {
        tracing::warn!("cannot keep a reserve in the data directory: {e}");
        let _ = std::fs::remove_file(reserve_path(&root));
    }
    let spawned = std::thread::Builder::new()
        .name("disk-watch".into())
        .spawn(move || {
            let mut tick = 0u64;
            let mut broken_reported = false;
            loop {
                std::thread::sleep(Duration::from_millis(200));
                tick += 1;
                let Some(free) = free_bytes(&root) else {
                    continue;
                };
                // Once a second, with room on the disk: can the store still write?
                if tick.is_multiple_of(5)
                    && !state.is_full()
                    && free >= LOW
                    && !broken_reported
                    && let Err(e) = store_ok()
                {
                    broken_reported = true;
                    on_store_broken(&e);
                }
                let has_reserve = reserve_path(&root).exists();
                if !state.is_full() && free < LOW {
                    let reason = format!(
                        "the data directory's disk is full ({} KiB free); free some space",
                        free >> 10
                    );
                    tracing::error!("{reason}");
                    *state.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                    state.full.store(true, Ordering::SeqCst);
                    let _ = std::fs::remove_file(reserve_path(&root));
                    on_full(&reason);
                } else if state.is_full() && free >= if has_reserve { LOW } else { LOW + RESERVE } {
                    if !has_reserve && take_reserve(&root).is_err() {
                        let _ = std::fs::remove_file(reserve_path(&root));
                        continue;
                    }
                    tracing::info!("the data directory's disk has room again");
                    *state.reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    state.full.store(false, Ordering::SeqCst);
                    on_room();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch the data directory's disk: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_known_for_a_real_folder() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_bytes(tmp.path()).is_some_and(|b| b > 0));
    }
}
