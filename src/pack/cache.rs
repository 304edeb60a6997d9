//! The pack cache: finished packs on disk, keyed by the request that produced them, and
//! generations in flight that any number of identical requests share.
//!
//! A pack is a pure function of the resolved request, because objects never change. The key
//! ([`KeyParts`]) is the SHA-1 of, per mirror: the wants (with the commits the shallow boundary
//! adds), the common haves (with the client's unshallowed commits), the shallow grafts, the
//! annotated tags `include-tag` may pull in, the filter, and the options that change the bytes
//! (`ofs-delta`, `thin-pack`, the compression level). What only frames the pack — the protocol
//! version, sideband, progress, the agent — is not part of it, so a v0 and a v2 client asking
//! for the same objects share an entry. An entry never goes stale; it is only evicted, least
//! recently used first, when the cache outgrows its size.
//!
//! [`PackCache::prefill`] starts a generation for no client (`crate::prewarm`); clients that
//! ask meanwhile follow it as they follow each other's.
//!
//! A generation writes the raw pack (no sideband framing, which is per client) into a
//! temporary file; readers follow that file at their own pace, waiting for more only when they
//! catch up with the writer. A slow reader therefore never stalls the writer or the other
//! readers. Only a complete pack is renamed to its final name, and temporaries are removed at
//! start, so a partially written entry is never served, not even after a crash. When every
//! reader has gone the generation is interrupted.
//!
//! Layout: `{dir}/{mirror}-{key}.pack`, where `{mirror}` names the mirror (for per-mirror
//! accounting) and `{key}` is the SHA-1 of the normalized request; in-flight files end in
//! `.tmp`. The modification time records the last use, so the LRU order survives restarts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gix::ObjectId;
use parking_lot::{Condvar, Mutex};

use super::Error;

/// Bump when the bytes a key maps to change (a new writer, new options).
const FORMAT: &str = "smart-git-proxy pack cache 1";
/// The writer publishes its progress to readers in steps of this size.
const PUBLISH_BYTES: usize = 256 * 1024;
/// How often a waiting reader checks whether its own client went away.
const POLL: Duration = Duration::from_millis(100);
/// Below this much free space on the cache's filesystem (or a tenth of a smaller one),
/// requests bypass the cache.
const MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;
/// After a write to the cache failed (a full disk), requests bypass it for this long.
const BYPASS_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// The mirror part of a [`Key`] (and of an entry's file name): the first 8 bytes of the SHA-1
/// of the mirror's name, `host/path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MirrorId([u8; 8]);

impl MirrorId {
    /// The id of the mirror `host/path`.
    pub fn of(name: &str) -> MirrorId {
        let mut h = gix::hash::hasher(gix::hash::Kind::Sha1);
        h.update(name.as_bytes());
        let id = h
            .try_finalize()
            .unwrap_or_else(|_| ObjectId::null(gix::hash::Kind::Sha1));
        let mut mirror = [0u8; 8];
        mirror.copy_from_slice(&id.as_bytes()[..8]);
        MirrorId(mirror)
    }
}

/// The identity of a pack: a hash of the normalized request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    mirror: MirrorId,
    request: ObjectId,
}

impl Key {
    fn file_stem(&self) -> String {
        let mirror: String = self.mirror.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("{mirror}-{}", self.request)
    }
}

/// What goes into a [`Key`]. Lists are sorted and deduplicated, so the order in which a
/// client sent its wants or haves does not matter.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// The mirror, `host/path`.
    pub mirror: &'a str,
    /// Everything the pack starts from (wants, and the shallow boundary's extra wants).
    pub wants: &'a [ObjectId],
    /// Everything it stops at (common haves, and the shallow boundary's extra haves).
    pub common: &'a [ObjectId],
    /// Shallow grafts.
    pub shallow: &'a [ObjectId],
    /// `include-tag` candidates, `(tag, peeled)`.
    pub tags: &'a [(ObjectId, ObjectId)],
    /// The filter, canonically printed.
    pub filter: Option<&'a str>,
    /// Whether in-pack deltas are written as offset deltas.
    pub ofs_delta: bool,
    /// Whether deltas against the client's objects may be sent (a thin pack).
    pub thin: bool,
    /// The zlib level of recompressed objects.
    pub compression: i32,
}

