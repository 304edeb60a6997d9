//! Object selection and pack generation.
//!
//! [`plan()`] computes the objects a client needs — everything reachable from its wants minus
//! everything reachable from the commits it has in common with us, git's "uninteresting"
//! boundary — and [`write()`] streams them as a pack through gix-pack, copying packed entries
//! and reusing their deltas where the base is in the same pack.
//!
//! Neither knows about the protocol or HTTP: they take object ids and an `io::Write`.

pub mod bitmap;
pub mod cache;
mod delta;
pub mod graph;
mod planner;
pub mod reuse;
pub mod walk;
mod writer;

pub use planner::{plan, Plan, Selection, Stats, ThinBases};
pub use writer::{write, WriteOptions, WriteStats};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use gix::ObjectId;

/// Every so many steps of a loop whose length the request decides (commits walked, objects
/// planned, haves read), whether the work must stop: the client went away or a time limit
/// passed. `step` counts from 1.
pub fn check_interrupt(interrupt: &AtomicBool, step: usize) -> Result<(), Error> {
    if step.is_multiple_of(INTERRUPT_CHECK_INTERVAL) && interrupt.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// How often (in steps) [`check_interrupt`] looks at the flag.
const INTERRUPT_CHECK_INTERVAL: usize = 1024;

/// Object `id` (read into `buf`) and its pack location; `context` names the read in errors,
/// and a missing object is [`Error::Missing`].
pub(crate) fn find<'b>(
    db: &Db,
    buf: &'b mut Vec<u8>,
    id: ObjectId,
    context: &'static str,
) -> Result<(gix::objs::Data<'b>, Option<gix_pack::data::entry::Location>), Error> {
    use gix_pack::Find;
    db.try_find(&id, buf)
        .map_err(|e| Error::Read {
            context,
            id,
            source: e.into(),
        })?
        .ok_or(Error::Missing(id))
}

/// [`find()`] for an object that must be a `kind` (a commit or a tree, as walks expect).
pub(crate) fn find_kind<'b>(
    db: &Db,
    buf: &'b mut Vec<u8>,
    id: ObjectId,
    kind: gix::object::Kind,
) -> Result<(gix::objs::Data<'b>, Option<gix_pack::data::entry::Location>), Error> {
    use gix::object::Kind;
    let reading = match kind {
        Kind::Commit => "reading commit",
        Kind::Tree => "reading tree",
        Kind::Blob => "reading blob",
        Kind::Tag => "reading tag",
    };
    let (data, location) = find(db, buf, id, reading)?;
    if data.kind != kind {
        return Err(Error::Kind {
            id,
            expected: kind,
            found: data.kind,
        });
    }
    Ok((data, location))
}

/// The object database handle pack generation works on: thread-safe and cheap to clone.
pub type Db = gix::odb::HandleArc;

/// A database handle for pack work on `repo`. Packs stay mapped while it lives, because counts
/// hold pack locations. Its object cache is disabled because a cache hit hides an object's pack
/// location, which would force a needless re-compression.
pub fn db(repo: &gix::Repository) -> Db {
    let mut db = repo.objects.clone().into_inner();
    db.prevent_pack_unload();
    db.unset_object_cache();
    // Trees are mostly deltas against each other: a hashed delta-base cache saves most of the
    // inflating, where gix's default small LRU is scanned linearly on every lookup. Every
    // thread's handle has its own cache; together they stay within the memory budget.
    db.set_pack_cache(|| Box::new(BudgetedCache::new()));
    db
}

/// A delta-base cache of at most `bytes` for one thread of pack work, within the memory budget
/// (see [`db`]).
pub(crate) fn delta_base_cache(bytes: usize) -> Box<dyn gix_pack::cache::DecodeEntry> {
    let mut cache = BudgetedCache::new();
    cache.limit = bytes.min(DELTA_BASE_CACHE_BYTES);
    Box::new(cache)
}

/// At most this much delta-base cache per thread of pack work.
const DELTA_BASE_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// A thread that can reserve less than this works without a cache.
const MIN_CACHE_BYTES: usize = 1024 * 1024;

/// The memory that the delta-base caches of all pack work share (`PACK_MEMORY_BUDGET`):
/// concurrent requests and their threads reserve from it, so their sum stays bounded however
/// many run. A thread that finds the budget spent works uncached, slower but within bounds.
struct MemoryBudget {
    limit: AtomicUsize,
    reserved: AtomicUsize,
}

