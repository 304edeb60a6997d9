//! The mirror directory as a whole: the lock that makes a server the only one on it, the walk
//! that finds its mirrors, and the clean-up at start (what a crash left unfinished, and the
//! markers of an older release, folded into the mirrors' records).

use std::path::{Path, PathBuf};

use super::{evict, record, sync, TMP_PREFIX};

/// The lock file that makes a server the only one on its `MIRROR_DIR`.
const SERVER_LOCK: &str = ".smart-git-proxy.lock";

/// Another process serves the same `MIRROR_DIR`.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock is held.
    #[error(
        "MIRROR_DIR {root} is already served by another smart-git-proxy ({holder}; its lock \
         is {lock}): run one server per MIRROR_DIR"
    )]
    Held {
        /// `MIRROR_DIR`
        root: String,
        /// What the lock file says of its holder.
        holder: String,
        /// The lock file.
        lock: String,
    },
    /// The lock file cannot be used.
    #[error("cannot lock {lock}: {source}")]
    Io {
        /// The lock file.
        lock: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Take `root`'s server lock for as long as the returned file stays open: a second server on
/// the same `MIRROR_DIR` would break the one-sync-per-mirror guarantee and remove the first
/// one's temporaries at its start. (`smart-git-proxy maintain` does not take it: maintenance
/// has a lock of its own per mirror.)
pub fn lock_root(root: &Path) -> Result<std::fs::File, LockError> {
    use std::io::{Read, Seek, Write};
    let path = root.join(SERVER_LOCK);
    let io = |source| LockError::Io {
        lock: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(LockError::Held {
            root: root.display().to_string(),
            holder: holder.trim().to_owned(),
            lock: path.display().to_string(),
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "pid {}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// The mirrors and the temporary mirror directories below `root`, at any depth. Symbolic links
/// are not followed and other dot-directories (the pack cache) are not entered.
pub(super) fn scan(root: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut mirrors, mut temporaries) = (Vec::new(), Vec::new());
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            let evicted = dir == root && name.starts_with(evict::EVICTED_PREFIX);
            if name.starts_with(TMP_PREFIX) || evicted {
                temporaries.push(path);
            } else if name.starts_with('.') {
                continue;
            } else if name.ends_with(".git") && crate::repo::exists(&path) {
                mirrors.push(path);
            } else {
                pending.push(path);
            }
        }
    }
    Ok((mirrors, temporaries))
}

pub(super) fn remove_temporaries(root: &Path) -> std::io::Result<usize> {
    let (mirrors, temporaries) = scan(root)?;
    for tmp in &temporaries {
        tracing::info!(path = %tmp.display(), "removing an unfinished or evicted mirror");
        std::fs::remove_dir_all(tmp)?;
    }
    let mut removed = temporaries.len();
    let mut migrated = 0;
    for mirror in &mirrors {
        removed += sync::remove_leftovers_unless_busy(mirror);
        match record::migrate(mirror) {
            Ok(true) => migrated += 1,
            Ok(false) => {}
            // Its markers stay, and are read with the record until a start migrates them.
            Err(e) => {
                tracing::warn!(mirror = %mirror.display(), error = %e, "cannot move the mirror's markers into its record")
            }
        }
    }
    if migrated > 0 {
        tracing::info!(
            migrated,
            "moved the sync and privacy markers of an older release into the mirrors' records"
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_temporaries_but_not_mirrors() {
        let root = tempfile::tempdir().unwrap();
        let keep = root.path().join("github.com/o/r.git/objects");
        let tmp = root
            .path()
            .join(format!("github.com/o/{TMP_PREFIX}x.git-1-0/objects"));
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(remove_temporaries(root.path()).unwrap(), 1);
        assert!(keep.is_dir());
        assert!(!tmp.parent().unwrap().exists());
    }
}