impl KeyParts<'_> {
    /// The key.
    pub fn key(&self) -> Key {
        let mut h = gix::hash::hasher(gix::hash::Kind::Sha1);
        let mut field = |name: &str, bytes: &[u8]| {
            h.update(name.as_bytes());
            h.update(&(bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field("format", FORMAT.as_bytes());
        let mut ids = |name: &str, list: &[ObjectId]| {
            let mut list = list.to_vec();
            list.sort_unstable();
            list.dedup();
            let bytes: Vec<u8> = list.iter().flat_map(|id| id.as_bytes().to_vec()).collect();
            field(name, &bytes);
        };
        ids("want", self.wants);
        ids("common", self.common);
        ids("shallow", self.shallow);
        let mut tags = self.tags.to_vec();
        tags.sort_unstable();
        tags.dedup();
        let tags: Vec<u8> = tags
            .iter()
            .flat_map(|(t, p)| [t.as_bytes(), p.as_bytes()].concat())
            .collect();
        field("tags", &tags);
        field("filter", self.filter.unwrap_or("").as_bytes());
        field("options", &[u8::from(self.ofs_delta), u8::from(self.thin)]);
        field("compression", &self.compression.to_be_bytes());
        let request = h
            .try_finalize()
            .unwrap_or_else(|_| ObjectId::null(gix::hash::Kind::Sha1));
        Key {
            mirror: MirrorId::of(self.mirror),
            request,
        }
    }
}

/// How a pack is to be served.
pub enum Lookup {
    /// A finished pack.
    Hit(Reader),
    /// A generation in flight: follow it.
    Shared(Reader),
    /// Nothing yet: the caller runs the generation into the [`Generation`] (on a thread of its
    /// own, since the reader follows it) and serves the [`Reader`].
    Miss(Generation, Reader),
    /// The cache cannot take this pack (no free space, the file cannot be created): generate
    /// it straight to the client.
    Bypass,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Finished packs served.
    pub hits: AtomicU64,
    /// Generations started.
    pub misses: AtomicU64,
    /// Requests that attached to a generation in flight.
    pub shared: AtomicU64,
    /// Requests that bypassed the cache.
    pub bypassed: AtomicU64,
    /// Bytes of pack read from the cache by clients.
    pub bytes_served: AtomicU64,
    /// Entries evicted.
    pub evictions: AtomicU64,
}

struct Entry {
    size: u64,
    used: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Key, Entry>,
    in_flight: HashMap<Key, Arc<Shared>>,
    total: u64,
    clock: u64,
}

/// The pack cache. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct PackCache {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    tmp_counter: AtomicU64,
    stats: Stats,
    /// Set when writing failed: bypass until then.
    bypass_until: Mutex<Option<Instant>>,
}

impl PackCache {
    /// The cache in `dir`, holding at most `max_bytes` of finished packs. Removes what a previous
    /// process left unfinished and loads the finished entries, oldest use first.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> io::Result<PackCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            if name.ends_with(".tmp") {
                tracing::info!(path = %path.display(), "removing an unfinished pack-cache file");
                std::fs::remove_file(&path)?;
            } else if let Some(key) = name.strip_suffix(".pack").and_then(parse_stem) {
                let meta = entry.metadata()?;
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((used, key, meta.len()));
            }
        }
        found.sort_by_key(|(used, ..)| *used);
        let mut index = Index::default();
        for (_, key, size) in found {
            index.clock += 1;
            index.total += size;
            let used = index.clock;
            index.entries.insert(key, Entry { size, used });
        }
        let inner = Inner {
            dir,
            max_bytes,
            index: Mutex::new(index),
            tmp_counter: AtomicU64::new(0),
            stats: Stats::default(),
            bypass_until: Mutex::new(None),
        };
        inner.evict(&mut inner.index.lock());
        Ok(PackCache {
            inner: Arc::new(inner),
        })
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Bytes of finished packs on disk.
    pub fn total_bytes(&self) -> u64 {
        self.inner.index.lock().total
    }

    /// Finished packs on disk.
    pub fn entries(&self) -> usize {
        self.inner.index.lock().entries.len()
    }

    /// Bytes of finished packs per mirror.
    pub fn bytes_by_mirror(&self) -> HashMap<MirrorId, u64> {
        let index = self.inner.index.lock();
        let mut out = HashMap::new();
        for (key, entry) in &index.entries {
            *out.entry(key.mirror).or_default() += entry.size;
        }
        out
    }

    /// Remove the finished packs of `mirror` (its mirror is being deleted); returns their
    /// bytes. Readers of a removed file keep reading it: it is only unlinked.
    pub fn remove_mirror(&self, mirror: MirrorId) -> u64 {
        let this = &self.inner;
        let mut index = this.index.lock();
        let keys: Vec<Key> = index
            .entries
            .keys()
            .filter(|k| k.mirror == mirror)
            .copied()
            .collect();
        let mut removed = 0;
        for key in keys {
            if let Some(entry) = index.entries.remove(&key) {
                index.total -= entry.size;
                removed += entry.size;
                let path = this.path(&key);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a pack");
                }
            }
        }
        crate::metrics::pack_cache_size(index.entries.len(), index.total);
        removed
    }

    /// Find the pack for `key`, attach to its generation, or start one.
    pub fn lookup(&self, key: Key) -> Lookup {
        let this = &self.inner;
        let mut index = this.index.lock();
        if let Some(used) = index.clock.checked_add(1) {
            index.clock = used;
        }
        let clock = index.clock;
        if let Some(entry) = index.entries.get_mut(&key) {
            entry.used = clock;
            let path = this.path(&key);
            match File::open(&path) {
                Ok(file) => {
                    let len = entry.size;
                    drop(index);
                    // The file's time is the LRU order after a restart.
                    let _ = file.set_modified(SystemTime::now());
                    this.stats.hits.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::pack_cache_lookup("hit");
                    return Lookup::Hit(Reader::finished(file, len, &self.inner));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "pack-cache entry lost");
                    let size = entry.size;
                    index.entries.remove(&key);
                    index.total -= size;
                }
            }
        }
        // A generation whose readers all left is stopping: start a new one instead.
        let running = index
            .in_flight
            .get(&key)
            .filter(|s| !s.abandoned.load(Ordering::Relaxed))
            .cloned();
        if let Some(shared) = running {
            if let Ok(file) = File::open(&shared.tmp) {
                let reader = Reader::following(file, shared, &self.inner);
                drop(index);
                this.stats.shared.fetch_add(1, Ordering::Relaxed);
                crate::metrics::pack_cache_lookup("shared");
                return Lookup::Shared(reader);
            }
        }
        if !this.has_room() {
            this.stats.bypassed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::pack_cache_lookup("bypass");
            return Lookup::Bypass;
        }
        let Some((generation, read)) = self.start(&mut index, key, false) else {
            this.stats.bypassed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::pack_cache_lookup("bypass");
            return Lookup::Bypass;
        };
        let reader = Reader::following(read, Arc::clone(&generation.shared), &self.inner);
        drop(index);
        this.stats.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::pack_cache_lookup("miss");
        Lookup::Miss(generation, reader)
    }

    /// Whether the cache takes new packs now: not when its filesystem is low on space, nor
    /// for a while after a write failed.
    pub fn has_room(&self) -> bool {
        self.inner.has_room()
    }

    /// Start the generation of `key` for no client in particular (a prewarm), unless the cache
    /// has that pack or a generation of it is under way. Clients that ask for the pack
    /// meanwhile follow the generation; it runs to its end even when they all leave. Not counted
    /// as a lookup.
    pub fn prefill(&self, key: Key) -> Prefill {
        let mut index = self.inner.index.lock();
        if let Some(used) = index.clock.checked_add(1) {
            index.clock = used;
        }
        let clock = index.clock;
        if let Some(entry) = index.entries.get_mut(&key) {
            entry.used = clock;
            return Prefill::Present;
        }
        let running = index
            .in_flight
            .get(&key)
            .is_some_and(|s| !s.abandoned.load(Ordering::Relaxed));
        if running {
            return Prefill::Present;
        }
        if !self.inner.has_room() {
            return Prefill::NoRoom;
        }
        match self.start(&mut index, key, true) {
            Some((generation, _)) => Prefill::Generate(generation),
            None => Prefill::NoRoom,
        }
    }

    /// A new generation of `key` in flight, and a second handle on its file for a reader;
    /// `None` when the file cannot be created. A `pinned` generation is not abandoned when its
    /// readers leave.
    fn start(&self, index: &mut Index, key: Key, pinned: bool) -> Option<(Generation, File)> {
        let this = &self.inner;
        let n = this.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = this.dir.join(format!(
            "{}.{}-{n}.tmp",
            key.file_stem(),
            std::process::id()
        ));
        let opened = File::create(&tmp).and_then(|w| Ok((w, File::open(&tmp)?)));
        let (write, read) = match opened {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(path = %tmp.display(), error = %e, "pack cache bypassed");
                let _ = std::fs::remove_file(&tmp);
                return None;
            }
        };
        let shared = Arc::new(Shared {
            tmp,
            state: Mutex::new(State::Running { written: 0 }),
            changed: Condvar::new(),
            readers: AtomicUsize::new(0),
            pinned,
            abandoned: Arc::new(AtomicBool::new(false)),
        });
        index.in_flight.insert(key, Arc::clone(&shared));
        let generation = Generation {
            key,
            shared,
            file: write,
            buf: Vec::with_capacity(PUBLISH_BYTES),
            written: 0,
            cache: Arc::clone(&self.inner),
            done: false,
        };
        Some((generation, read))
    }
}

