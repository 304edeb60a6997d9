//! Object selection and pack generation.
//!
//! [`plan()`] computes the objects a client needs — everything reachable from its wants minus
//! everything reachable from the commits it has in common with us, git's "uninteresting"
//! boundary — and [`write()`] streams them as a pack through gix-pack, copying packed entries
//! and reusing their deltas where the base is in the same pack.
//!
//! Neither knows about the protocol or HTTP: they take object ids and an `io::Write`.

pub mod cache;
mod planner;
pub mod walk;
mod writer;

pub use planner::{plan, Plan, Selection, Stats};
pub use writer::{write, WriteOptions, WriteStats};

use gix::ObjectId;

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
    // inflating, where gix's default small LRU is scanned linearly on every lookup.
    db.set_pack_cache(|| {
        Box::new(gix_pack::cache::lru::MemoryCappedHashmap::new(
            DELTA_BASE_CACHE_BYTES,
        ))
    });
    db
}

/// Per thread of pack work (each thread's handle has its own cache).
const DELTA_BASE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The object an annotated tag points to.
fn tag_target(tag: ObjectId, data: &[u8]) -> Result<ObjectId, Error> {
    gix::objs::TagRefIter::from_bytes(data, tag.kind())
        .target_id()
        .map_err(|e| Error::Read {
            context: "decoding tag",
            id: tag,
            message: e.to_string(),
        })
}

/// Follow `id` through annotated tags to the first object that is not a tag.
fn peel(
    db: &Db,
    buf: &mut Vec<u8>,
    mut id: ObjectId,
) -> Result<(ObjectId, gix::object::Kind), Error> {
    use gix_pack::Find;
    loop {
        let (data, _) = db
            .try_find(&id, buf)
            .map_err(|e| Error::Read {
                context: "reading object",
                id,
                message: e.to_string(),
            })?
            .ok_or(Error::Missing(id))?;
        if data.kind != gix::object::Kind::Tag {
            return Ok((id, data.kind));
        }
        id = tag_target(id, data.data)?;
    }
}

/// Errors of pack planning and writing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An object the pack must contain is not in the repository.
    #[error("object {0} is missing from the repository")]
    Missing(ObjectId),
    /// An object could not be read or decoded.
    #[error("{context} {id}: {message}")]
    Read {
        /// What we were doing.
        context: &'static str,
        /// The object.
        id: ObjectId,
        /// The underlying message.
        message: String,
    },
    /// The commit walk failed.
    #[error("walking commits: {0}")]
    Walk(String),
    /// Writing the pack failed (in gix-pack, or because the client went away).
    #[error("writing pack: {0}")]
    Write(String),
    /// The client went away and the work was stopped.
    #[error("interrupted")]
    Interrupted,
}
