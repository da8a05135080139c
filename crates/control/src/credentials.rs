//! Operator credential files: what `sinew` reads to call the control plane.
//!
//! Like a kubeconfig, one YAML file holds where the control plane is, the client
//! certificate and key, and the roots that verify the control plane. It is written
//! owner-only (0600): the key is in it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialFile {
    /// The control plane's URL, e.g. `https://127.0.0.1:15010`.
    pub server: String,
    /// The credential's name (who holds it).
    pub name: String,
    /// `viewer`, `operator` or `admin` (as issued; the control plane decides by its
    /// own record, never by this).
    pub role: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// When the certificate expires, RFC 3339.
    pub expires: String,
    /// The client certificate, PEM.
    pub certificate: String,
    /// Its private key, PEM.
    pub key: String,
    /// The roots that verify the control plane, PEM.
    pub roots: String,
}

impl CredentialFile {
    /// Reads and checks a credential file; errors name the file and the problem.
    pub fn read(path: &Path) -> Result<CredentialFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the credential file: {e}", path.display()))?;
        let file: CredentialFile = serde_norway::from_str(&text)
            .map_err(|e| format!("{}: not a Sinew credential file: {e}", path.display()))?;
        for (field, pem) in [
            ("certificate", &file.certificate),
            ("key", &file.key),
            ("roots", &file.roots),
        ] {
            if !pem.contains("-----BEGIN ") {
                return Err(format!("{}: {field}: no PEM block", path.display()));
            }
        }
        Ok(file)
    }

    /// Writes the file owner-only (0600), replacing any file there; creates the
    /// directory (0700) if needed.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::DirBuilderExt;
        let text = serde_norway::to_string(self).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = format!(
            "# Sinew operator credential ({} role). Keep it private.\n{text}",
            self.role
        );
        sinew_tls::private_file::write(path, text.as_bytes()).map_err(|e| e.to_string())
    }
}

/// Where `sinew` looks for a credential when neither `--credentials` nor
/// `SINEW_CREDENTIALS` names one: `~/.config/sinew/credentials` (or under
/// `$XDG_CONFIG_HOME`), then `sinew-data/admin.credentials` in the current directory
/// (what `sinew control` with its default data directory writes).
pub fn default_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(dir).join("sinew/credentials"));
    } else if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(home).join(".config/sinew/credentials"));
    }
    out.push(PathBuf::from("sinew-data").join(ADMIN_FILE));
    out
}

/// The admin credential's file name in the data directory.
pub const ADMIN_FILE: &str = "admin.credentials";