/// What [`PackCache::prefill`] found.
pub enum Prefill {
    /// The pack is in the cache, or being generated.
    Present,
    /// The cache takes no new pack now ([`PackCache::has_room`]).
    NoRoom,
    /// Nothing yet: the caller writes the pack into this generation.
    Generate(Generation),
}

impl Inner {
    fn has_room(&self) -> bool {
        let failed_lately = self
            .bypass_until
            .lock()
            .is_some_and(|until| Instant::now() < until);
        !failed_lately && !low_on_space(&self.dir)
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.pack", key.file_stem()))
    }

    /// Make a finished generation an entry. A pack larger than the whole cache is not kept:
    /// it would evict every other entry and then itself.
    fn finish(&self, key: Key, shared: &Shared, len: u64) -> io::Result<()> {
        let mut index = self.index.lock();
        self.forget(&mut index, key, shared);
        if len > self.max_bytes {
            let _ = std::fs::remove_file(&shared.tmp);
            return Ok(());
        }
        let path = self.path(&key);
        std::fs::rename(&shared.tmp, &path)?;
        index.clock += 1;
        let used = index.clock;
        if let Some(old) = index.entries.insert(key, Entry { size: len, used }) {
            index.total -= old.size;
        }
        index.total += len;
        self.evict(&mut index);
        Ok(())
    }

