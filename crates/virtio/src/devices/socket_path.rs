//! Paths a backend binds a UNIX socket at (or links a PTY alias to): a stale socket or link
//! left by an earlier run is replaced, anything else is refused with an error naming the path,
//! so that a typo in a configuration never deletes a user's file (as `SocketServer::bind` in
//! remio-api does for the API socket).

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Why a configured path cannot be taken over. As an [`io::Error`] (what the backends'
/// constructors return) it keeps its message and has kind `AlreadyExists`, or the cause's.
#[derive(Debug, thiserror::Error)]
pub enum SocketPathError {
    /// Something other than what we would replace is there.
    #[error(
        "{path} exists and is {what}, not a {expected}: refusing to remove it (remove it \
         yourself or configure another path)"
    )]
    Occupied {
        /// The configured path.
        path: PathBuf,
        /// What is there ("a regular file", "a directory", ...).
        what: &'static str,
        /// What would have been replaced ("socket", "symbolic link").
        expected: &'static str,
    },
    /// The path cannot be looked up or the stale entry cannot be removed.
    #[error("{path}: {source}")]
    Io {
        /// The configured path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<SocketPathError> for io::Error {
    fn from(e: SocketPathError) -> Self {
        let kind = match &e {
            SocketPathError::Occupied { .. } => io::ErrorKind::AlreadyExists,
            SocketPathError::Io { source, .. } => source.kind(),
        };
        Self::new(kind, e)
    }
}

fn describe(ty: std::fs::FileType) -> &'static str {
    if ty.is_file() {
        "a regular file"
    } else if ty.is_dir() {
        "a directory"
    } else if ty.is_symlink() {
        "a symbolic link"
    } else if ty.is_socket() {
        "a socket"
    } else if ty.is_fifo() {
        "a FIFO"
    } else if ty.is_char_device() {
        "a character device"
    } else if ty.is_block_device() {
        "a block device"
    } else {
        "of an unknown file type"
    }
}

/// Makes `path` free for a new entry: nothing there is fine, an entry `keep_if` accepts (a
/// stale one of ours) is removed, anything else is refused. The path itself is examined, not
/// what a symbolic link there points to.
fn clear(
    path: &Path,
    expected: &'static str,
    ours: fn(std::fs::FileType) -> bool,
) -> Result<(), SocketPathError> {
    let io_err = |source| SocketPathError::Io {
        path: path.to_owned(),
        source,
    };
    let ty = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    if !ours(ty) {
        return Err(SocketPathError::Occupied {
            path: path.to_owned(),
            what: describe(ty),
            expected,
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(e)),
    }
}

/// Frees `path` for binding a UNIX socket: a stale socket is removed, anything else refused.
pub fn clear_for_socket(path: &Path) -> Result<(), SocketPathError> {
    clear(path, "socket", |ty| ty.is_socket())
}

/// Frees `path` for a symbolic link (a PTY alias): a stale link is removed, anything else
/// refused.
pub fn clear_for_symlink(path: &Path) -> Result<(), SocketPathError> {
    clear(path, "symbolic link", |ty| ty.is_symlink())
}

/// Removes the socket we bound at `path` when its backend goes, unless something else has
/// replaced it meanwhile.
pub fn remove_our_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_regular_file_is_refused_and_survives_with_an_error_naming_it() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("notes.txt");
        std::fs::write(&path, b"precious").unwrap();

        let err = clear_for_socket(&path).unwrap_err();

        assert!(matches!(
            err,
            SocketPathError::Occupied {
                what: "a regular file",
                ..
            }
        ));
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a socket"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn a_stale_socket_is_removed_and_a_missing_path_is_fine() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());

        clear_for_socket(&path).unwrap();

        assert!(std::fs::symlink_metadata(&path).is_err());
        clear_for_socket(&path).unwrap();
    }

    #[test]
    fn a_symlink_is_not_followed_nor_taken_for_a_socket() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let sock = dir.as_path().join("real.sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&sock, &link).unwrap();

        let err = clear_for_socket(&link).unwrap_err();

        assert!(matches!(
            err,
            SocketPathError::Occupied {
                what: "a symbolic link",
                ..
            }
        ));
        assert!(std::fs::symlink_metadata(&link).is_ok());
        clear_for_symlink(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert!(std::fs::symlink_metadata(&sock).is_ok(), "the target stays");
    }

    #[test]
    fn a_regular_file_is_no_stale_alias() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("alias");
        std::fs::write(&path, b"keep").unwrap();

        let err = clear_for_symlink(&path).unwrap_err();

        assert!(err.to_string().contains("not a symbolic link"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
