//! The durable store: an embedded redb database under `--data-dir`.
//!
//! Every change is one write transaction committed with immediate durability, so what
//! an apply acknowledged survives a restart and a `kill -9`. Three tables: documents
//! (by `kind/namespace/name`), registrations (live workloads, kept so a restarted
//! control plane still knows endpoints while proxies reconnect), and metadata (the
//! revision counter).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

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

/// The database, reopened after an I/O error.
///
/// redb poisons a `Database` after an I/O error (every later transaction fails with
/// `PreviousIo`) even when the cause was transient (a full disk that was freed). The
/// store then drops that handle and opens the file anew at its next use: redb's
/// recovery on open goes back to the last commit that completed, so what an apply
/// acknowledged is kept and a commit that failed is not half there.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The database file.
    file: PathBuf,
    /// The file's name, for messages.
    path: String,
    /// The open database; `None` after an I/O error until it is reopened.
    db: RwLock<Option<Arc<Database>>>,
    /// The last write that failed with an I/O error and no write as large has
    /// succeeded since: the health check reports it and probes with a write that size.
    failed_write: Mutex<Option<FailedWrite>>,
}

/// A write that failed with an I/O error.
#[derive(Debug, Clone)]
struct FailedWrite {
    /// Why.
    message: String,
    /// About how many bytes it wrote (the values' sizes).
    bytes: usize,
}

/// The health probe's table: one row, written and removed by [`Store::check`].
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("health_probe");