    fn abort(&self, key: Key, shared: &Shared) {
        let mut index = self.index.lock();
        self.forget(&mut index, key, shared);
        let _ = std::fs::remove_file(&shared.tmp);
    }

    /// Take `shared` out of the generations in flight, unless a newer one replaced it.
    fn forget(&self, index: &mut Index, key: Key, shared: &Shared) {
        if index
            .in_flight
            .get(&key)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), shared))
        {
            index.in_flight.remove(&key);
        }
    }

    /// Remove least recently used entries until the total fits. Readers of an evicted file keep
    /// reading it: it is only unlinked.
    fn evict(&self, index: &mut Index) {
        self.evict_to(index);
        crate::metrics::pack_cache_size(index.entries.len(), index.total);
    }

    fn evict_to(&self, index: &mut Index) {
        while index.total > self.max_bytes {
            let Some((&key, _)) = index.entries.iter().min_by_key(|(_, e)| e.used) else {
                break;
            };
            if let Some(entry) = index.entries.remove(&key) {
                index.total -= entry.size;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                crate::metrics::pack_cache_eviction();
                let path = self.path(&key);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot evict a pack");
                }
            }
        }
    }
}

/// Bytes of finished packs per mirror in the cache directory `dir`, read from the directory
/// itself (for another process than the server's, e.g. `smart-git-proxy mirrors`).
pub fn bytes_by_mirror_on_disk(dir: &Path) -> io::Result<HashMap<MirrorId, u64>> {
    let mut out = HashMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(key) = name
            .to_string_lossy()
            .strip_suffix(".pack")
            .and_then(parse_stem)
        {
            *out.entry(key.mirror).or_default() += entry.metadata()?.len();
        }
    }
    Ok(out)
}