static BUDGET: MemoryBudget = MemoryBudget {
    limit: AtomicUsize::new(DEFAULT_MEMORY_BUDGET),
    reserved: AtomicUsize::new(0),
};

/// The default of `PACK_MEMORY_BUDGET`.
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// The gauge of the bytes reserved from [`BUDGET`], kept up to date by the reservations.
const RESERVED_GAUGE: &str = "smart_git_proxy_pack_memory_reserved_bytes";

/// Set the memory budget of all delta-base caches of the process, and publish its gauge.
pub fn set_memory_budget(bytes: usize) {
    BUDGET.limit.store(bytes, Ordering::Relaxed);
    // Registered at once, so that it is exported before the first pack (adds nothing).
    metrics::gauge!(RESERVED_GAUGE).increment(0.0);
}

impl MemoryBudget {
    /// Reserve up to `want` bytes; returns what was reserved (maybe 0).
    fn reserve(&self, want: usize) -> usize {
        let mut current = self.reserved.load(Ordering::Relaxed);
        loop {
            let available = self.limit.load(Ordering::Relaxed).saturating_sub(current);
            let take = want.min(available);
            if take < MIN_CACHE_BYTES {
                return 0;
            }
            match self.reserved.compare_exchange_weak(
                current,
                current + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take,
                Err(now) => current = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A delta-base cache whose size is reserved from the process-wide [`MemoryBudget`].
/// It reserves on first use: handles that never decode a delta (a request served from the pack
/// cache) take nothing.
struct BudgetedCache {
    inner: Option<gix_pack::cache::lru::MemoryCappedHashmap>,
    /// At most this much is reserved.
    limit: usize,
    reserved: usize,
    tried: bool,
}

impl BudgetedCache {
    fn new() -> Self {
        BudgetedCache {
            inner: None,
            limit: DELTA_BASE_CACHE_BYTES,
            reserved: 0,
            tried: false,
        }
    }
}

impl gix_pack::cache::DecodeEntry for BudgetedCache {
    fn put(
        &mut self,
        pack_id: u32,
        offset: u64,
        data: &[u8],
        kind: gix::object::Kind,
        compressed_size: usize,
    ) {
        if !self.tried {
            self.tried = true;
            self.reserved = BUDGET.reserve(self.limit);
            metrics::gauge!(RESERVED_GAUGE).increment(self.reserved as f64);
            self.inner = (self.reserved > 0)
                .then(|| gix_pack::cache::lru::MemoryCappedHashmap::new(self.reserved));
        }
        if let Some(inner) = &mut self.inner {
            inner.put(pack_id, offset, data, kind, compressed_size);
        }
    }

    fn get(
        &mut self,
        pack_id: u32,
        offset: u64,
        out: &mut Vec<u8>,
    ) -> Option<(gix::object::Kind, usize)> {
        self.inner.as_mut()?.get(pack_id, offset, out)
    }
}

impl Drop for BudgetedCache {
    fn drop(&mut self) {
        BUDGET.release(self.reserved);
        metrics::gauge!(RESERVED_GAUGE).decrement(self.reserved as f64);
    }
}

/// Object `id` as a whole (non-delta) pack entry, compressed anew: for a delta whose base
/// cannot be referenced where it is written.
pub(crate) fn whole_entry(
    db: &Db,
    id: ObjectId,
    buf: &mut Vec<u8>,
    compression: gix::zlib::Compression,
) -> gix::Result<gix_pack::data::output::Entry> {
    use gix_pack::data::output;
    use gix_pack::Find;
    let (data, location) = db
        .try_find(&id, buf)?
        .ok_or_else(|| gix::error::message!("object {id} vanished while writing a pack"))?;
    output::Entry::from_data(&output::Count::from_data(id, location), &data, compression)
}

/// A zlib compressor kept across entries, for objects compressed anew (whole, one buffer at a
/// time): libdeflate, which compresses a buffer it is given whole about 1.4 times faster than
/// zlib does at the same level, and slightly smaller (the measurements are in
/// `docs/performance.md`). Levels 0–9 mean what they mean to zlib.
pub(crate) struct Deflater {
    compress: libdeflater::Compressor,
}

impl Deflater {
    pub(crate) fn new(level: gix::zlib::Compression) -> Self {
        let level = libdeflater::CompressionLvl::new(level.level().clamp(0, 9)).unwrap_or_default();
        Deflater {
            compress: libdeflater::Compressor::new(level),
        }
    }

    /// `data` as one zlib stream.
    pub(crate) fn deflate(&mut self, data: &[u8]) -> gix::Result<Vec<u8>> {
        let mut out = vec![0; self.compress.zlib_compress_bound(data.len())];
        let written = self
            .compress
            .zlib_compress(data, &mut out)
            .map_err(|e| gix::error::message!("compressing an object: {e}"))?;
        out.truncate(written);
        Ok(out)
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_budget() {
        let budget = MemoryBudget {
            limit: AtomicUsize::new(80 * 1024 * 1024),
            reserved: AtomicUsize::new(0),
        };
        let a = budget.reserve(DELTA_BASE_CACHE_BYTES);
        let b = budget.reserve(DELTA_BASE_CACHE_BYTES);
        let c = budget.reserve(DELTA_BASE_CACHE_BYTES);
        assert_eq!((a, b, c), (32 << 20, 32 << 20, 16 << 20));
        assert_eq!(
            budget.reserve(DELTA_BASE_CACHE_BYTES),
            0,
            "spent: work uncached"
        );
        budget.release(a);
        assert_eq!(budget.reserve(DELTA_BASE_CACHE_BYTES), 32 << 20);
    }

    #[test]
    fn a_reused_deflater_makes_whole_streams() {
        let mut deflater = Deflater::new(gix::zlib::Compression::default());
        let big: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for data in [&b""[..], b"x", b"some text, some text, some text", &big] {
            let compressed = deflater.deflate(data).expect("deflates");
            let mut out = vec![0; data.len()];
            let (status, read, written) = gix::zlib::Inflate::default()
                .once(&compressed, &mut out)
                .expect("inflates");
            assert_eq!(status, gix::zlib::Status::StreamEnd);
            assert_eq!((read, written), (compressed.len(), data.len()));
            assert_eq!(out, data);
        }
    }
}

/// The object an annotated tag points to.
fn tag_target(tag: ObjectId, data: &[u8]) -> Result<ObjectId, Error> {
    gix::objs::TagRefIter::from_bytes(data, tag.kind())
        .target_id()
        .map_err(|e| Error::Read {
            context: "decoding tag",
            id: tag,
            source: e.into(),
        })
}

/// Follow `id` through annotated tags to the first object that is not a tag.
fn peel(
    db: &Db,
    buf: &mut Vec<u8>,
    mut id: ObjectId,
) -> Result<(ObjectId, gix::object::Kind), Error> {
    loop {
        let (data, _) = find(db, buf, id, "reading object")?;
        if data.kind != gix::object::Kind::Tag {
            return Ok((id, data.kind));
        }
        id = tag_target(id, data.data)?;
    }
}

/// A cause as gix reports it.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of pack planning and writing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object the pack must contain is not in the repository.
    #[error("object {0} is missing from the repository")]
    Missing(ObjectId),
    /// An object could not be read or decoded.
    #[error("{context} {id}")]
    Read {
        /// What we were doing.
        context: &'static str,
        /// The object.
        id: ObjectId,
        /// gix's error.
        #[source]
        source: Source,
    },
    /// An object is not of the kind expected where it was found (a corrupt repository).
    #[error("expected a {expected} at {id}, found a {found}")]
    Kind {
        /// The object.
        id: ObjectId,
        /// What it should be.
        expected: gix::object::Kind,
        /// What it is.
        found: gix::object::Kind,
    },
    /// gix-pack could not produce or write an entry.
    #[error("writing pack")]
    Write(#[source] Source),
    /// More objects than a pack header can count.
    #[error("too many objects for one pack")]
    TooManyObjects,
    /// A file could not be read or written: a reused pack, a pack-cache file, the
    /// commit-graph.
    #[error("{what}")]
    File {
        /// The file and what was done with it.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Hashing a pack or a commit-graph failed.
    #[error("hashing {what}")]
    Hash {
        /// What was hashed.
        what: &'static str,
        /// The cause.
        #[source]
        source: Source,
    },
    /// A pack-cache file that is no pack.
    #[error("pack cache: not a pack")]
    NotAPack,
    /// A shared pack generation ended before its pack did (its thread panicked).
    #[error("pack generation stopped")]
    Stopped,
    /// A shared pack generation failed: each of its readers gets the one error.
    #[error(transparent)]
    Shared(Arc<Error>),
    /// The client went away and the work was stopped.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// The error itself, or the one a shared generation failed with: what to classify.
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(e) => e.root(),
            e => e,
        }
    }

    /// A file error: `what` failed (`"reading x"`) because of `source`.
    pub(crate) fn file(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::File { what, source }
    }
}
