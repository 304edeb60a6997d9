//! Reading a pack's `.bitmap`: ours, and git's (which may carry a name-hash cache, a lookup
//! table or pseudo-merges after the commit entries; those are not needed and not read).
//!
//! As in git, the file is mapped and stays compressed: opening it ([`File::open`]) checks the
//! header and reads the 6-byte head of every commit entry, nothing more. What a request
//! decodes — the pack's reverse index and type bitmaps ([`File::load`]), and the commit
//! bitmaps it meets ([`Decoder`]) — goes into a [`Cache`] that all mirrors share and that is
//! bounded by bytes. An idle mirror's bitmap costs its mapping (page cache, not the process's
//! anonymous memory) and 24 bytes per bitmapped commit.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gix::objs::Kind;
use gix::ObjectId;

use super::cache::{Cache, Key, Slot, Value};
use super::{ewah, Bits, Objects, Rev};

/// The bitmap file's signature.
pub(super) const MAGIC: &[u8; 4] = b"BITM";
/// The only version of the format.
pub(super) const VERSION: u16 = 1;
/// Required: the pack is closed under reachability.
pub(super) const OPT_FULL_DAG: u16 = 0x1;
/// An entry XORs with one of at most this many entries before it (git's `MAX_XOR_OFFSET`).
pub(super) const MAX_XOR_OFFSET: usize = 160;
/// The header: signature, version, flags, entry count, pack checksum.
const HEADER_LEN: usize = 32;

/// Why a bitmap could not be read; the planner then walks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bitmap, its pack or its pack's index could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bitmap is not in the format, or not for its pack.
    #[error("bitmap {path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One commit's bitmap in the file.
struct Entry {
    /// Where its EWAH bytes start.
    start: usize,
    /// The entry this one is XORed with, as a distance back (0: none).
    xor: u8,
}

/// A mapped `.bitmap` and the table of its commit entries: what a mirror keeps between
/// requests. [`File::load`] gives the [`Index`] a request plans with.
pub struct File {
    path: PathBuf,
    /// Names this file's entries in the cache.
    key: u64,
    cache: Arc<Cache>,
    data: memmap2::Mmap,
    idx: Arc<gix_pack::index::File>,
    pack_len: u64,
    /// The four type bitmaps, one after the other.
    types: Range<usize>,
    entries: Vec<Entry>,
    /// The index position (object id order) of each entry's commit with the entry, sorted:
    /// an entry is found by the commit's index position.
    by_commit: Vec<(u32, u32)>,
    /// Set once loading failed, so that the failure is logged once, not per request.
    broken: AtomicBool,
    /// Held while the reverse index and type bitmaps are decoded: requests that arrive
    /// meanwhile wait for them rather than decode them too.
    loading: parking_lot::Mutex<()>,
    /// Whether anything was decoded into the cache (what the cache must forget).
    decoded: AtomicBool,
}

impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("objects", &self.idx.num_objects())
            .field("commits", &self.entries.len())
            .finish()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // Nothing can ask for them any more: their bytes are better spent on other mirrors.
        if self.decoded.load(Ordering::Relaxed) {
            self.cache.forget(self.key);
        }
    }
}

/// Map the file at `path` read-only.
fn map(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)?;
    // SAFETY: the mapping is undefined behaviour if the file is truncated or written while
    // mapped. Bitmaps, like git's packs and indexes (which gix maps the same way), are written
    // under a temporary name and renamed into place, never modified; a deleted one stays
    // readable while mapped.
    #[allow(unsafe_code)]
    unsafe {
        memmap2::MmapOptions::new().map_copy_read_only(&file)
    }
}

impl File {
    /// Map the bitmap at `path` (`pack-<hash>.bitmap`) and its pack's index, check that they
    /// belong together and read the table of commit entries; what requests decode goes into
    /// the process's shared [`Cache::global`].
    pub fn open(path: &Path) -> Result<File, Error> {
        File::open_in(path, Arc::clone(Cache::global()))
    }

