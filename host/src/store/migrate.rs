//! Schema versions and the migrations between them. A migration rewrites records of the
//! previous version in place; they run in order when a store is opened.

use std::path::Path;

use crate::store::{Requests, SCHEMA_VERSION, StoreError, tree};

const KEY: &[u8] = b"schema_version";

/// One step of the store's schema.
type Migration = fn(&sled::Db, &Requests) -> Result<(), StoreError>;

/// Each entry migrates from version `i + 1` to `i + 2`.
const MIGRATIONS: &[Migration] = &[requests_apart];

pub(crate) fn run(db: &sled::Db, path: &Path, requests: &Requests) -> Result<(), StoreError> {
    let meta = db.open_tree(tree::META)?;
    let found = match meta.get(KEY)? {
        None => {
            // A new store starts at the current version.
            meta.insert(KEY, &SCHEMA_VERSION.to_be_bytes())?;
            return Ok(());
        }
        Some(v) => u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0, 0, 0, 1])),
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.display().to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for version in found..SCHEMA_VERSION {
        let migrate = MIGRATIONS[(version - 1) as usize];
        migrate(db, requests)?;
        meta.insert(KEY, &(version + 1).to_be_bytes())?;
        tracing::info!(
            "migrated the store from schema {version} to {}",
            version + 1
        );
    }
    Ok(())
}

/// 1 → 2: a run's `request` moves out of its record into a file of its own (see `Requests`).
/// An evaluation's request holds every row, so the record it made big was rewritten at each
/// progress update and decoded by every listing.
fn requests_apart(db: &sled::Db, requests: &Requests) -> Result<(), StoreError> {
    let runs = db.open_tree(tree::RUNS)?;
    for item in runs.iter() {
        let (key, value) = item?;
        let corrupt = |source| StoreError::Corrupt {
            tree: tree::RUNS,
            key: String::from_utf8_lossy(&key).into_owned(),
            source,
        };
        let mut run: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&value).map_err(corrupt)?;
        let Some(request) = run.remove("request") else {
            continue;
        };
        if !request.is_null() {
            requests.put(
                &String::from_utf8_lossy(&key),
                serde_json::to_vec(&request)?,
            )?;
        }
        runs.insert(&key, serde_json::to_vec(&run)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::migrate::KEY;
    use crate::store::{RunStatus, Store, tree};

    #[test]
    fn schema_1_runs_give_their_requests_to_files() {
        let dir = std::env::temp_dir().join(format!(
            "adapterlab-migrate-test-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        {
            let db = sled::Config::new().path(&dir).open().unwrap();
            db.open_tree(tree::META)
                .unwrap()
                .insert(KEY, &1u32.to_be_bytes())
                .unwrap();
            let runs = db.open_tree(tree::RUNS).unwrap();
            let v1 = |id: &str, request: &str| {
                format!(
                    r#"{{"id":"{id}","name":"n","kind":"eval","status":"done","created":"2026-11-26T00:00:00Z","request":{request}}}"#
                )
            };
            runs.insert("a", v1("a", r#"{"rows":[{"id":"x"}]}"#).as_bytes())
                .unwrap();
            runs.insert("b", v1("b", "null").as_bytes()).unwrap();
            db.flush().unwrap();
        }

        let store = Store::open(&dir).unwrap();
        let a = store.get_run("a").unwrap().unwrap();
        assert_eq!(a.status, RunStatus::Done);
        let request: serde_json::Value = store.request("a").unwrap().unwrap();
        assert_eq!(request["rows"][0]["id"], "x");
        assert!(dir.join("requests/a.json").is_file());
        assert_eq!(store.request::<serde_json::Value>("b").unwrap(), None);
        let raw = store.runs.get("a").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("request"));
        let meta = store.db.open_tree(tree::META).unwrap();
        assert_eq!(meta.get(KEY).unwrap().unwrap().as_ref(), 2u32.to_be_bytes());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
