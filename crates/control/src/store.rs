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
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// Credential names revoked, with when (seconds since the epoch): a certificate of
/// that name issued before then is refused, even one this store has no record of
/// (issued by another replica sharing the CA).
const REVOKED_NAMES: TableDefinition<&str, i64> = TableDefinition::new("revoked_credential_names");

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
    /// Bootstraps left; the token is removed when it reaches zero. `None` for a
    /// token stored before tokens were counted (usable until it expires).
    #[serde(default)]
    pub uses_left: Option<u32>,
    /// The id shown by `sinew token list` (a prefix of the hash, not a secret).
    #[serde(default)]
    pub id: String,
    /// When it was created, seconds since the epoch.
    #[serde(default)]
    pub created_unix: i64,
    /// The operator credential that created it.
    #[serde(default)]
    pub created_by: String,
}

/// Why a token could not be spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpendError {
    /// No such token (never issued, spent, or revoked).
    Unknown,
    /// It expired.
    Expired,
    /// It is for another namespace.
    Namespace(String),
    /// The store failed.
    Store(String),
}

/// An operator credential, stored under the SHA-256 of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCredential {
    /// Who holds it.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// Expiry, seconds since the epoch.
    pub expires_unix: i64,
    /// Created, seconds since the epoch.
    pub created_unix: i64,
    /// Revoked: every call with it is refused.
    #[serde(default)]
    pub revoked: bool,
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
            txn.open_table(CREDENTIALS)?;
            txn.open_table(REVOKED_NAMES)?;
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

    /// Spends one use of the token with this hash, for a proxy in `namespace`:
    /// checked and counted in one write transaction, so two proxies racing with a
    /// single-use token cannot both win. A token whose uses run out is removed;
    /// an expired one is removed too.
    pub fn spend_token(
        &self,
        hash: &str,
        namespace: &str,
        now_unix: i64,
    ) -> Result<StoredToken, SpendError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| SpendError::Store(e.to_string()))?;
        let result = (|| {
            let mut t = txn
                .open_table(TOKENS)
                .map_err(|e| SpendError::Store(e.to_string()))?;
            let stored: StoredToken = {
                let Some(v) = t.get(hash).map_err(|e| SpendError::Store(e.to_string()))? else {
                    return Err(SpendError::Unknown);
                };
                serde_json::from_slice(v.value())
                    .map_err(|e| SpendError::Store(format!("token binding is corrupt: {e}")))?
            };
            if stored.expires_unix < now_unix {
                t.remove(hash)
                    .map_err(|e| SpendError::Store(e.to_string()))?;
                return Ok(Err(SpendError::Expired));
            }
            if stored.namespace != namespace {
                return Err(SpendError::Namespace(stored.namespace));
            }
            match stored.uses_left {
                Some(n) if n <= 1 => {
                    t.remove(hash)
                        .map_err(|e| SpendError::Store(e.to_string()))?;
                }
                Some(n) => {
                    let mut next = stored.clone();
                    next.uses_left = Some(n - 1);
                    let bytes =
                        serde_json::to_vec(&next).map_err(|e| SpendError::Store(e.to_string()))?;
                    t.insert(hash, bytes.as_slice())
                        .map_err(|e| SpendError::Store(e.to_string()))?;
                }
                None => {}
            }
            Ok(Ok(stored))
        })();
        match result {
            // Committed: a use was spent, or an expired token was cleared away.
            Ok(outcome) => {
                txn.commit().map_err(|e| SpendError::Store(e.to_string()))?;
                outcome
            }
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// Every stored token binding (with its hash), expired ones removed first.
    pub fn tokens(&self, now_unix: i64) -> Result<Vec<(String, StoredToken)>, StoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(TOKENS)?;
            let mut out = Vec::new();
            let mut expired = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                let Ok(tok) = serde_json::from_slice::<StoredToken>(v.value()) else {
                    continue;
                };
                if tok.expires_unix < now_unix {
                    expired.push(k.value().to_owned());
                } else {
                    out.push((k.value().to_owned(), tok));
                }
            }
            for k in expired {
                t.remove(k.as_str())?;
            }
            Ok(out)
        })
    }

    /// Removes the tokens whose id or hash is `id`; returns how many.
    pub fn revoke_token(&self, id: &str, now_unix: i64) -> Result<usize, StoreError> {
        let hashes: Vec<String> = self
            .tokens(now_unix)?
            .into_iter()
            .filter(|(h, t)| !id.is_empty() && (t.id == id || h == id))
            .map(|(h, _)| h)
            .collect();
        self.write(|txn| {
            let mut t = txn.open_table(TOKENS)?;
            for h in &hashes {
                t.remove(h.as_str())?;
            }
            Ok(hashes.len())
        })
    }

    /// Stores an operator credential under its certificate's SHA-256.
    pub fn put_credential(
        &self,
        fingerprint: &str,
        c: &StoredCredential,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(c).map_err(|e| self.fail(e))?;
        self.write(|txn| {
            txn.open_table(CREDENTIALS)?
                .insert(fingerprint, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every credential, with its fingerprint.
    pub fn credentials(&self) -> Result<Vec<(String, StoredCredential)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = txn.open_table(CREDENTIALS).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.fail(e))? {
            let (k, v) = entry.map_err(|e| self.fail(e))?;
            if let Ok(c) = serde_json::from_slice::<StoredCredential>(v.value()) {
                out.push((k.value().to_owned(), c));
            }
        }
        Ok(out)
    }

    /// True when the credential with this fingerprint was revoked, or its `name`
    /// was revoked after it was issued (`not_before_unix`); read in one
    /// transaction. An unreadable store counts as revoked: refuse rather than let a
    /// revoked credential through.
    pub fn credential_revoked(&self, fingerprint: &str, name: &str, not_before_unix: i64) -> bool {
        let check = || -> Result<bool, redb::Error> {
            let txn = self.db.begin_read()?;
            if let Some(v) = txn.open_table(CREDENTIALS)?.get(fingerprint)?
                && serde_json::from_slice::<StoredCredential>(v.value()).is_ok_and(|c| c.revoked)
            {
                return Ok(true);
            }
            // notBefore is backdated a minute (clock slack): a certificate whose
            // notBefore is before the revocation was issued before it, or just after.
            Ok(txn
                .open_table(REVOKED_NAMES)?
                .get(name)?
                .is_some_and(|at| not_before_unix + 60 <= at.value()))
        };
        check().unwrap_or(true)
    }

    /// Marks every credential named `name` revoked, and the name as of now; returns
    /// how many recorded credentials were.
    pub fn revoke_credentials(&self, name: &str) -> Result<usize, StoreError> {
        let all = self.credentials()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.write(|txn| {
            txn.open_table(REVOKED_NAMES)?.insert(name, now)?;
            let mut t = txn.open_table(CREDENTIALS)?;
            let mut n = 0;
            for (fp, mut c) in all {
                if c.name == name && !c.revoked {
                    c.revoked = true;
                    let bytes = serde_json::to_vec(&c)
                        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
                    t.insert(fp.as_str(), bytes.as_slice())?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    /// A cheap health check: a read transaction succeeds.
    pub fn check(&self) -> Result<u64, StoreError> {
        self.revision()
    }
}
