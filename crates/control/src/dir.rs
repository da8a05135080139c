//! The watched config directory (`--config-dir`): every `.yaml`/`.yml` file in it
//! (recursively), re-read when any changes. The directory's documents replace what it
//! contributed before: a file removed from it removes its documents. A directory that
//! does not validate is refused whole and the error is reported by `sinew check`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sinew_model::parse_sources;
use tokio::sync::mpsc;

use crate::index::{Command, FNV_OFFSET, fnv64};

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

fn read(dir: &Path) -> Result<(u64, Vec<(String, String)>), String> {
    let mut paths = Vec::new();
    files(dir, &mut paths).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut h = FNV_OFFSET;
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let label = p.display().to_string();
        h = fnv64(fnv64(h, label.as_bytes()), text.as_bytes());
        out.push((label, text));
    }
    Ok((h, out))
}

/// Watches `dir`, sending its documents to the index whenever its content changes.
pub async fn watch(dir: PathBuf, index: mpsc::Sender<Command>, interval: Duration) {
    let mut last = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let d = dir.clone();
        let Ok(read) = tokio::task::spawn_blocking(move || read(&d)).await else {
            continue;
        };
        let (hash, sources) = match read {
            Ok(r) => r,
            Err(e) => {
                if last != Some(0) {
                    tracing::error!("config directory: {e}");
                    last = Some(0);
                }
                continue;
            }
        };
        if last == Some(hash) {
            continue;
        }
        last = Some(hash);
        let docs = match parse_sources(sources.iter().map(|(l, t)| (l.as_str(), t.as_str()))) {
            Ok(docs) => docs,
            Err(errors) => {
                for line in errors.to_string().lines() {
                    tracing::error!("config directory refused: {line}");
                }
                continue;
            }
        };
        if index.send(Command::SyncDir { docs }).await.is_err() {
            break;
        }
    }
}