    /// [`File::open`], decoding into `cache`.
    pub fn open_in(path: &Path, cache: Arc<Cache>) -> Result<File, Error> {
        let format = |message: String| Error::Format {
            path: path.to_owned(),
            message,
        };
        let io = |path: &Path, source: Box<dyn std::error::Error + Send + Sync>| Error::Io {
            path: path.to_owned(),
            source,
        };
        let data = map(path).map_err(|e| io(path, e.into()))?;
        let pack = path.with_extension("pack");
        let idx_path = path.with_extension("idx");
        let idx = gix_pack::index::File::at(&idx_path, gix::hash::Kind::Sha1)
            .map_err(|e| io(&idx_path, e.into()))?;
        let pack_len = std::fs::metadata(&pack)
            .map_err(|e| io(&pack, e.into()))?
            .len();
        let header = data
            .get(..HEADER_LEN)
            .ok_or_else(|| format("shorter than its header".into()))?;
        if &header[..4] != MAGIC {
            return Err(format("not a bitmap file".into()));
        }
        let version = u16::from_be_bytes([header[4], header[5]]);
        let flags = u16::from_be_bytes([header[6], header[7]]);
        if version != VERSION || flags & OPT_FULL_DAG == 0 {
            return Err(format(format!(
                "unsupported version {version} or flags {flags:#x}"
            )));
        }
        let count = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if header[12..32] != *idx.pack_checksum().as_bytes() {
            return Err(format("written for another pack".into()));
        }
        let mut at = HEADER_LEN;
        for _ in 0..4 {
            at += data
                .get(at..)
                .and_then(ewah::skip)
                .ok_or_else(|| format("type bitmaps cut off".into()))?;
        }
        let types = HEADER_LEN..at;
        let objects = idx.num_objects();
        // Entries hold at least their 6 header bytes: the count cannot promise more.
        let mut entries = Vec::with_capacity(count.min((data.len() - at) / 6));
        let mut by_commit = Vec::with_capacity(entries.capacity());
        for i in 0..count {
            let head = data
                .get(at..at + 6)
                .ok_or_else(|| format(format!("entry {i} is cut off")))?;
            let index_pos = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let xor = head[4];
            if usize::from(xor) > MAX_XOR_OFFSET || usize::from(xor) > i {
                return Err(format(format!("entry {i} has XOR offset {xor}")));
            }
            let len = ewah::skip(&data[at + 6..])
                .ok_or_else(|| format(format!("entry {i} is cut off")))?;
            if index_pos >= objects {
                return Err(format(format!("entry {i} names object {index_pos}")));
            }
            entries.push(Entry { start: at + 6, xor });
            // `i` < `count`, a u32.
            by_commit.push((index_pos, i as u32));
            at += 6 + len;
        }
        by_commit.sort_unstable();
        if let Some(w) = by_commit.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(format(format!("entry {} repeats a commit", w[1].1)));
        }
        Ok(File {
            path: path.to_owned(),
            key: super::cache::next_key(),
            cache,
            data,
            idx: Arc::new(idx),
            pack_len,
            types,
            entries,
            by_commit,
            broken: AtomicBool::new(false),
            loading: parking_lot::Mutex::new(()),
            decoded: AtomicBool::new(false),
        })
    }

    /// The bitmap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many commits have a bitmap.
    pub fn commits(&self) -> usize {
        self.entries.len()
    }

    /// The cache this file decodes into.
    pub(super) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The bitmaps as a request uses them: the pack's objects in bit order and the type
    /// bitmaps, from the cache or decoded now (and cached). `None` when they cannot be
    /// decoded; that is logged the first time.
    pub fn load(self: &Arc<Self>) -> Option<Arc<Index>> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        match self.try_load() {
            Ok(index) => Some(Arc::new(index)),
            Err(e) => {
                if !self.broken.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "ignoring the reachability bitmap");
                }
                None
            }
        }
    }

    /// [`File::load`], with the reason it failed.
    pub fn try_load(self: &Arc<Self>) -> Result<Index, Error> {
        let cached = || match (
            self.cache.get(&Key(self.key, Slot::Rev)),
            self.cache.get(&Key(self.key, Slot::Types)),
        ) {
            (Some(Value::Rev(rev)), Some(Value::Types(types))) => Some((rev, types)),
            _ => None,
        };
        let (rev, types) = match cached() {
            Some(both) => both,
            None => {
                let _loading = self.loading.lock();
                match cached() {
                    Some(both) => both,
                    None => {
                        let rev = Arc::new(Rev::of(&self.idx));
                        let types = Arc::new(self.decode_types(rev.len())?);
                        self.decoded.store(true, Ordering::Relaxed);
                        self.cache
                            .put(Key(self.key, Slot::Rev), Value::Rev(Arc::clone(&rev)));
                        self.cache
                            .put(Key(self.key, Slot::Types), Value::Types(Arc::clone(&types)));
                        (rev, types)
                    }
                }
            }
        };
        Ok(Index {
            file: Arc::clone(self),
            objects: Objects {
                idx: Arc::clone(&self.idx),
                rev,
                end: self
                    .pack_len
                    .saturating_sub(gix::hash::Kind::Sha1.len_in_bytes() as u64),
            },
            types,
        })
    }

    fn decode_types(&self, objects: usize) -> Result<[Bits; 4], Error> {
        let mut rest = &self.data[self.types.clone()];
        let mut types: [Bits; 4] = Default::default();
        for t in &mut types {
            let (bits, after) = ewah::decode(rest, objects).map_err(|message| Error::Format {
                path: self.path.clone(),
                message,
            })?;
            *t = bits;
            rest = after;
        }
        Ok(types)
    }

    /// The entry of commit `id`, if it has a bitmap.
    fn entry(&self, id: &ObjectId) -> Option<usize> {
        let index_pos = self.idx.lookup(id)?;
        self.by_commit
            .binary_search_by_key(&index_pos, |(pos, _)| *pos)
            .ok()
            .map(|i| self.by_commit[i].1 as usize)
    }

    /// Decode entry `i` as stored (before any XOR).
    fn raw(&self, i: usize, objects: usize) -> Result<Bits, String> {
        ewah::decode(&self.data[self.entries[i].start..], objects).map(|(bits, _)| bits)
    }
}