fn parse_stem(stem: &str) -> Option<Key> {
    let (mirror, request) = stem.split_once('-')?;
    if mirror.len() != 16 {
        return None;
    }
    let mut m = [0u8; 8];
    for (i, b) in m.iter_mut().enumerate() {
        *b = u8::from_str_radix(mirror.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Key {
        mirror: MirrorId(m),
        request: ObjectId::from_hex(request.as_bytes()).ok()?,
    })
}

/// Whether the filesystem of `dir` has less than [`MIN_FREE_BYTES`] free for unprivileged
/// users, or less than a tenth of its size when that is smaller. `/readyz` uses the same
/// floor for `MIRROR_DIR`.
pub(crate) fn low_on_space(dir: &Path) -> bool {
    let Ok(stat) = rustix::fs::statvfs(dir) else {
        return false;
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let size = stat.f_blocks.saturating_mul(stat.f_frsize);
    free < MIN_FREE_BYTES.min(size / 10)
}

enum State {
    Running { written: u64 },
    Done { len: u64 },
    Failed(Arc<Error>),
}

/// A generation in flight, as its readers see it.
struct Shared {
    tmp: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
    readers: AtomicUsize,
    /// Started for no client (a prewarm): readers that leave do not stop it.
    pinned: bool,
    /// Every reader went away: the generation should stop.
    abandoned: Arc<AtomicBool>,
}

/// The writing end of a generation: an `io::Write` for the raw pack. Call
/// [`Generation::finish`] when the pack is complete; dropping it otherwise (or calling
/// [`Generation::fail`]) fails the generation for every reader and removes its file.
pub struct Generation {
    key: Key,
    shared: Arc<Shared>,
    file: File,
    buf: Vec<u8>,
    written: u64,
    cache: Arc<Inner>,
    done: bool,
}

impl Generation {
    /// Set when every reader has gone: stop generating.
    pub fn abandoned(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shared.abandoned)
    }

    fn publish(&mut self) -> io::Result<()> {
        if let Err(e) = self.file.write_all(&self.buf) {
            // Most likely a full disk: let the next requests bypass the cache for a while.
            tracing::warn!(error = %e, "pack cache: write failed, bypassing the cache for a while");
            *self.cache.bypass_until.lock() = Some(Instant::now() + BYPASS_AFTER_FAILURE);
            return Err(e);
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
        *self.shared.state.lock() = State::Running {
            written: self.written,
        };
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The pack is complete: make it a cache entry.
    pub fn finish(mut self) -> Result<u64, Error> {
        // The file's time is its last use (the kernel's write times are too coarse to order
        // packs written in quick succession). On disk before it gets its final name: a power
        // loss must not leave a truncated pack under a name that is served.
        let written = self.publish().and_then(|()| {
            let _ = self.file.set_modified(SystemTime::now());
            self.file.sync_all()
        });
        if let Err(e) = written {
            let error = Arc::new(Error::file("pack cache: writing a pack")(e));
            self.fail_with(Arc::clone(&error));
            return Err(Error::Shared(error));
        }
        let len = self.written;
        self.done = true;
        let cache = Arc::clone(&self.cache);
        if let Err(e) = cache.finish(self.key, &self.shared, len) {
            // The readers have the whole pack open; only the entry is lost.
            tracing::warn!(error = %e, "cannot keep a finished pack in the cache");
            cache.abort(self.key, &self.shared);
        }
        *self.shared.state.lock() = State::Done { len };
        self.shared.changed.notify_all();
        Ok(len)
    }

    /// The generation failed with `error`: every reader gets it.
    pub fn fail(mut self, error: Arc<Error>) {
        self.fail_with(error);
    }

    fn fail_with(&mut self, error: Arc<Error>) {
        self.done = true;
        // Out of the index first, so that no new request attaches to a failed generation.
        self.cache.abort(self.key, &self.shared);
        *self.shared.state.lock() = State::Failed(error);
        self.shared.changed.notify_all();
    }
}

impl Write for Generation {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.shared.abandoned.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "every reader left",
            ));
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PUBLISH_BYTES {
            self.publish()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            // Neither finished nor failed explicitly (a panic): readers must not wait forever.
            self.fail_with(Arc::new(Error::Stopped));
        }
    }
}

