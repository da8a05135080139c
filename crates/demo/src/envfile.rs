//! `sinew demo env`: the running demo writes where its control plane is and which
//! credential to use to a well-known file, removed when it stops; `sinew demo env`
//! prints it as `export` lines for `eval "$(sinew demo env)"`.
//!
//! The file is `$XDG_RUNTIME_DIR/sinew-demo/env`, or `~/.cache/sinew/demo.env`
//! without `XDG_RUNTIME_DIR`. Its first line names the demo's process id, so a file
//! left behind by a demo that was killed is recognised as stale.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// The namespace every demo resource lives in, exported as `SINEW_NAMESPACE`.
const NAMESPACE: &str = crate::topology::NAMESPACE;

/// Where the running demo's environment is written.
pub(crate) fn path() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("sinew-demo").join("env"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home)
            .join(".cache")
            .join("sinew")
            .join("demo.env")),
        None => bail!(
            "cannot tell where the demo's environment file goes: neither XDG_RUNTIME_DIR nor HOME is set"
        ),
    }
}

/// A value quoted for a POSIX shell.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The file's text: a marker line with the process id, then `export` lines.
fn render(pid: u32, server: &str, credentials: &str) -> String {
    format!(
        "# sinew demo (pid {pid}); removed when it stops\n\
         export SINEW_SERVER={}\n\
         export SINEW_CREDENTIALS={}\n\
         export SINEW_NAMESPACE={}\n",
        quote(server),
        quote(credentials),
        quote(NAMESPACE)
    )
}

/// The process id in the marker line.
fn pid_of(text: &str) -> Option<u32> {
    let rest = text.lines().next()?.strip_prefix("# sinew demo (pid ")?;
    rest.split(')').next()?.parse().ok()
}

/// Whether a process with this id exists (Linux: `/proc/<pid>`; elsewhere assumed).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// The environment file of this demo: written at start, removed on drop (only if it
/// is still this demo's: a second demo started meanwhile owns it then).
#[derive(Debug)]
pub(crate) struct EnvFile {
    path: PathBuf,
    text: String,
}

impl EnvFile {
    /// Writes the file (owner-only: it names the admin credential).
    pub(crate) fn write(server: &str, credentials: &str) -> anyhow::Result<EnvFile> {
        let path = path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = render(std::process::id(), server, credentials);
        // Replaced whole: a file left by a killed demo is stale.
        sinew_tls::private_file::write(&path, text.as_bytes())?;
        Ok(EnvFile { path, text })
    }

    /// Where it is.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.text) {
            // Best effort: a stale file is recognised by its process id anyway.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `sinew demo env`: prints the running demo's `export` lines; fails, saying so, when
/// no demo runs.
pub(crate) fn print() -> anyhow::Result<()> {
    let path = path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no sinew demo is running ({} does not exist); start one with `sinew demo` in another shell",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let Some(pid) = pid_of(&text) else {
        bail!(
            "{} is not a sinew demo environment file (no `# sinew demo (pid N)` first line)",
            path.display()
        );
    };
    if !alive(pid) {
        bail!(
            "no sinew demo is running: {} was left by process {pid}, which is gone; start one with `sinew demo`",
            path.display()
        );
    }
    let mut out = std::io::stdout().lock();
    for line in text.lines().filter(|l| l.starts_with("export ")) {
        if let Err(e) = std::io::Write::write_all(&mut out, format!("{line}\n").as_bytes()) {
            // A closed pipe means the reader is done.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e).context("cannot write to standard output");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_file_names_its_process_and_quotes_values() {
        let text = render(42, "https://127.0.0.1:1", "/tmp/it's/admin.json");
        assert_eq!(pid_of(&text), Some(42));
        assert!(text.contains("export SINEW_SERVER='https://127.0.0.1:1'\n"));
        assert!(text.contains(r"export SINEW_CREDENTIALS='/tmp/it'\''s/admin.json'"));
        assert!(text.contains("export SINEW_NAMESPACE='demo'\n"));
        assert_eq!(pid_of("export A=b"), None);
        assert!(alive(std::process::id()));
    }
}
