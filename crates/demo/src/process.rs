//! The demo's child processes and its temporary directory.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// How long a killed child may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// A directory under the system temp dir, removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates a fresh `sinew-demo-*` directory.
    pub(crate) fn create(keep: bool) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("sinew-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create the demo directory {}", path.display()))?;
        Ok(TempDir { path, keep })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory now (unless kept) and says what happened.
    pub(crate) fn finish(mut self) -> String {
        if self.keep {
            return format!("demo: kept {}", self.path.display());
        }
        self.keep = true; // nothing left for drop to do
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => format!("demo: removed {}", self.path.display()),
            Err(e) => format!("demo: could not remove {}: {e}", self.path.display()),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a panic or an early return still cleans up.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One child process and where its output goes.
#[derive(Debug)]
struct Managed {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

/// Every child the demo started. Children are killed on drop (`kill_on_drop`), and
/// [`Children::shutdown`] kills and reaps them explicitly.
#[derive(Debug)]
pub(crate) struct Children {
    logs: PathBuf,
    list: Vec<Managed>,
}

impl Children {
    /// Children whose output goes to `<logs>/<name>.log`.
    pub(crate) fn new(logs: PathBuf) -> anyhow::Result<Children> {
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        Ok(Children {
            logs,
            list: Vec::new(),
        })
    }

    /// The log directory.
    pub(crate) fn log_dir(&self) -> &Path {
        &self.logs
    }

    /// Starts `program args` as `name`, output to its log file. The child gets its own
    /// process group, so a terminal's Ctrl-C reaches only the demo, which then stops
    /// the children itself.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let log = self.logs.join(format!("{}.log", name.replace('/', "_")));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        #[cfg(unix)]
        command.process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        self.list.push(Managed {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        });
        Ok(())
    }

    /// Fails if any child has exited, naming it and its log.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        for m in &mut self.list {
            if m.exited.is_none()
                && let Ok(Some(status)) = m.child.try_wait()
            {
                m.exited = Some(status);
            }
            if let Some(status) = m.exited {
                bail!("{} exited ({status}); its log: {}", m.name, m.log.display());
            }
        }
        Ok(())
    }

    /// Kills (SIGKILL) every child whose name starts with `prefix` and reaps it; they
    /// are no longer watched, so [`Children::check_running`] does not count them as
    /// having died. Returns their names and process ids.
    pub(crate) async fn kill(&mut self, prefix: &str) -> Vec<(String, Option<u32>)> {
        let (mut doomed, kept): (Vec<Managed>, Vec<Managed>) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|m| m.name.starts_with(prefix));
        self.list = kept;
        // Last started first (the sidecar before its app), all at once: callers see
        // the instance vanish, not a sidecar whose app is gone.
        let pids: Vec<Option<u32>> = doomed.iter().map(|m| m.child.id()).collect();
        for m in doomed.iter_mut().rev() {
            // Fails only if it already exited; reaped below either way.
            let _ = m.child.start_kill();
        }
        let mut killed = Vec::new();
        for (mut m, pid) in doomed.into_iter().zip(pids) {
            if tokio::time::timeout(REAP_TIMEOUT, m.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "demo: {} did not exit within {}s of SIGKILL",
                    m.name,
                    REAP_TIMEOUT.as_secs()
                );
            }
            killed.push((m.name, pid));
        }
        killed
    }

    /// The last lines of every non-empty log, for a failure report.
    pub(crate) fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.list {
            let text = tail(&m.log, lines);
            if !text.trim().is_empty() {
                out.push_str(&format!(
                    "--- {} ({})\n{}\n",
                    m.name,
                    m.log.display(),
                    indent(&text)
                ));
            }
        }
        out
    }

    /// Kills every child (last started first) and waits until each is gone.
    pub(crate) async fn shutdown(&mut self) {
        for m in self.list.iter_mut().rev() {
            if m.exited.is_none() {
                // Fails only if the child already exited; reaped below either way.
                let _ = m.child.start_kill();
            }
        }
        for m in self.list.iter_mut().rev() {
            if m.exited.is_some() {
                continue;
            }
            match tokio::time::timeout(REAP_TIMEOUT, m.child.wait()).await {
                Ok(Ok(status)) => m.exited = Some(status),
                Ok(Err(e)) => eprintln!("demo: could not reap {}: {e}", m.name),
                Err(_) => eprintln!(
                    "demo: {} did not exit within {}s of SIGKILL",
                    m.name,
                    REAP_TIMEOUT.as_secs()
                ),
            }
        }
    }
}

/// The last `lines` lines of a file ("" if unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "    (empty)".to_owned();
    }
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn children_are_reported_when_they_exit_and_killed_on_shutdown() {
        let dir = TempDir::create(false).unwrap();
        let path = dir.path().to_owned();
        let mut children = Children::new(path.join("logs")).unwrap();
        children
            .spawn(
                "sleeper",
                Path::new("/bin/sh"),
                &["-c".into(), "exec sleep 60".into()],
            )
            .unwrap();
        children.check_running().unwrap();
        children
            .spawn(
                "quitter",
                Path::new("/bin/sh"),
                &["-c".into(), "echo going away; exit 3".into()],
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let err = loop {
            match children.check_running() {
                Err(e) => break e.to_string(),
                Ok(()) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(()) => panic!("quitter never exited"),
            }
        };
        assert!(err.contains("quitter exited"), "{err}");
        let tails = children.log_tails(5);
        assert!(tails.contains("--- quitter"), "{tails}");
        assert!(tails.contains("    going away"), "{tails}");
        children.shutdown().await;
        assert!(children.list.iter().all(|m| m.exited.is_some()));
        assert!(dir.finish().starts_with("demo: removed"));
        assert!(!path.exists());
    }
}