/// Reads one cached pack, following its generation while it runs.
pub struct Reader {
    file: File,
    offset: u64,
    /// `None` for a finished pack of known length.
    shared: Option<Arc<Shared>>,
    len: Option<u64>,
    cache: Arc<Inner>,
}

impl Reader {
    fn finished(file: File, len: u64, cache: &Arc<Inner>) -> Reader {
        Reader {
            file,
            offset: 0,
            shared: None,
            len: Some(len),
            cache: Arc::clone(cache),
        }
    }

    /// A reader of a generation in flight; call with the index locked (see `Drop`).
    fn following(file: File, shared: Arc<Shared>, cache: &Arc<Inner>) -> Reader {
        shared.readers.fetch_add(1, Ordering::Relaxed);
        Reader {
            file,
            offset: 0,
            shared: Some(shared),
            len: None,
            cache: Arc::clone(cache),
        }
    }

    /// Wait until at least `want` bytes are there (or the pack is complete); `Ok(available)`.
    fn wait_for(&mut self, want: u64, interrupt: &AtomicBool) -> Result<u64, Error> {
        if let Some(len) = self.len {
            return Ok(len);
        }
        let Some(shared) = &self.shared else {
            return Ok(0);
        };
        let mut state = shared.state.lock();
        loop {
            match &*state {
                State::Done { len } => {
                    let len = *len;
                    self.len = Some(len);
                    return Ok(len);
                }
                State::Failed(e) => return Err(Error::Shared(Arc::clone(e))),
                State::Running { written } if *written >= want => return Ok(*written),
                State::Running { .. } => {
                    if interrupt.load(Ordering::Relaxed) {
                        return Err(Error::Interrupted);
                    }
                    shared.changed.wait_for(&mut state, POLL);
                }
            }
        }
    }

