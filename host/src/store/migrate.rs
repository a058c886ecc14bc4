//! Schema versions and the migrations between them. A migration rewrites records of the
//! previous version in place; they run in order when a store is opened.

use std::path::Path;

use crate::store::{SCHEMA_VERSION, StoreError, tree};

const KEY: &[u8] = b"schema_version";

/// Each entry migrates from version `i + 1` to `i + 2`. Empty while only version 1 exists.
const MIGRATIONS: &[fn(&sled::Db) -> sled::Result<()>] = &[];

pub(crate) fn run(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
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
        migrate(db)?;
        meta.insert(KEY, &(version + 1).to_be_bytes())?;
        tracing::info!(
            "migrated the store from schema {version} to {}",
            version + 1
        );
    }
    Ok(())
}
