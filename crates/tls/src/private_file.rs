//! Owner-only files (keys, credentials, join tokens, env files naming credentials),
//! written whole: one place for what nine call sites did by hand.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::TlsError;

/// Writes `data` to `path`, mode 0600, replacing any file there.
///
/// The bytes go to a temporary file beside `path` (created 0600, so they are never
/// in a file with wider permissions), are synced, and the file is renamed into place:
/// a reader sees the old file or the new one, never half of one. The temporary name
/// carries the process id, so two processes writing the same path do not collide.
/// The directory must exist. Errors name the file.
pub fn write(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let tmp = temp_beside(path);
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| TlsError::Io { path: p, source }
    };
    // A temporary file left by a killed writer with this pid is stale.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()))
        .map_err(io(&tmp));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path).map_err(io(path))) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_owner_only_and_replaces_whole() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("sinew-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("key.pem");
        // An existing world-readable file is replaced by an owner-only one.
        std::fs::write(&path, "old")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        write(&path, b"new")?;
        assert_eq!(std::fs::read_to_string(&path)?, "new");
        assert_eq!(
            std::fs::metadata(&path)?.permissions().mode() & 0o777,
            0o600
        );
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn an_error_names_the_file() {
        let path = Path::new("/nonexistent-sinew-dir/credentials");
        let e = write(path, b"x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent-sinew-dir/.credentials."), "{e}");
    }
}