    /// Wait until the pack has started (its header is written, so planning succeeded) and
    /// return the number of objects it holds; or the error the generation failed with.
    pub fn start(&mut self, interrupt: &AtomicBool) -> Result<u32, Error> {
        self.wait_for(12, interrupt)?;
        let mut header = [0u8; 12];
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.read_exact(&mut header))
            .and_then(|()| self.file.seek(SeekFrom::Start(self.offset)))
            .map_err(Error::file("pack cache: reading a pack"))?;
        if &header[..4] != b"PACK" {
            return Err(Error::NotAPack);
        }
        Ok(u32::from_be_bytes([
            header[8], header[9], header[10], header[11],
        ]))
    }

    /// Read the next bytes of the pack into `buf`, waiting for the generation if needed; 0 at
    /// the end.
    pub fn read(&mut self, buf: &mut [u8], interrupt: &AtomicBool) -> Result<usize, Error> {
        let available = self.wait_for(self.offset + 1, interrupt)?;
        let n = (available.saturating_sub(self.offset)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file
            .read_exact(&mut buf[..n])
            .map_err(Error::file("pack cache: reading a pack"))?;
        self.offset += n as u64;
        self.cache
            .stats
            .bytes_served
            .fetch_add(n as u64, Ordering::Relaxed);
        crate::metrics::pack_cache_bytes_served(n as u64);
        Ok(n)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            // Under the index lock, as `lookup` attaches readers: a request never attaches to a
            // generation that its last reader is abandoning.
            let _index = self.cache.index.lock();
            if shared.readers.fetch_sub(1, Ordering::Relaxed) == 1 && !shared.pinned {
                let running = matches!(*shared.state.lock(), State::Running { .. });
                if running {
                    shared.abandoned.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(wants: &'a [ObjectId], mirror: &'a str) -> KeyParts<'a> {
        KeyParts {
            mirror,
            wants,
            common: &[],
            shallow: &[],
            tags: &[],
            filter: None,
            ofs_delta: true,
            thin: false,
            compression: 6,
        }
    }

    fn key(n: u8) -> Key {
        parts(&[ObjectId::from_bytes_or_panic(&[n; 20])], "example.com/r").key()
    }

    fn miss(cache: &PackCache, key: Key) -> (Generation, Reader) {
        match cache.lookup(key) {
            Lookup::Miss(generation, reader) => (generation, reader),
            _ => panic!("expected a miss"),
        }
    }

    /// Put a fake pack of `len` bytes under `key`.
    fn put(cache: &PackCache, key: Key, len: usize) {
        let Lookup::Miss(mut generation, _reader) = cache.lookup(key) else {
            panic!("expected a miss");
        };
        let mut data = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        data.resize(len, 7);
        generation.write_all(&data).unwrap();
        generation.finish().unwrap();
    }

    fn read_all(mut reader: Reader) -> Vec<u8> {
        let interrupt = AtomicBool::new(false);
        assert_eq!(reader.start(&interrupt).unwrap(), 1);
        let mut out = Vec::new();
        let mut buf = [0u8; 100];
        loop {
            let n = reader.read(&mut buf, &interrupt).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn keys_ignore_the_order_of_lists_but_not_their_content() {
        let (a, b) = (
            ObjectId::from_bytes_or_panic(&[1; 20]),
            ObjectId::from_bytes_or_panic(&[2; 20]),
        );
        assert_eq!(parts(&[a, b], "m").key(), parts(&[b, a, a], "m").key());
        assert_ne!(parts(&[a], "m").key(), parts(&[a, b], "m").key());
        assert_ne!(parts(&[a], "m").key(), parts(&[a], "n").key());
        let a_only = [a];
        let mut other = parts(&a_only, "m");
        other.ofs_delta = false;
        assert_ne!(parts(&[a], "m").key(), other.key());
        let mut thin = parts(&a_only, "m");
        thin.thin = true;
        assert_ne!(parts(&[a], "m").key(), thin.key());
        // Wants and haves do not blend: the same ids in another role are another pack.
        let a_list = [a];
        let mut swapped = parts(&[], "m");
        swapped.common = &a_list;
        assert_ne!(parts(&[a], "m").key(), swapped.key());
    }

    #[test]
    fn least_recently_used_packs_go_first_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 250).unwrap();
        put(&cache, key(1), 100);
        put(&cache, key(2), 100);
        // A hit makes 1 the most recently used.
        let Lookup::Hit(reader) = cache.lookup(key(1)) else {
            panic!("expected a hit");
        };
        assert_eq!(read_all(reader).len(), 100);
        put(&cache, key(3), 100);
        assert!(
            matches!(cache.lookup(key(2)), Lookup::Miss(..)),
            "2 was evicted"
        );
        assert_eq!(cache.entries(), 2);
        assert!(cache.total_bytes() <= 250);
        drop(cache);

        // The order survives: 1 was used before 3 was written.
        let cache = PackCache::open(dir.path(), 250).unwrap();
        assert_eq!(cache.entries(), 2);
        put(&cache, key(4), 100);
        assert!(matches!(cache.lookup(key(3)), Lookup::Hit(..)));
        assert!(matches!(cache.lookup(key(1)), Lookup::Miss(..)));
    }

    #[test]
    fn a_mirrors_packs_are_counted_and_removed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        let other =
            |n: u8| parts(&[ObjectId::from_bytes_or_panic(&[n; 20])], "example.com/o").key();
        put(&cache, key(1), 100);
        put(&cache, key(2), 50);
        put(&cache, other(3), 70);
        let (mine, theirs) = (MirrorId::of("example.com/r"), MirrorId::of("example.com/o"));
        let by_mirror = cache.bytes_by_mirror();
        assert_eq!((by_mirror[&mine], by_mirror[&theirs]), (150, 70));
        assert_eq!(bytes_by_mirror_on_disk(dir.path()).unwrap(), by_mirror);
        assert_eq!(cache.remove_mirror(mine), 150);
        assert_eq!((cache.entries(), cache.total_bytes()), (1, 70));
        assert!(matches!(cache.lookup(key(1)), Lookup::Miss(..)));
        assert!(matches!(cache.lookup(other(3)), Lookup::Hit(..)));
        assert_eq!(bytes_by_mirror_on_disk(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn a_pack_larger_than_the_cache_is_served_but_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 250).unwrap();
        put(&cache, key(1), 100);
        let (mut generation, reader) = miss(&cache, key(2));
        let mut data = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        data.resize(300, 7);
        generation.write_all(&data).unwrap();
        generation.finish().unwrap();
        assert_eq!(read_all(reader).len(), 300, "its readers get all of it");
        assert!(
            matches!(cache.lookup(key(1)), Lookup::Hit(..)),
            "the others stay"
        );
        assert!(matches!(cache.lookup(key(2)), Lookup::Miss(..)));
        assert_eq!(cache.entries(), 1);
    }

    #[test]
    fn unfinished_packs_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        let (mut generation, reader) = miss(&cache, key(1));
        generation.write_all(&[0; PUBLISH_BYTES + 1]).unwrap();
        // A crash leaves the temporary: a new process removes it and does not serve it.
        let leftover = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftover, 1);
        std::mem::forget(generation);
        drop(reader);
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(cache.lookup(key(1)), Lookup::Miss(..)));

        // A generation that stops without finishing fails its readers and leaves nothing.
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        let (generation, mut reader) = miss(&cache, key(2));
        let Lookup::Shared(mut other) = cache.lookup(key(2)) else {
            panic!("expected to attach");
        };
        generation.fail(Arc::new(Error::Missing(ObjectId::null(
            gix::hash::Kind::Sha1,
        ))));
        let interrupt = AtomicBool::new(false);
        let missing = |e: Error| matches!(e.root(), Error::Missing(_));
        assert!(reader.start(&interrupt).is_err_and(missing));
        assert!(other.read(&mut [0; 8], &interrupt).is_err_and(missing));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(cache.entries(), 0);
    }

    #[test]
    fn a_prefill_is_shared_by_clients_and_outlives_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        let Prefill::Generate(mut generation) = cache.prefill(key(1)) else {
            panic!("expected to generate");
        };
        assert!(matches!(cache.prefill(key(1)), Prefill::Present), "running");
        let Lookup::Shared(client) = cache.lookup(key(1)) else {
            panic!("a client follows the prefill");
        };
        drop(client);
        assert!(!generation.abandoned().load(Ordering::Relaxed));
        let mut data = b"PACK\0\0\0\x02\0\0\0\x01".to_vec();
        data.resize(100, 7);
        generation.write_all(&data).unwrap();
        generation.finish().unwrap();
        assert!(
            matches!(cache.prefill(key(1)), Prefill::Present),
            "finished"
        );
        let Lookup::Hit(reader) = cache.lookup(key(1)) else {
            panic!("expected a hit");
        };
        assert_eq!(read_all(reader), data);
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_generation_stops_when_every_reader_left() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PackCache::open(dir.path(), 1 << 20).unwrap();
        let (mut generation, reader) = miss(&cache, key(1));
        let Lookup::Shared(other) = cache.lookup(key(1)) else {
            panic!("expected to attach");
        };
        drop(reader);
        assert!(!generation.abandoned().load(Ordering::Relaxed));
        drop(other);
        assert!(generation.abandoned().load(Ordering::Relaxed));
        assert!(generation.write_all(&[0; 10]).is_err());
        // A request arriving now does not attach to the stopping generation: it starts anew.
        assert!(matches!(cache.lookup(key(1)), Lookup::Miss(..)));
    }
}