/// The bitmaps of one pack as a request uses them (from [`File::load`]): the pack's objects
/// in bit order, the type bitmaps, and the commit bitmaps, decoded on demand. Holding it keeps
/// what it decoded alive even when the cache lets go of it.
pub struct Index {
    file: Arc<File>,
    objects: Objects,
    /// Commits, trees, blobs, tags.
    types: Arc<[Bits; 4]>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.file.fmt(f)
    }
}

impl Index {
    /// Read the bitmap at `path` (`pack-<hash>.bitmap`) and its pack's index, and decode what
    /// every request needs ([`File::open`] then [`File::try_load`]).
    pub fn open(path: &Path) -> Result<Index, Error> {
        Arc::new(File::open(path)?).try_load()
    }

    /// The bitmap file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The mapped file.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// The pack's objects in bit order.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// How many commits have a bitmap.
    pub fn commits(&self) -> usize {
        self.file.commits()
    }

    /// The entry of commit `id`, if it has a bitmap.
    pub(super) fn entry(&self, id: &ObjectId) -> Option<usize> {
        self.file.entry(id)
    }

    /// What commit `id` reaches, if it has a bitmap (one that cannot be decoded counts as
    /// none).
    pub fn commit_bits(&self, id: &ObjectId) -> Option<Bits> {
        let entry = self.entry(id)?;
        Decoder::new(self)
            .get(entry)
            .ok()
            .map(|bits| (*bits).clone())
    }

    /// The offset deltas of the pack, by base: from the cache, or read from the pack now (and
    /// cached). A pack that cannot be read has none (remembered as such, so that it is not
    /// read again by every request).
    pub(crate) fn children(&self) -> Arc<super::Children> {
        let key = Key(self.file.key, Slot::Children);
        if let Some(Value::Children(children)) = self.file.cache().get(&key) {
            return children;
        }
        let pack = self.path().with_extension("pack");
        let children = Arc::new(
            super::Children::of_pack(&pack, &self.objects).unwrap_or_else(|e| {
                tracing::debug!(pack = %pack.display(), error = %e, "no delta map");
                super::Children::default()
            }),
        );
        self.file
            .cache()
            .put(key, Value::Children(Arc::clone(&children)));
        children
    }

    /// The type bitmaps: commits, trees, blobs, tags.
    pub(super) fn types(&self) -> &[Bits; 4] {
        &self.types
    }

    /// The type of the object at pack position `pos`, from the type bitmaps.
    pub fn kind(&self, pos: usize) -> Option<Kind> {
        [Kind::Commit, Kind::Tree, Kind::Blob, Kind::Tag]
            .into_iter()
            .zip(self.types.iter())
            .find(|(_, bits)| bits.get(pos))
            .map(|(kind, _)| kind)
    }
}

/// Decodes commit bitmaps of one [`Index`] through its file's cache: an entry is stored as the
/// XOR with an earlier one, so decoding one decodes its chain, down to an entry that is cached
/// or stored whole, and caches every entry of it.
pub(super) struct Decoder<'a> {
    index: &'a Index,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(index: &'a Index) -> Self {
        Decoder { index }
    }

    /// The bitmaps decoded.
    pub(super) fn index(&self) -> &'a Index {
        self.index
    }

    /// The objects commit entry `i` reaches.
    pub(super) fn get(&mut self, i: usize) -> Result<Arc<Bits>, String> {
        let file = &self.index.file;
        let cached = |at: usize| match file.cache.get(&Key(file.key, Slot::Commit(at))) {
            Some(Value::Commit(bits)) => Some(bits),
            _ => None,
        };
        let mut chain = Vec::new();
        let mut at = i;
        let mut base = loop {
            if let Some(bits) = cached(at) {
                break Some(bits);
            }
            chain.push(at);
            match usize::from(file.entries[at].xor) {
                0 => break None,
                xor => at -= xor,
            }
        };
        for at in chain.into_iter().rev() {
            let mut bits = file.raw(at, self.index.objects.len())?;
            if let Some(base) = &base {
                bits.xor(base);
            }
            let bits = Arc::new(bits);
            file.decoded.store(true, Ordering::Relaxed);
            file.cache.put(
                Key(file.key, Slot::Commit(at)),
                Value::Commit(Arc::clone(&bits)),
            );
            base = Some(bits);
        }
        base.ok_or_else(|| "bitmap entry not decoded".to_owned())
    }
}
