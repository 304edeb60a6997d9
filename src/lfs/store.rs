//! The on-disk, content-addressed object store: `{dir}/objects/ab/cd/{oid}` for objects whose
//! SHA-256 and size were checked, `{dir}/tmp/` for downloads in progress. An object enters
//! `objects/` only by a rename of a verified temporary, so a partial or corrupted download
//! never becomes an entry, and temporaries left by a killed process are removed at start.
//!
//! The store is bounded by its size: beyond it, the least recently used objects are deleted.
//! A client still reading a deleted object keeps reading it (the open file outlives its name).
//! Recency lives in memory and starts from the files' modification times.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::Oid;

/// An object store.
pub struct Store {
    dir: PathBuf,
    max: u64,
    index: parking_lot::Mutex<Index>,
    temporaries: AtomicU64,
}

/// The entries and their order of use: `order` maps each entry's last use to its OID, so that
/// the least recently used comes first.
#[derive(Default)]
struct Index {
    entries: HashMap<Oid, Entry>,
    order: BTreeMap<u64, Oid>,
    bytes: u64,
    clock: u64,
}

impl Index {
    /// Mark `oid` used now; whether it is there.
    fn touch(&mut self, oid: &Oid) -> bool {
        self.clock += 1;
        let clock = self.clock;
        let Some(entry) = self.entries.get_mut(oid) else {
            return false;
        };
        self.order.remove(&entry.used);
        entry.used = clock;
        self.order.insert(clock, *oid);
        true
    }

    /// Add (or replace) `oid`, used now.
    fn insert(&mut self, oid: Oid, size: u64) {
        self.remove(&oid);
        self.clock += 1;
        let used = self.clock;
        self.entries.insert(oid, Entry { size, used });
        self.order.insert(used, oid);
        self.bytes += size;
    }

    fn remove(&mut self, oid: &Oid) {
        if let Some(entry) = self.entries.remove(oid) {
            self.order.remove(&entry.used);
            self.bytes -= entry.size;
        }
    }
}

struct Entry {
    size: u64,
    used: u64,
}

impl Store {
    /// Open (creating it) the store in `dir`, holding at most `max` bytes: temporaries are
    /// removed, entries are read from disk (files whose name is no OID are removed too), and
    /// the store is trimmed to `max`.
    pub fn open(dir: &Path, max: u64) -> std::io::Result<Store> {
        let objects = dir.join("objects");
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&objects)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut found = Vec::new();
        for a in std::fs::read_dir(&objects)? {
            let a = a?.path();
            for b in std::fs::read_dir(&a)? {
                let b = b?.path();
                for file in std::fs::read_dir(&b)? {
                    let file = file?;
                    let path = file.path();
                    let meta = file.metadata()?;
                    let oid = file.file_name().to_str().and_then(Oid::parse);
                    match oid {
                        Some(oid) if meta.is_file() && path == object_path(dir, &oid) => {
                            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                            found.push((modified, oid, meta.len()));
                        }
                        _ => remove(&path),
                    }
                }
            }
        }
        found.sort_by_key(|(modified, ..)| *modified);
        let mut index = Index::default();
        for (_, oid, size) in found {
            index.insert(oid, size);
        }
        let store = Store {
            dir: dir.to_owned(),
            max,
            index: parking_lot::Mutex::new(index),
            temporaries: AtomicU64::new(0),
        };
        store.trim(None);
        store.report();
        Ok(store)
    }

    /// The stored object `oid`, opened, and its size; a use for the eviction order.
    pub fn open_object(&self, oid: &Oid) -> Option<(File, u64)> {
        if !self.index.lock().touch(oid) {
            return None;
        }
        let path = object_path(&self.dir, oid);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().ok()?.len();
                Some((file, size))
            }
            Err(e) => {
                // Removed behind our back: forget it, it will be fetched again.
                tracing::warn!(path = %path.display(), error = %e, "Git LFS cache entry lost");
                self.forget(oid);
                None
            }
        }
    }

    /// Whether `oid` is stored.
    pub fn contains(&self, oid: &Oid) -> bool {
        self.index.lock().entries.contains_key(oid)
    }

    /// A new temporary file for a download, open for reading and writing, and its path.
    pub fn temporary(&self) -> std::io::Result<(File, PathBuf)> {
        let n = self.temporaries.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Make the verified temporary at `temporary` the object `oid` of `size` bytes, then
    /// evict down to the bound; returns the objects evicted. An object larger than the whole
    /// store is not kept.
    pub fn commit(&self, temporary: &Path, oid: &Oid, size: u64) -> std::io::Result<usize> {
        if size > self.max {
            remove(temporary);
            return Ok(0);
        }
        let path = object_path(&self.dir, oid);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(temporary, &path)?;
        self.index.lock().insert(*oid, size);
        let evicted = self.trim(Some(oid));
        self.report();
        Ok(evicted)
    }

    /// Evict the least recently used objects (but `keep`) while the store exceeds its bound.
    fn trim(&self, keep: Option<&Oid>) -> usize {
        let mut victims = Vec::new();
        {
            let mut index = self.index.lock();
            let mut kept = None;
            while index.bytes > self.max {
                let Some((_, oid)) = index.order.pop_first() else {
                    break;
                };
                if Some(&oid) == keep {
                    // Put back below, once the others are gone.
                    kept = index.entries.get(&oid).map(|e| (e.used, oid));
                    continue;
                }
                if let Some(e) = index.entries.remove(&oid) {
                    index.bytes -= e.size;
                    victims.push(oid);
                }
            }
            if let Some((used, oid)) = kept {
                index.order.insert(used, oid);
            }
        }
        for oid in &victims {
            remove(&object_path(&self.dir, oid));
        }
        if !victims.is_empty() {
            super::metrics::evicted(victims.len());
        }
        victims.len()
    }

    fn forget(&self, oid: &Oid) {
        self.index.lock().remove(oid);
    }

    /// Objects and bytes stored.
    pub fn usage(&self) -> (usize, u64) {
        let index = self.index.lock();
        (index.entries.len(), index.bytes)
    }

    fn report(&self) {
        let (objects, bytes) = self.usage();
        super::metrics::usage(objects, bytes);
    }
}

