//! Small file helpers shared by every writer: atomic replacement, and a guard around
//! third-party decoders.

use std::path::{Path, PathBuf};

/// Writes a file atomically: `write` fills a temporary file in the same folder (its name ends
/// with the final file name, so extension-sniffing writers such as NIfTI's `.nii.gz` behave),
/// which is then flushed and renamed over `path`. A crash leaves either the old file or the new
/// one, never a half-written one.
pub fn atomic_write_with<F>(path: &Path, write: F) -> std::io::Result<()>
where
    F: FnOnce(&Path) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fluoropose-tmp-")
        .suffix(&format!("-{}", name.to_string_lossy()))
        .tempfile_in(&dir)?;
    let tmp_path = tmp.path().to_path_buf();
    // Keep the file handle alive so the name stays reserved; the writer reopens it by path.
    let result = write(&tmp_path).and_then(|()| {
        std::fs::File::open(&tmp_path)?.sync_all()?;
        Ok(())
    });
    // Temporary files are created private (0600); give the result the permissions the file it
    // replaces had, or the usual 0644 for a new one.
    let result = result.and_then(|()| {
        let perms = match std::fs::metadata(path) {
            Ok(m) => Some(m.permissions()),
            Err(_) => default_permissions(),
        };
        perms.map_or(Ok(()), |p| std::fs::set_permissions(&tmp_path, p))
    });
    match result {
        Ok(()) => tmp.persist(path).map(|_| ()).map_err(|e| e.error),
        Err(e) => Err(e), // `tmp` is deleted on drop
    }
}

#[cfg(unix)]
fn default_permissions() -> Option<std::fs::Permissions> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn default_permissions() -> Option<std::fs::Permissions> {
    None
}

/// Writes bytes atomically (see [`atomic_write_with`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic_write_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Runs a third-party decoder, turning a panic inside it into an error message. Our own code
/// does not panic on user data; this guards the crates we call against inputs they mishandle.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o644
            );
        }
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        atomic_write(&p, b"precious").unwrap();
        let r = atomic_write_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("crash"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
