//! Every limit the host puts on a plugin, in one place (the SDK's README lists them for
//! plugin authors): time, memory, and the size of everything a plugin hands back.
//!
//! A plugin's output ends up in the store, in `--json` files and on the dashboard; without
//! these bounds one plugin could make all three unusable (a 16 MiB error copied into every
//! sample, a megabyte-long score name printed in every warning).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Wall-clock time one call may take, time spent in host capabilities (`chat`, `embed`)
/// included, so a plugin that keeps retrying a dead LLM server still stops.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// Linear memory one instance may grow to.
pub const DEFAULT_MEMORY_BYTES: usize = 512 << 20;
/// Linear memory all instances alive at once may hold together (several metrics of one run,
/// several runs of one server).
pub const DEFAULT_TOTAL_MEMORY_BYTES: usize = 2 << 30;

/// Longest error string kept from a plugin (a sample's error, a batch's error, a trap).
pub const MAX_ERROR_BYTES: usize = 4096;
/// Longest score name quoted back in an error (declared names are at most 64 bytes).
pub const MAX_NAME_BYTES: usize = 128;
/// Log lines one call may write (through `log` or stdout/stderr together).
pub const LOG_LINES_PER_CALL: usize = 1000;
/// Bytes of log one call may write (through `log` or stdout/stderr together).
pub const LOG_BYTES_PER_CALL: usize = 64 << 10;
/// Longest single log line kept.
pub const MAX_LOG_LINE_BYTES: usize = 4096;
/// Bytes of stdout plus stderr one call may write; the rest is dropped (never an error: a
/// plugin that prints a little on every call must not start failing after many calls).
pub const STDIO_BYTES_PER_CALL: usize = 64 << 10;

/// `s` cut to at most `max` bytes at a character boundary, marked with how much was cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated {} bytes]", &s[..end], s.len() - end)
}

/// [`truncate`] to [`MAX_ERROR_BYTES`], for every error string that came from a plugin.
pub fn error_text(s: &str) -> String {
    truncate(s, MAX_ERROR_BYTES)
}

/// [`truncate`] to [`MAX_NAME_BYTES`], for names a plugin made up.
pub fn name_text(s: &str) -> String {
    truncate(s, MAX_NAME_BYTES)
}

/// The linear memory all live plugin instances may hold together. Each instance reserves
/// what it grows by and gives it back when it is dropped.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            used: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Take `bytes` from the budget, or nothing if they do not fit.
    pub fn reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    pub fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_marks_what_was_cut_and_keeps_characters_whole() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdef", 3), "abc…[truncated 3 bytes]");
        // 'é' is two bytes: a cut inside it moves back to its start.
        assert_eq!(truncate("aé", 2), "a…[truncated 2 bytes]");
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = MemoryBudget::new(100);
        let other = budget.clone();
        assert!(budget.reserve(60));
        assert!(!other.reserve(50));
        assert!(other.reserve(40));
        budget.release(60);
        assert!(other.reserve(50));
        assert_eq!(budget.used(), 90);
    }
}