fn object_path(dir: &Path, oid: &Oid) -> PathBuf {
    let hex = oid.to_string();
    dir.join("objects")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(hex)
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a Git LFS cache file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put(store: &Store, byte: u8, size: usize) -> Oid {
        let (mut file, path) = store.temporary().unwrap();
        file.write_all(&vec![byte; size]).unwrap();
        let oid = Oid([byte; 32]);
        store.commit(&path, &oid, size as u64).unwrap();
        oid
    }

    #[test]
    fn least_recently_used_objects_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 300).unwrap();
        let a = put(&store, 1, 100);
        let b = put(&store, 2, 100);
        let c = put(&store, 3, 100);
        assert!(store.open_object(&a).is_some());
        let d = put(&store, 4, 100);
        assert!(!store.contains(&b), "b was the least recently used");
        for oid in [&a, &c, &d] {
            assert!(store.contains(oid));
        }
        assert_eq!(store.usage(), (3, 300));
        put(&store, 5, 301);
        assert_eq!(store.usage(), (3, 300), "larger than the store: not kept");
    }

    #[test]
    fn reopening_keeps_objects_and_drops_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1000).unwrap();
        let a = put(&store, 1, 10);
        let (mut partial, partial_path) = store.temporary().unwrap();
        partial.write_all(b"half").unwrap();
        std::fs::write(dir.path().join("objects/01/01/stray"), b"x").unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1000).unwrap();
        assert!(store.contains(&a));
        assert_eq!(store.usage(), (1, 10));
        assert!(!partial_path.exists());
        assert!(!dir.path().join("objects/01/01/stray").exists());
        let (_, size) = store.open_object(&a).unwrap();
        assert_eq!(size, 10);
        let store = Store::open(dir.path(), 5).unwrap();
        assert_eq!(store.usage(), (0, 0), "trimmed to a smaller bound");
    }

    #[test]
    fn a_reader_keeps_an_evicted_object() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let a = put(&store, 1, 100);
        let (mut file, _) = store.open_object(&a).unwrap();
        put(&store, 2, 100);
        assert!(!store.contains(&a));
        let mut read = Vec::new();
        file.read_to_end(&mut read).unwrap();
        assert_eq!(read, vec![1; 100]);
    }
}
