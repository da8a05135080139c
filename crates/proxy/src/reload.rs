//! Loading the configuration file and reloading it when it changes.
//!
//! The file is read and hashed on every tick (and on demand, e.g. SIGHUP); only a
//! changed hash is parsed. A file that fails to parse or validate is refused whole:
//! the previous snapshot stays in force and the problems are logged with file, line
//! and field. Runs on the admin thread, off the data-plane workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sinew_model::ProxyConfig;
use sinew_model::compile::compile_text;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::listeners::Listeners;
use crate::state::{Shared, SnapshotBuilder};

/// FNV-1a, 64 bit: a stable content hash for the configuration version.
pub(crate) fn fnv64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}

/// Applies compiled configurations: binds what is new, swaps the snapshot, then
/// starts and stops listeners. The single writer of snapshots and listeners, shared
/// by both configuration sources (a file, or the control plane).
#[derive(Debug)]
pub struct Applier {
    shared: Arc<Shared>,
    rt: Handle,
    builder: SnapshotBuilder,
    listeners: Listeners,
}

impl Applier {
    /// An applier for the data plane on `rt`.
    pub fn new(shared: Arc<Shared>, rt: Handle) -> Applier {
        let mut builder = SnapshotBuilder::default();
        builder.ejections = shared.metrics.ejections.clone();
        Applier {
            shared,
            rt,
            builder,
            listeners: Listeners::default(),
        }
    }

    /// Shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies `config` as `version`, or refuses it whole (listeners that cannot be
    /// bound) and keeps what runs.
    pub fn apply(&mut self, config: ProxyConfig, version: String) -> Result<u64, String> {
        let prepared = self.listeners.prepare(&config).map_err(|f| f.join("; "))?;
        let snap = Arc::new(self.builder.build(
            config,
            version.clone(),
            &self.shared.settings,
            &self.shared.certs,
        ));
        let generation = snap.generation;
        // Swap first, then start new listeners: a new listener must find its binding
        // in the snapshot it reads.
        self.shared.snapshot.store(Some(snap.clone()));
        let failures = self.listeners.commit(prepared, &self.shared, &self.rt);
        for f in &failures {
            tracing::error!("{f}");
        }
        self.set_error((!failures.is_empty()).then(|| failures.join("; ")));
        self.shared.metrics.reload(true, generation);
        tracing::info!(%version, generation, "configuration applied");
        // The previous configuration's memory (a large one reverted, say) goes back
        // to the system once applies stop for a second and its last requests ended.
        self.rt.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if LAST_APPLY.load(std::sync::atomic::Ordering::Relaxed) == generation {
                let _ = tokio::task::spawn_blocking(sinew_api::memory::trim).await;
            }
        });
        LAST_APPLY.store(generation, std::sync::atomic::Ordering::Relaxed);
        Ok(generation)
    }

    /// Records a refusal: logged, counted, shown by `/ready` and `/config`.
    pub fn refuse(&self, msg: &str) {
        for line in msg.lines() {
            tracing::error!("configuration refused: {line}");
        }
        self.shared.metrics.reload(false, 0);
        self.set_error(Some(msg.to_owned()));
    }

    /// Sets or clears the last error.
    pub fn set_error(&self, e: Option<String>) {
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
    }
}

/// The latest applied generation, so a burst of applies trims memory once.
static LAST_APPLY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Watches one configuration file.
#[derive(Debug)]
pub struct ConfigWatcher {
    path: PathBuf,
    name: Option<String>,
    applier: Applier,
    last_hash: Option<u64>,
}

impl ConfigWatcher {
    /// A watcher for `path`, selecting the `Proxy` document `name` if given.
    pub fn new(path: PathBuf, name: Option<String>, applier: Applier) -> ConfigWatcher {
        ConfigWatcher {
            path,
            name,
            applier,
            last_hash: None,
        }
    }

    /// Reads the file and applies it if it changed (or always, with `force`).
    /// Returns an error describing every problem when it was refused.
    pub fn load(&mut self, force: bool) -> Result<bool, String> {
        let label = self.path.display().to_string();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!("{label}: cannot read: {e}");
                self.applier.refuse(&msg);
                return Err(msg);
            }
        };
        let hash = fnv64(text.as_bytes());
        if !force && self.last_hash == Some(hash) {
            return Ok(false);
        }
        match compile_text(&label, &text, self.name.as_deref()) {
            Err(errors) => {
                // Remember refused content so it is reported once, not every tick.
                self.last_hash = Some(hash);
                let msg = errors.to_string();
                self.applier.refuse(&msg);
                Err(msg)
            }
            Ok(config) => match self.applier.apply(config, format!("{hash:016x}")) {
                Ok(_) => {
                    self.last_hash = Some(hash);
                    Ok(true)
                }
                Err(msg) => {
                    // Not remembered: a busy port may free up, so try again next tick.
                    self.applier.refuse(&msg);
                    Err(msg)
                }
            },
        }
    }

    /// Polls every `interval` and on every message on `reload`, until `reload` closes.
    pub async fn run(mut self, mut reload: mpsc::Receiver<()>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = self.load(false); }
                msg = reload.recv() => match msg {
                    Some(()) => { let _ = self.load(true); }
                    None => break,
                },
            }
        }
    }
}