/// True for the errors after which redb refuses every later transaction (until the
/// database is opened again).
fn is_io(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
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
            inner: Arc::new(Inner {
                file: path,
                path: label,
                db: RwLock::new(Some(Arc::new(db))),
                failed_write: Mutex::new(None),
            }),
        };
        // Make sure the tables exist, so reads never fail on a fresh database.
        store.write(0, |txn| {
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

    /// The open database, opening the file again when an I/O error closed it.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = &*self.inner.db.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(db.clone());
        }
        let mut slot = self.inner.db.write().unwrap_or_else(|e| e.into_inner());
        if let Some(db) = &*slot {
            // Another caller reopened it meanwhile.
            return Ok(db.clone());
        }
        // Fails with `DatabaseAlreadyOpen` while a transaction begun on the old
        // handle is still running: the next use tries again.
        let db = Database::create(&self.inner.file).map_err(|e| {
            self.message(format!(
                "cannot reopen the database after an I/O error: {e}"
            ))
        })?;
        tracing::warn!(path = %self.inner.path, "store reopened after an I/O error");
        let db = Arc::new(db);
        *slot = Some(db.clone());
        Ok(db)
    }

    /// A store error with this message.
    fn message(&self, message: impl Into<String>) -> StoreError {
        StoreError {
            path: self.inner.path.clone(),
            message: message.into(),
        }
    }

    /// A redb failure; after an I/O error the database is dropped, to be opened
    /// again at the next use (redb refuses everything on that handle from now on).
    fn fail(&self, e: impl Into<redb::Error>) -> StoreError {
        let e: redb::Error = e.into();
        if is_io(&e) {
            let old = self
                .inner
                .db
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if old.is_some() {
                tracing::error!(path = %self.inner.path, error = %e, "store I/O error; the database will be reopened");
            }
        }
        self.message(e.to_string())
    }

    /// Runs `f` in a write transaction and commits it (immediate durability).
    /// `bytes` is about what it writes: a write that fails with an I/O error is
    /// remembered with its size until a write as large succeeds.
    fn write<T>(
        &self,
        bytes: usize,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let result: Result<T, StoreError> = (|| {
            let txn = self.db()?.begin_write().map_err(|e| self.fail(e))?;
            let out = f(&txn).map_err(|e| self.fail(e))?;
            txn.commit().map_err(|e| self.fail(e))?;
            Ok(out)
        })();
        let mut failed = self
            .inner
            .failed_write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => {
                if failed.as_ref().is_some_and(|f| f.bytes <= bytes) {
                    *failed = None;
                }
            }
            Err(e) => {
                // Closed after an I/O error: remember it for the health check.
                let closed = self
                    .inner
                    .db
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none();
                if closed {
                    let bytes = failed.as_ref().map_or(bytes, |f| f.bytes.max(bytes));
                    *failed = Some(FailedWrite {
                        message: e.message.clone(),
                        bytes,
                    });
                }
            }
        }
        result
    }

    /// Runs `f` in a read transaction.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db()?.begin_read().map_err(|e| self.fail(e))?;
        f(&txn)
    }

    /// The current revision (0 for an empty store).
    pub fn revision(&self) -> Result<u64, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(META).map_err(|e| self.fail(e))?;
            Ok(t.get("revision")
                .map_err(|e| self.fail(e))?
                .map(|v| v.value())
                .unwrap_or(0))
        })
    }

    /// Every stored document.
    pub fn documents(&self) -> Result<Vec<StoredDoc>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(DOCUMENTS).map_err(|e| self.fail(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.fail(e))? {
                let (k, v) = row.map_err(|e| self.fail(e))?;
                let doc: StoredDoc = serde_json::from_slice(v.value())
                    .map_err(|e| self.message(format!("document {} is corrupt: {e}", k.value())))?;
                out.push(doc);
            }
            Ok(out)
        })
    }

    /// Every stored registration.
    pub fn registrations(&self) -> Result<Vec<StoredRegistration>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(REGISTRATIONS).map_err(|e| self.fail(e))?;
            let mut out = Vec::new();
            for row in t.iter().map_err(|e| self.fail(e))? {
                let (k, v) = row.map_err(|e| self.fail(e))?;
                let r: StoredRegistration = serde_json::from_slice(v.value()).map_err(|e| {
                    self.message(format!("registration {} is corrupt: {e}", k.value()))
                })?;
                out.push(r);
            }
            Ok(out)
        })
    }

    /// Stores `upserts` and removes `deletes` in one transaction; returns the new
    /// revision. The documents' `revision` fields are set to it.
    ///
    /// When the commit fails, the revision is read again (from the database opened
    /// anew after an I/O error): a commit whose error came after it was durable
    /// (a failed final sync) is reported as done, so the caller's view and the
    /// file agree either way.
    pub fn commit(
        &self,
        upserts: &mut [StoredDoc],
        deletes: &[ResourceKey],
    ) -> Result<u64, StoreError> {
        let rev = self.revision()? + 1;
        let mut rows = Vec::with_capacity(upserts.len());
        for d in upserts.iter_mut() {
            d.revision = rev;
            let bytes = serde_json::to_vec(&*d)
                .map_err(|e| self.message(format!("document {}: {e}", d.key)))?;
            rows.push((key_str(&d.key), bytes));
        }
        let size = rows.iter().map(|(k, v)| k.len() + v.len()).sum();
        let written = self.write(size, |txn| {
            let mut docs = txn.open_table(DOCUMENTS)?;
            for (k, v) in &rows {
                docs.insert(k.as_str(), v.as_slice())?;
            }
            for k in deletes {
                docs.remove(key_str(k).as_str())?;
            }
            let mut meta = txn.open_table(META)?;
            meta.insert("revision", rev)?;
            Ok(())
        });
        match written {
            Ok(()) => Ok(rev),
            Err(e) => match self.revision() {
                Ok(now) if now == rev => {
                    tracing::warn!(path = %self.inner.path, error = %e, revision = rev, "a commit reported an error but is durable");
                    Ok(rev)
                }
                _ => Err(e),
            },
        }
    }

    /// Records (or refreshes) a registration.
    pub fn put_registration(&self, r: &StoredRegistration) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(r)
            .map_err(|e| self.message(format!("registration {}: {e}", r.proxy)))?;
        self.write(bytes.len(), |txn| {
            txn.open_table(REGISTRATIONS)?
                .insert(r.proxy.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Forgets a registration.
    pub fn remove_registration(&self, proxy: &str) -> Result<(), StoreError> {
        self.write(0, |txn| {
            txn.open_table(REGISTRATIONS)?.remove(proxy)?;
            Ok(())
        })
    }

    /// Stores a token binding under its hash.
    pub fn put_token(&self, hash: &str, t: &StoredToken) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(t).map_err(|e| self.message(format!("token binding: {e}")))?;
        self.write(bytes.len(), |txn| {
            txn.open_table(TOKENS)?.insert(hash, bytes.as_slice())?;
            Ok(())
        })
    }

    /// The binding of a token hash, if any.
    pub fn token(&self, hash: &str) -> Result<Option<StoredToken>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(TOKENS).map_err(|e| self.fail(e))?;
            let Some(v) = t.get(hash).map_err(|e| self.fail(e))? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| self.message(format!("token binding is corrupt: {e}")))
        })
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
        // Store failures go through `fail`, so an I/O error reopens the database.
        let store_err = |e: redb::Error| SpendError::Store(self.fail(e).to_string());
        let txn = self
            .db()
            .map_err(|e| SpendError::Store(e.to_string()))?
            .begin_write()
            .map_err(|e| store_err(e.into()))?;
        let result = (|| {
            let mut t = txn.open_table(TOKENS).map_err(|e| store_err(e.into()))?;
            let stored: StoredToken = {
                let Some(v) = t.get(hash).map_err(|e| store_err(e.into()))? else {
                    return Err(SpendError::Unknown);
                };
                serde_json::from_slice(v.value())
                    .map_err(|e| SpendError::Store(format!("token binding is corrupt: {e}")))?
            };
            if stored.expires_unix < now_unix {
                t.remove(hash).map_err(|e| store_err(e.into()))?;
                return Ok(Err(SpendError::Expired));
            }
            if stored.namespace != namespace {
                return Err(SpendError::Namespace(stored.namespace));
            }
            match stored.uses_left {
                Some(n) if n <= 1 => {
                    t.remove(hash).map_err(|e| store_err(e.into()))?;
                }
                Some(n) => {
                    let mut next = stored.clone();
                    next.uses_left = Some(n - 1);
                    let bytes = serde_json::to_vec(&next).map_err(|e| {
                        SpendError::Store(self.message(format!("token binding: {e}")).to_string())
                    })?;
                    t.insert(hash, bytes.as_slice())
                        .map_err(|e| store_err(e.into()))?;
                }
                None => {}
            }
            Ok(Ok(stored))
        })();
        match result {
            // Committed: a use was spent, or an expired token was cleared away.
            Ok(outcome) => {
                txn.commit().map_err(|e| store_err(e.into()))?;
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
        self.write(0, |txn| {
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
        self.write(0, |txn| {
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
        let bytes = serde_json::to_vec(c)
            .map_err(|e| self.message(format!("credential {}: {e}", c.name)))?;
        self.write(bytes.len(), |txn| {
            txn.open_table(CREDENTIALS)?
                .insert(fingerprint, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Every credential, with its fingerprint.
    pub fn credentials(&self) -> Result<Vec<(String, StoredCredential)>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(CREDENTIALS).map_err(|e| self.fail(e))?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(|e| self.fail(e))? {
                let (k, v) = entry.map_err(|e| self.fail(e))?;
                if let Ok(c) = serde_json::from_slice::<StoredCredential>(v.value()) {
                    out.push((k.value().to_owned(), c));
                }
            }
            Ok(out)
        })
    }

    /// True when the credential with this fingerprint was revoked, or its `name`
    /// was revoked after it was issued (`not_before_unix`); read in one
    /// transaction. An unreadable store counts as revoked: refuse rather than let a
    /// revoked credential through.
    pub fn credential_revoked(&self, fingerprint: &str, name: &str, not_before_unix: i64) -> bool {
        let check = |txn: &redb::ReadTransaction| -> Result<bool, redb::Error> {
            if let Some(v) = txn.open_table(CREDENTIALS)?.get(fingerprint)?
                && serde_json::from_slice::<StoredCredential>(v.value()).is_ok_and(|c| c.revoked)
            {
                return Ok(true);
            }
            Ok(txn
                .open_table(REVOKED_NAMES)?
                .get(name)?
                .is_some_and(|at| crate::shared::revoked_since(not_before_unix, at.value())))
        };
        self.read(|txn| check(txn).map_err(|e| self.fail(e)))
            .unwrap_or(true)
    }

    /// Marks every credential named `name` revoked, and the name as of now; returns
    /// how many recorded credentials were.
    pub fn revoke_credentials(&self, name: &str) -> Result<usize, StoreError> {
        let all = self.credentials()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.write(0, |txn| {
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

    /// The health check: the database opens (again, after an I/O error), a read
    /// transaction succeeds, and so does a write. The write is a few bytes while
    /// writes succeed; after one failed with an I/O error it is as large as that one
    /// (written, then removed), so a store whose disk is still full is reported
    /// broken until a write of that size fits again. Returns the revision.
    pub fn check(&self) -> Result<u64, StoreError> {
        let revision = self.revision()?;
        let failed = self
            .inner
            .failed_write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let size = failed.as_ref().map_or(8, |f| f.bytes.max(8));
        let probe = vec![0u8; size];
        let probed = self
            .write(size, |txn| {
                txn.open_table(PROBE)?.insert("probe", probe.as_slice())?;
                Ok(())
            })
            .and_then(|()| {
                // Not kept: the probe's pages are free for the next write.
                self.write(0, |txn| {
                    txn.open_table(PROBE)?.remove("probe")?;
                    Ok(())
                })
            });
        match (probed, failed) {
            (Ok(()), _) => Ok(revision),
            (Err(e), Some(f)) => Err(self.message(format!(
                "a write of {size} bytes fails: {}; the last write that failed: {}",
                e.message, f.message
            ))),
            (Err(e), None) => {
                Err(self.message(format!("a write of {size} bytes fails: {}", e.message)))
            }
        }
    }
}
