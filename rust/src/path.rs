//! Where the socket is when no path is given (PROTOCOL.md section 10).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// A directory only we may use: ours, not a symbolic link, closed to group and others.
fn private_dir(dir: &Path, uid: u32) -> Result<bool, io::Error> {
    let md = std::fs::symlink_metadata(dir)?;
    Ok(md.file_type().is_dir() && md.uid() == uid && md.mode() & 0o077 == 0)
}

/// The default socket path: `$HINTENS_SOCKET` when set; else `$XDG_RUNTIME_DIR/hintens.sock`
/// when that directory is ours and closed to others; else `/tmp/hintens-$UID/hintens.sock`.
/// With `create` (a server), that last directory is created with mode 0700. A directory that
/// belongs to another user, is open to others, or is a symbolic link is refused.
pub fn default_socket_path(create: bool) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("HINTENS_SOCKET").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let uid = crate::conn::my_uid();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        let dir = PathBuf::from(dir);
        if private_dir(&dir, uid).unwrap_or(false) {
            return Ok(dir.join("hintens.sock"));
        }
    }
    let dir = PathBuf::from(format!("/tmp/hintens-{uid}"));
    match private_dir(&dir, uid) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is not a private directory of uid {uid}", dir.display()),
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
            // Created by someone else between the two calls? Check again.
            if !private_dir(&dir, uid)? {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "socket directory",
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(dir.join("hintens.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dir_checks_mode_and_symlinks() {
        let base = std::env::temp_dir().join(format!("hintens-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let uid = crate::conn::my_uid();
        let ok = base.join("ok");
        std::fs::DirBuilder::new().mode(0o700).create(&ok).unwrap();
        assert!(private_dir(&ok, uid).unwrap());
        let open = base.join("open");
        std::fs::DirBuilder::new().mode(0o755).create(&open).unwrap();
        assert!(!private_dir(&open, uid).unwrap());
        let link = base.join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert!(!private_dir(&link, uid).unwrap());
        assert!(!private_dir(&ok, uid + 1).unwrap());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
