//! `adapterlab store check`: read every record of every keyspace (and every kept request) as
//! the type it must be, report what cannot be read, and on request quarantine it: moved, byte
//! for byte, into the `quarantine` keyspace, so nothing is lost and nothing blocks reading.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{
    AdapterRecord, PluginRecord, REQUESTS, Requests, Result, RunEvent, RunRecord, SampleRecord,
    Store, tree,
};

/// The keyspace quarantined records are moved to; nothing reads it but a person.
const QUARANTINE: &str = "quarantine";

/// One record that cannot be read.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub tree: String,
    pub key: String,
    pub reason: String,
}

/// What `check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Records read, by keyspace.
    pub records: std::collections::BTreeMap<String, u64>,
    pub problems: Vec<Problem>,
    /// How many problems were moved to the quarantine keyspace (with `repair`).
    pub quarantined: u64,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Read every record; with `repair`, move the unreadable ones into quarantine.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        self.check_tree::<RunRecord>(&self.runs, tree::RUNS, repair, &mut report)?;
        self.check_tree::<SampleRecord>(&self.samples, tree::SAMPLES, repair, &mut report)?;
        self.check_tree::<RunEvent>(&self.events, tree::EVENTS, repair, &mut report)?;
        self.check_tree::<AdapterRecord>(&self.adapters, tree::ADAPTERS, repair, &mut report)?;
        self.check_tree::<PluginRecord>(&self.plugins, tree::PLUGINS, repair, &mut report)?;
        self.check_tree::<serde_json::Value>(
            &self.llm_cache,
            tree::LLM_CACHE,
            repair,
            &mut report,
        )?;
        self.check_requests(repair, &mut report)?;
        if repair && report.quarantined > 0 {
            self.flush()?;
        }
        Ok(report)
    }

    fn check_tree<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        repair: bool,
        report: &mut CheckReport,
    ) -> Result<()> {
        let mut bad = Vec::new();
        let mut count = 0u64;
        for item in tree.iter() {
            let (key, value) = item?;
            count += 1;
            if let Err(e) = serde_json::from_slice::<T>(&value) {
                bad.push((key, value, e.to_string()));
            }
        }
        report.records.insert(name.to_string(), count);
        for (key, value, reason) in bad {
            report.problems.push(Problem {
                tree: name.to_string(),
                key: printable_key(&key),
                reason,
            });
            if repair {
                self.quarantine(name, &key, &value)?;
                tree.remove(&key)?;
                report.quarantined += 1;
            }
        }
        Ok(())
    }

    /// Requests are files: one that is not JSON is moved aside the same way.
    fn check_requests(&self, repair: bool, report: &mut CheckReport) -> Result<()> {
        let Requests::Files(dir) = &self.requests else {
            return Ok(());
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(crate::store::StoreError::Io {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut count = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(run_id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            count += 1;
            let reason = match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(_) => continue,
                    Err(e) => {
                        if repair {
                            self.quarantine(REQUESTS, run_id.as_bytes(), &bytes)?;
                            let _ = std::fs::remove_file(&path);
                            report.quarantined += 1;
                        }
                        e.to_string()
                    }
                },
                Err(e) => e.to_string(),
            };
            report.problems.push(Problem {
                tree: REQUESTS.to_string(),
                key: run_id.to_string(),
                reason,
            });
        }
        report.records.insert(REQUESTS.to_string(), count);
        Ok(())
    }

    fn quarantine(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let quarantine = self.db.open_tree(QUARANTINE)?;
        let mut qkey = tree.as_bytes().to_vec();
        qkey.push(0);
        qkey.extend_from_slice(key);
        quarantine.insert(qkey, value)?;
        Ok(())
    }
}

/// Keys are UTF-8 run ids followed by a 0 byte and a big-endian number: show them so.
fn printable_key(key: &[u8]) -> String {
    match key.iter().position(|b| *b == 0) {
        Some(at) => {
            let (id, rest) = key.split_at(at);
            let number = rest[1..].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            format!("{}#{number}", String::from_utf8_lossy(id))
        }
        None => String::from_utf8_lossy(key).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::store::{RunKind, RunRecord, RunStatus, Store};

    #[test]
    fn an_unreadable_run_is_listed_reported_and_quarantined() {
        let store = Store::temporary().unwrap();
        store
            .put_run(&RunRecord::new("good".into(), "g".into(), RunKind::Eval))
            .unwrap();
        // What an older version wrote for an overflowed mean, and plain garbage.
        store
            .runs
            .insert(
                "bad1",
                br#"{"id":"bad1","name":"n","kind":"eval","status":"done","created":"x","progress":7}"#
                    .to_vec(),
            )
            .unwrap();
        store.runs.insert("bad2", b"\xff\x00".to_vec()).unwrap();

        let runs = store.list_runs().unwrap();
        assert_eq!(runs.len(), 3);
        let bad = runs.iter().find(|r| r.id == "bad1").unwrap();
        assert_eq!(bad.status, RunStatus::Corrupt);
        assert_eq!(bad.name, "n");
        assert!(bad.error.as_deref().unwrap().contains("store check"));
        assert!(
            store.update_run("bad1", |_| {}).is_err(),
            "never overwritten"
        );

        let report = store.check(false).unwrap();
        assert_eq!(report.problems.len(), 2, "{report:?}");
        assert_eq!(
            store.list_runs().unwrap().len(),
            3,
            "check alone changes nothing"
        );
        let report = store.check(true).unwrap();
        assert_eq!(report.quarantined, 2);
        assert!(store.check(false).unwrap().is_clean());
        assert_eq!(store.list_runs().unwrap().len(), 1);
        let quarantine = store.db.open_tree(super::QUARANTINE).unwrap();
        assert_eq!(quarantine.len(), 2, "kept byte for byte");
    }

    #[test]
    fn an_old_null_mean_reads_as_nan() {
        let store = Store::temporary().unwrap();
        store
            .runs
            .insert(
                "r",
                br#"{"id":"r","name":"n","kind":"eval","status":"done","created":"x",
                     "aggregates":{"big":{"mean":null,"low":null,"high":null}}}"#
                    .to_vec(),
            )
            .unwrap();
        let run = store.get_run("r").unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Done);
        assert!(run.aggregates["big"].mean.is_nan());
    }
}
