//! Loading the configuration file and reloading it when it changes.
//!
//! The file is read and hashed on every tick (and on demand, e.g. SIGHUP); only a
//! changed hash is parsed. A file that fails to parse or validate is refused whole:
//! the previous snapshot stays in force and the problems are logged with file, line
//! and field. Runs on the admin thread, off the data-plane workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sinew_model::compile::compile_text;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::listeners::Listeners;
use crate::state::{Shared, SnapshotBuilder};

/// FNV-1a, 64 bit: a stable content hash for the configuration version.
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Watches one configuration file. The single writer of snapshots and listeners.
#[derive(Debug)]
pub struct ConfigWatcher {
    path: PathBuf,
    name: Option<String>,
    shared: Arc<Shared>,
    rt: Handle,
    builder: SnapshotBuilder,
    listeners: Listeners,
    last_hash: Option<u64>,
}

impl ConfigWatcher {
    /// A watcher for `path`, selecting the `Proxy` document `name` if given.
    pub fn new(
        path: PathBuf,
        name: Option<String>,
        shared: Arc<Shared>,
        rt: Handle,
    ) -> ConfigWatcher {
        ConfigWatcher {
            path,
            name,
            shared,
            rt,
            builder: SnapshotBuilder::default(),
            listeners: Listeners::default(),
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
                return Err(self.refuse(msg, None));
            }
        };
        let hash = fnv64(text.as_bytes());
        if !force && self.last_hash == Some(hash) {
            if !self
                .shared
                .listeners_ok
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                self.rebind();
            }
            return Ok(false);
        }
        match compile_text(&label, &text, self.name.as_deref()) {
            Err(errors) => Err(self.refuse(errors.to_string(), Some(hash))),
            Ok(config) => {
                self.last_hash = Some(hash);
                let snap = self.builder.build(
                    config,
                    format!("{hash:016x}"),
                    self.shared.settings.connect_timeout,
                );
                let generation = snap.generation;
                let version = snap.version.clone();
                let snap = Arc::new(snap);
                // Swap first, then start new listeners: a new listener must find its
                // binding in the snapshot it reads.
                self.shared.snapshot.store(Some(snap.clone()));
                let failures = self
                    .listeners
                    .reconcile(&snap.config, &self.shared, &self.rt);
                self.set_error(if failures.is_empty() {
                    None
                } else {
                    Some(failures.join("; "))
                });
                for f in &failures {
                    tracing::error!("cannot listen: {f}");
                }
                self.shared.metrics.reload(true, generation);
                tracing::info!(%version, generation, file = %label, "configuration applied");
                Ok(true)
            }
        }
    }

    fn rebind(&mut self) {
        if let Some(snap) = self.shared.snapshot.load_full() {
            let failures = self
                .listeners
                .reconcile(&snap.config, &self.shared, &self.rt);
            self.set_error(if failures.is_empty() {
                None
            } else {
                Some(failures.join("; "))
            });
        }
    }

    fn refuse(&mut self, msg: String, hash: Option<u64>) -> String {
        // Remember the refused content so it is reported once, not every tick.
        if hash.is_some() {
            self.last_hash = hash;
        }
        for line in msg.lines() {
            tracing::error!("configuration refused: {line}");
        }
        self.shared.metrics.reload(false, 0);
        self.set_error(Some(msg.clone()));
        msg
    }

    fn set_error(&self, e: Option<String>) {
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
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
