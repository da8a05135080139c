//! The durable store: an embedded redb database under `--data-dir`.
//!
//! Every change is one write transaction committed with immediate durability, so what
//! an apply acknowledged survives a restart and a `kill -9`. Three tables: documents
//! (by `kind/namespace/name`), registrations (live workloads, kept so a restarted
//! control plane still knows endpoints while proxies reconnect), and metadata (the
//! revision counter).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sinew_model::resource::ResourceKey;

const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
const REGISTRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("registrations");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[error("store {path}: {message}")]
pub struct StoreError {
    path: String,
    message: String,
}

/// A document as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDoc {
    /// Its key.
    pub key: ResourceKey,
    /// The document as JSON.
    pub json: String,
    /// Where it came from: `api` or `dir`.
    pub source: String,
    /// The store revision of its last change.
    pub revision: u64,
}

/// A join token's binding (stored under the token's SHA-256, never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    /// Namespace of the identity.
    pub namespace: String,
    /// Service account of the identity.
    pub service_account: String,
    /// Expiry, seconds since the epoch.
    pub expires_unix: i64,
}

/// A workload registered by a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRegistration {
    /// `namespace/name` of the proxy.
    pub proxy: String,
    /// The Workload document the registration stands for, as JSON.
    pub workload_json: String,
    /// When the proxy was last seen (ms since the epoch).
    pub last_seen_ms: u64,
}

/// The database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn key_str(k: &ResourceKey) -> String {
    format!("{}/{}/{}", k.kind, k.namespace, k.name)
}

impl Store {
    /// Opens (or creates) the database in `dir`, creating the directory with
    /// owner-only permissions.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("sinew.redb");
        let label = path.display().to_string();
        let err = |message: String| StoreError {
            path: label.clone(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create the data directory: {e}")))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        let store = Store {
            db: Arc::new(db),
            path: label,
        };
        // Make sure the tables exist, so reads never fail on a fresh database.
        store.write(|txn| {
            txn.open_table(DOCUMENTS)?;
            txn.open_table(REGISTRATIONS)?;
            txn.open_table(META)?;
            txn.open_table(TOKENS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        let out = f(&txn).map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))?;
        Ok(out)
    }

    /// The current revision (0 for an empty store).
    pub fn revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(META).map_err(|e| self.fail(e))?;
        Ok(t.get("revision")
            .map_err(|e| self.fail(e))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Every stored document.
    pub fn documents(&self) -> Result<Vec<StoredDoc>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(DOCUMENTS).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.fail(e))? {
            let (k, v) = row.map_err(|e| self.fail(e))?;
            let doc: StoredDoc = serde_json::from_slice(v.value())
                .map_err(|e| self.fail(format!("document {} is corrupt: {e}", k.value())))?;
            out.push(doc);
        }
        Ok(out)
    }

    /// Every stored registration.
    pub fn registrations(&self) -> Result<Vec<StoredRegistration>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(REGISTRATIONS).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.fail(e))? {
            let (k, v) = row.map_err(|e| self.fail(e))?;
            let r: StoredRegistration = serde_json::from_slice(v.value())
                .map_err(|e| self.fail(format!("registration {} is corrupt: {e}", k.value())))?;
            out.push(r);
        }
        Ok(out)
    }

    /// Stores `upserts` and removes `deletes` in one transaction; returns the new
    /// revision. The documents' `revision` fields are set to it.
    pub fn commit(
        &self,
        upserts: &mut [StoredDoc],
        deletes: &[ResourceKey],
    ) -> Result<u64, StoreError> {
        let rev = self.revision()? + 1;
        for d in upserts.iter_mut() {
            d.revision = rev;
        }
        self.write(|txn| {
            let mut docs = txn.open_table(DOCUMENTS)?;
            for d in upserts.iter() {
                let bytes =
                    serde_json::to_vec(d).map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                docs.insert(key_str(&d.key).as_str(), bytes.as_slice())?;
            }
            for k in deletes {
                docs.remove(key_str(k).as_str())?;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("revision", rev)?;
            Ok(())
        })?;
        Ok(rev)
    }

    /// Records (or refreshes) a registration.
    pub fn put_registration(&self, r: &StoredRegistration) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(r).map_err(|e| self.fail(e))?;
        self.write(|txn| {
            txn.open_table(REGISTRATIONS)?
                .insert(r.proxy.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Forgets a registration.
    pub fn remove_registration(&self, proxy: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(REGISTRATIONS)?.remove(proxy)?;
            Ok(())
        })
    }

    /// Stores a token binding under its hash.
    pub fn put_token(&self, hash: &str, t: &StoredToken) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(t).map_err(|e| self.fail(e))?;
        self.write(|txn| {
            txn.open_table(TOKENS)?.insert(hash, bytes.as_slice())?;
            Ok(())
        })
    }

    /// The binding of a token hash, if any.
    pub fn token(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(TOKENS).map_err(|e| self.fail(e))?;
        let Some(v) = t.get(hash).map_err(|e| self.fail(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| self.fail(format!("token binding is corrupt: {e}")))
    }

    /// A cheap health check: a read transaction succeeds.
    pub fn check(&self) -> Result<u64, StoreError> {
        self.revision()
    }
}
