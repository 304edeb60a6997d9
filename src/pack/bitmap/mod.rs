//! Reachability bitmaps in git's `.bitmap` format (`Documentation/technical/bitmap-format.txt`):
//! for some commits of one pack, the set of objects each reaches, one bit per object in pack
//! order (by offset), EWAH-compressed; plus one bitmap per object type.
//!
//! [`write()`] makes them for the consolidated pack of maintenance; [`File`] maps ours and
//! git's (`git repack -a -d -b`) and [`Index`] decodes what a request needs of them, through a
//! [`Cache`] all mirrors share. [`plan()`] answers `wants − haves` with them as bit
//! arithmetic, walking only the commits and trees newer than the nearest bitmapped commits
//! (git's approach), and gives up — the caller then walks — when a want or have is not in the
//! pack's history within [`MAX_WALK`] commits, or the request needs the walk anyway (a
//! shallow boundary, a `tree:<depth>` filter, a wanted tree). Filters that decide by an
//! object's kind and size are applied to the result.

mod cache;
mod ewah;
mod read;
mod write;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::{FindHeader, Kind, TreeRefIter};
use gix::ObjectId;
use gix_pack::data::entry::Location;
use gix_pack::data::output::Count;
use gix_pack::Find;

pub use cache::{Cache, CACHE_BYTES};
pub use read::{Error as ReadError, File, Index};
pub use write::{
    write, Error as WriteError, Outcome as WriteOutcome, Tips, MAX_COMMITS, MAX_TIPS, SPREAD,
};

use super::planner::{Plan, Selection, Stats, ThinBases};
use super::walk::Commits;
use super::{Db, Error};
use crate::protocol::filter::Filter;

/// At most this many commits are walked on top of the bitmaps (objects newer than the last
/// maintenance, or wants and haves whose commit carries no bitmap) before the planner falls
/// back to the full walk.
pub const MAX_WALK: usize = 10_000;

/// A set of bit positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
}

impl Bits {
    /// An empty set with room for `n` bits.
    pub fn with_len(n: usize) -> Self {
        Bits {
            words: vec![0; n.div_ceil(64)],
        }
    }

    fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: usize) {
        if i / 64 >= self.words.len() {
            self.words.resize(i / 64 + 1, 0);
        }
        self.words[i / 64] |= 1 << (i % 64);
    }

    fn grow(&mut self, len: usize) {
        if self.words.len() < len {
            self.words.resize(len, 0);
        }
    }

    /// Add every bit of `other`.
    pub fn or(&mut self, other: &Bits) {
        self.grow(other.words.len());
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Flip every bit that is set in `other`.
    pub fn xor(&mut self, other: &Bits) {
        self.grow(other.words.len());
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a ^= b;
        }
    }

    /// Remove every bit of `other`.
    pub fn and_not(&mut self, other: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// The set bits, ascending.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let mut w = *w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros() as usize;
                    w &= w - 1;
                    i * 64 + bit
                })
            })
        })
    }

    /// How many bits are set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The heap bytes it takes.
    fn bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }
}

/// The objects of one pack in pack order, the numbering of bitmap bits.
pub struct Objects {
    idx: Arc<gix_pack::index::File>,
    rev: Arc<Rev>,
    /// Where the last entry ends: the start of the pack's trailer.
    end: u64,
}

/// A pack's reverse index: its objects in pack order (by offset), which git stores in a
/// `.rev` file and which is computed here.
pub(crate) struct Rev {
    /// Index position (object id order) of each pack position.
    order: Vec<u32>,
    /// Pack position of each index position.
    position: Vec<u32>,
}

impl Rev {
    fn of(idx: &gix_pack::index::File) -> Rev {
        let mut by_offset: Vec<(u64, u32)> = (0..idx.num_objects())
            .map(|i| (idx.pack_offset_at_index(i), i))
            .collect();
        by_offset.sort_unstable();
        let order: Vec<u32> = by_offset.into_iter().map(|(_, i)| i).collect();
        let mut position = vec![0u32; order.len()];
        for (pos, i) in order.iter().enumerate() {
            // `pos` < the number of objects, which is a u32.
            position[*i as usize] = pos as u32;
        }
        Rev { order, position }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// The heap bytes it takes.
    fn bytes(&self) -> usize {
        (self.order.capacity() + self.position.capacity()) * std::mem::size_of::<u32>()
    }
}

impl Objects {
    /// Read the index of the pack at `pack` (`.pack`, next to its `.idx`).
    pub fn open(pack: &Path) -> Result<Objects, String> {
        let idx_path = pack.with_extension("idx");
        let idx = gix_pack::index::File::at(&idx_path, gix::hash::Kind::Sha1)
            .map_err(|e| format!("reading {}: {e}", idx_path.display()))?;
        let pack_len = std::fs::metadata(pack)
            .map_err(|e| format!("reading {}: {e}", pack.display()))?
            .len();
        Ok(Objects {
            rev: Arc::new(Rev::of(&idx)),
            idx: Arc::new(idx),
            end: pack_len.saturating_sub(gix::hash::Kind::Sha1.len_in_bytes() as u64),
        })
    }

    /// Objects in the pack.
    pub fn len(&self) -> usize {
        self.rev.len()
    }

    /// Whether the pack is empty.
    pub fn is_empty(&self) -> bool {
        self.rev.order.is_empty()
    }

    /// The pack position of `id`, if the pack has it.
    pub fn position(&self, id: &gix::oid) -> Option<usize> {
        self.idx
            .lookup(id)
            .map(|i| self.rev.position[i as usize] as usize)
    }

    /// The object at pack position `pos` (< [`Objects::len`]).
    pub fn id(&self, pos: usize) -> ObjectId {
        self.idx.oid_at_index(self.rev.order[pos]).to_owned()
    }

    /// Where the entry of the object at pack position `pos` starts.
    pub(crate) fn offset(&self, pos: usize) -> u64 {
        self.idx.pack_offset_at_index(self.rev.order[pos])
    }

    /// Where the object at `pos` lies in the pack with gix id `pack_id`.
    pub(crate) fn location(&self, pos: usize, pack_id: u32) -> Location {
        let start = self.offset(pos);
        let end = if pos + 1 < self.len() {
            self.offset(pos + 1)
        } else {
            self.end
        };
        Location {
            pack_id,
            entry_size: usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX),
            pack_offset: start,
        }
    }

    /// The checksum of the pack, which a bitmap names in its header.
    fn pack_checksum(&self) -> ObjectId {
        self.idx.pack_checksum()
    }

    /// The object whose entry starts at `offset`, if one does.
    pub(crate) fn id_at_offset(&self, offset: u64) -> Option<ObjectId> {
        Some(self.id(self.position_at_offset(offset)?))
    }

    /// The pack position of the object whose entry starts at `offset`, if one does.
    pub(crate) fn position_at_offset(&self, offset: u64) -> Option<usize> {
        self.rev
            .order
            .binary_search_by_key(&offset, |i| self.idx.pack_offset_at_index(*i))
            .ok()
    }

    /// gix's id of this pack in `db`, found by looking up a few objects: the pack locations of
    /// [`Objects::location`] then need no lookup per object. `None` when `db` finds those
    /// objects elsewhere (another pack holds them too).
    pub(crate) fn pack_id(&self, db: &Db) -> Option<u32> {
        let mut buf = Vec::new();
        let mut found = None;
        for pos in [0, self.len() / 2, self.len().saturating_sub(1)] {
            if pos >= self.len() {
                return None;
            }
            let location = db.location_by_oid(&self.id(pos), &mut buf).ok()??;
            if location.pack_offset != self.offset(pos)
                || found.is_some_and(|f| f != location.pack_id)
            {
                return None;
            }
            found = Some(location.pack_id);
        }
        found
    }
}

/// The offset deltas of a pack, by base: which entries are stored as deltas against the
/// object at a pack position. The pack writer looks here for another version of a file when
/// the base a version is stored against is not sent (see the pack writer).
#[derive(Default)]
pub struct Children {
    /// (base, delta) pack positions, sorted.
    pairs: Vec<(u32, u32)>,
}

impl Children {
    /// Read the entry headers of the pack at `pack`, whose objects are `objects`.
    fn of_pack(pack: &Path, objects: &Objects) -> Result<Children, String> {
        use gix_pack::data::entry::Header;
        let data = gix_pack::data::File::at(pack, gix::hash::Kind::Sha1)
            .map_err(|e| format!("reading {}: {e}", pack.display()))?;
        let offsets: Vec<u64> = (0..objects.len()).map(|pos| objects.offset(pos)).collect();
        let mut pairs = Vec::new();
        for (pos, offset) in offsets.iter().enumerate() {
            let entry = data.entry(*offset).map_err(|e| e.to_string())?;
            if let Header::OfsDelta { base_distance } = entry.header {
                let base = entry
                    .checked_base_pack_offset(base_distance)
                    .and_then(|base| offsets.binary_search(&base).ok());
                if let Some(base) = base {
                    // Positions are below the object count, a u32.
                    pairs.push((base as u32, pos as u32));
                }
            }
        }
        pairs.sort_unstable();
        Ok(Children { pairs })
    }

    /// The pack positions of the entries stored as deltas against the object at `base`.
    pub(crate) fn of(&self, base: usize) -> impl Iterator<Item = usize> + '_ {
        let base = u32::try_from(base).unwrap_or(u32::MAX);
        let start = self.pairs.partition_point(|p| p.0 < base);
        self.pairs[start..]
            .iter()
            .take_while(move |p| p.0 == base)
            .map(|p| p.1 as usize)
    }

    /// Heap bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.pairs.capacity() * std::mem::size_of::<(u32, u32)>()
    }
}

/// The pack position of every object of a pack, by id.
pub(crate) type Positions = HashMap<ObjectId, u32>;

impl Objects {
    /// The pack position of every object (hashed: about 40 bytes an object).
    pub(crate) fn positions(&self) -> Positions {
        let mut out = Positions::default();
        out.reserve(self.len());
        for (i, pos) in self.rev.position.iter().enumerate() {
            // `i` < the number of objects, a u32.
            out.insert(self.idx.oid_at_index(i as u32).to_owned(), *pos);
        }
        out
    }
}

/// A closed set of objects (everything reachable from what is in it): bits for the objects of
/// the bitmapped pack, ids for the others.
pub(crate) struct Reach<'a> {
    objects: &'a Objects,
    /// The pack position of each object, when the caller built it: a hash lookup instead of
    /// the index's binary search, for walks that look up every object of the pack (the bitmap
    /// writer's).
    positions: Option<&'a Positions>,
    bits: Bits,
    ext: HashMap<ObjectId, Kind>,
    /// Objects visited, for interrupt checks.
    work: usize,
    /// When set, the type of every pack object added, by [`type_index`] (the bitmap writer
    /// learns the types of the pack's objects this way).
    types: Option<[Bits; 4]>,
    /// When set, trees of the pack are read through it rather than the object database.
    reader: Option<PackReader<'a>>,
}

/// The delta-base cache of a [`PackReader`]: trees are read once each, in an order that meets
/// most bases soon after their deltas.
const READER_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Reads the objects of one pack by position, from the pack itself: no index lookup per
/// object (the object database searches each pack's index for every read), for the bitmap
/// writer, which reads every tree of the pack.
pub(crate) struct PackReader<'a> {
    pack: gix_pack::data::File,
    objects: &'a Objects,
    positions: &'a Positions,
    inflate: gix::zlib::Inflate,
    cache: Box<dyn gix_pack::cache::DecodeEntry>,
}

impl<'a> PackReader<'a> {
    /// A reader of the pack at `path`, whose objects are `objects`.
    pub(crate) fn open(
        path: &Path,
        objects: &'a Objects,
        positions: &'a Positions,
    ) -> Result<PackReader<'a>, String> {
        Ok(PackReader {
            pack: gix_pack::data::File::at(path, gix::hash::Kind::Sha1)
                .map_err(|e| format!("reading {}: {e}", path.display()))?,
            objects,
            positions,
            inflate: gix::zlib::Inflate::default(),
            cache: super::delta_base_cache(READER_CACHE_BYTES),
        })
    }

    /// What the entry of the object at pack position `pos` says of its kind: the kind, or for
    /// a delta the pack position of its base (`None`: not in this pack). Nothing is inflated.
    fn stored_kind(&self, pos: usize) -> Result<Result<Kind, Option<usize>>, String> {
        let entry = self
            .pack
            .entry(self.objects.offset(pos))
            .map_err(|e| e.to_string())?;
        Ok(match entry.header {
            gix_pack::data::entry::Header::OfsDelta { base_distance } => Err(entry
                .checked_base_pack_offset(base_distance)
                .and_then(|offset| self.objects.position_at_offset(offset))),
            gix_pack::data::entry::Header::RefDelta { base_id } => {
                Err(self.positions.get(&base_id).map(|p| *p as usize))
            }
            header => Ok(header
                .as_kind()
                .ok_or_else(|| "unknown entry kind".to_owned())?),
        })
    }

    /// The object at pack position `pos`, decoded into `out`: its kind.
    fn read(&mut self, pos: usize, out: &mut Vec<u8>) -> Result<Kind, String> {
        let (pack, objects, positions) = (&self.pack, self.objects, self.positions);
        let entry = pack.entry(objects.offset(pos)).map_err(|e| e.to_string())?;
        let resolve = |id: &gix::oid, _: &mut Vec<u8>| {
            Ok(match positions.get(id) {
                Some(p) => Some(gix_pack::data::decode::entry::ResolvedBase::InPack(
                    pack.entry(objects.offset(*p as usize))?,
                )),
                None => None,
            })
        };
        let outcome = pack
            .decode_entry(entry, out, &mut self.inflate, &resolve, &mut *self.cache)
            .map_err(|e| e.to_string())?;
        Ok(outcome.kind)
    }
}

/// The index of `kind` among the type bitmaps, in git's order: commits, trees, blobs, tags.
fn type_index(kind: Kind) -> usize {
    match kind {
        Kind::Commit => 0,
        Kind::Tree => 1,
        Kind::Blob => 2,
        Kind::Tag => 3,
    }
}

impl<'a> Reach<'a> {
    fn new(objects: &'a Objects) -> Self {
        Reach {
            objects,
            positions: None,
            reader: None,
            bits: Bits::with_len(objects.len()),
            ext: HashMap::default(),
            work: 0,
            types: None,
        }
    }

    fn position(&self, id: &ObjectId) -> Option<usize> {
        match self.positions {
            Some(positions) => positions.get(id).map(|p| *p as usize),
            None => self.objects.position(id),
        }
    }

    fn contains(&self, id: &ObjectId) -> bool {
        match self.position(id) {
            Some(pos) => self.bits.get(pos),
            None => self.ext.contains_key(id),
        }
    }

    /// Add `id`; whether it was new.
    fn insert(&mut self, id: ObjectId, kind: Kind) -> bool {
        match self.position(&id) {
            Some(pos) if self.bits.get(pos) => false,
            Some(pos) => {
                self.bits.set(pos);
                if let Some(types) = &mut self.types {
                    types[type_index(kind)].set(pos);
                }
                true
            }
            None => self.ext.insert(id, kind).is_none(),
        }
    }

    fn tick(&mut self, interrupt: &AtomicBool) -> Result<(), Error> {
        self.work += 1;
        super::check_interrupt(interrupt, self.work)
    }

    /// Add commit `start` and everything it reaches, walking only what is not in the set yet
    /// (the set is closed: what is in it, its history is too). A commit met on the way that
    /// has a bitmap in `bitmaps` adds that instead of being walked. Walks at most `budget`
    /// more commits; `Ok(false)` when that was not enough, and the set is then incomplete.
    fn add_commit(
        &mut self,
        db: &Db,
        commits: &mut Commits<'_>,
        mut bitmaps: Option<&mut read::Decoder<'_>>,
        start: ObjectId,
        budget: &mut usize,
        interrupt: &AtomicBool,
    ) -> Result<bool, Error> {
        let mut stack = vec![start];
        let mut trees = Vec::new();
        while let Some(id) = stack.pop() {
            if self.contains(&id) {
                continue;
            }
            if let Some(decoder) = bitmaps.as_deref_mut() {
                if let Some(entry) = decoder.index().entry(&id) {
                    match decoder.get(entry) {
                        Ok(bits) => {
                            self.bits.or(&bits);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(bitmap = %decoder.index().path().display(), error = %e, "unreadable bitmap: walking instead");
                            return Ok(false);
                        }
                    }
                }
            }
            if *budget == 0 {
                return Ok(false);
            }
            *budget -= 1;
            self.tick(interrupt)?;
            let commit = commits.get(id)?;
            trees.push(commit.tree);
            stack.extend(commit.parents.iter().copied());
            self.insert(id, Kind::Commit);
        }
        // Trees after commits: by then the bitmaps met are in the set, and most trees with them.
        let mut buf = Vec::new();
        for tree in trees {
            self.add_tree(db, tree, &mut buf, interrupt)?;
        }
        Ok(true)
    }

    /// Add tree `root` and everything below it that is not in the set yet.
    fn add_tree(
        &mut self,
        db: &Db,
        root: ObjectId,
        buf: &mut Vec<u8>,
        interrupt: &AtomicBool,
    ) -> Result<(), Error> {
        let mut stack = vec![root];
        while let Some(tree) = stack.pop() {
            if !self.insert(tree, Kind::Tree) {
                continue;
            }
            self.tick(interrupt)?;
            let pos = self.position(&tree);
            let data = match (self.reader.as_mut(), pos) {
                (Some(reader), Some(pos)) => match reader.read(pos, buf) {
                    Ok(Kind::Tree) => &buf[..],
                    Ok(kind) => {
                        return Err(Error::Read {
                            context: "expected a tree at",
                            id: tree,
                            source: format!("found a {kind}").into(),
                        })
                    }
                    Err(message) => {
                        return Err(Error::Read {
                            context: "reading tree",
                            id: tree,
                            source: message.into(),
                        })
                    }
                },
                _ => super::find_kind(db, buf, tree, Kind::Tree)?.0.data,
            };
            for entry in TreeRefIter::from_bytes(data, tree.kind()) {
                let entry = entry.map_err(|e| Error::Read {
                    context: "decoding tree",
                    id: tree,
                    source: e.into(),
                })?;
                // Submodule commits live in another repository.
                if entry.mode.is_tree() {
                    let id = entry.oid.to_owned();
                    if !self.contains(&id) {
                        stack.push(id);
                    }
                } else if !entry.mode.is_commit() {
                    self.insert(entry.oid.to_owned(), Kind::Blob);
                }
            }
        }
        Ok(())
    }

    /// Add everything `ids` reach, using the bitmaps of `index` and walking the rest within
    /// `budget`; `Ok(false)` when that was not enough or an id needs the planner's walk (a
    /// wanted tree, when `trees` is false).
    fn add_all(
        &mut self,
        db: &Db,
        index: &Index,
        ids: &[ObjectId],
        trees: bool,
        budget: &mut usize,
        interrupt: &AtomicBool,
    ) -> Result<bool, Error> {
        let mut commits = Commits::new(db, HashSet::default());
        let mut decoder = read::Decoder::new(index);
        let mut walk = Vec::new();
        let mut buf = Vec::new();
        let mut tree_roots = Vec::new();
        for id in ids {
            let mut id = *id;
            loop {
                let (data, _) = super::find(db, &mut buf, id, "reading object")?;
                match data.kind {
                    Kind::Tag => {
                        let target = super::tag_target(id, data.data)?;
                        self.insert(id, Kind::Tag);
                        id = target;
                    }
                    Kind::Commit => {
                        match index.entry(&id) {
                            Some(entry) => match decoder.get(entry) {
                                Ok(bits) => self.bits.or(&bits),
                                Err(e) => {
                                    tracing::warn!(bitmap = %index.path().display(), error = %e, "unreadable bitmap: walking instead");
                                    return Ok(false);
                                }
                            },
                            None => walk.push(id),
                        }
                        break;
                    }
                    Kind::Tree if trees => {
                        tree_roots.push(id);
                        break;
                    }
                    Kind::Tree => return Ok(false),
                    Kind::Blob => {
                        self.insert(id, Kind::Blob);
                        break;
                    }
                }
            }
        }
        for id in walk {
            if !self.add_commit(db, &mut commits, Some(&mut decoder), id, budget, interrupt)? {
                return Ok(false);
            }
        }
        for tree in tree_roots {
            self.add_tree(db, tree, &mut buf, interrupt)?;
        }
        Ok(true)
    }
}

/// Everything the refs of a snapshot reach, for the reachability checks of wants: computed
/// from the bitmaps once, and kept in the bitmap's cache while it is used.
pub struct Reachable {
    index: Arc<Index>,
    reached: Arc<cache::Reached>,
}

impl Reachable {
    /// What `tips` reach; `None` when the bitmaps do not cover them within [`MAX_WALK`]
    /// commits.
    pub fn compute(
        db: &Db,
        index: Arc<Index>,
        tips: &[ObjectId],
        interrupt: &AtomicBool,
    ) -> Result<Option<Reachable>, Error> {
        let mut reach = Reach::new(index.objects());
        let mut budget = MAX_WALK;
        if !reach.add_all(db, &index, tips, true, &mut budget, interrupt)? {
            return Ok(None);
        }
        let reached = Arc::new(cache::Reached {
            bits: reach.bits,
            ext: reach.ext.into_keys().collect(),
        });
        Ok(Some(Reachable { index, reached }))
    }

    /// What the tips of `owner` (a snapshot, numbered by [`Reachable::owner`]) reach: from the
    /// cache of `index`'s file, or computed with [`Reachable::compute`] and cached under it.
    pub fn cached(
        db: &Db,
        index: Arc<Index>,
        owner: u64,
        tips: impl FnOnce() -> Vec<ObjectId>,
        interrupt: &AtomicBool,
    ) -> Result<Option<Reachable>, Error> {
        let key = cache::Key(owner, cache::Slot::Reachable);
        let file = Arc::clone(index.file());
        let cache = file.cache();
        if let Some(cache::Value::Reachable(reached)) = cache.get(&key) {
            return Ok(reached.map(|reached| Reachable { index, reached }));
        }
        let computed = Reachable::compute(db, index, &tips(), interrupt)?;
        let value = computed.as_ref().map(|r| Arc::clone(&r.reached));
        cache.put(key, cache::Value::Reachable(value));
        Ok(computed)
    }

    /// A number for [`Reachable::cached`] that no other owner has; its values are dropped
    /// with [`Reachable::forget`].
    pub fn owner() -> u64 {
        cache::next_key()
    }

    /// Drop what `owner`'s tips reach from the cache of `file`.
    pub fn forget(file: &File, owner: u64) {
        file.cache().forget(owner);
    }

    /// Whether the tips reach every object of the bitmapped pack and nothing outside it.
    pub fn is_whole_pack(&self) -> bool {
        self.reached.ext.is_empty() && self.reached.bits.count() == self.index.objects().len()
    }

    /// Whether `id` is reachable from the tips.
    pub fn contains(&self, id: &ObjectId) -> bool {
        match self.index.objects().position(id) {
            Some(pos) => self.reached.bits.get(pos),
            None => self.reached.ext.contains(id),
        }
    }
}

/// The plan of `sel` from the bitmaps of `index`: the objects the wants reach minus those the
/// common commits reach, exactly. `None` when the bitmaps cannot answer it (see the module
/// documentation) and the caller must walk.
pub fn plan(
    db: &Db,
    index: &std::sync::Arc<Index>,
    sel: &Selection<'_>,
    interrupt: &AtomicBool,
) -> Result<Option<Plan>, Error> {
    // A filter that decides by kind and size alone applies to the result; one that depends on
    // the depth an object is reached at (`tree:<n>`) needs the walk.
    if !sel.shallow.is_empty() || sel.filter.is_some_and(Filter::depends_on_depth) {
        return Ok(None);
    }
    let objects = index.objects();
    let mut budget = MAX_WALK;
    let mut want = Reach::new(objects);
    if !want.add_all(db, index, sel.wants, false, &mut budget, interrupt)? {
        return Ok(None);
    }
    let mut have = Reach::new(objects);
    if !have.add_all(db, index, sel.common, true, &mut budget, interrupt)? {
        return Ok(None);
    }
    let mut send = want.bits.clone();
    send.and_not(&have.bits);
    let mut ext: HashMap<ObjectId, Kind> = want
        .ext
        .iter()
        .filter(|(id, _)| !have.ext.contains_key(*id))
        .map(|(id, kind)| (*id, *kind))
        .collect();
    // Wanted tags and blobs are sent even to a client that has them (by reachability: a
    // partial clone lacks the blobs of its commits and asks for them by id), as the walk does.
    let wanted = wanted_objects(db, sel.wants)?;
    for (id, kind) in &wanted {
        if matches!(kind, Kind::Tag | Kind::Blob) {
            match objects.position(id) {
                Some(pos) => send.set(pos),
                None => {
                    ext.insert(*id, *kind);
                }
            }
        }
    }
    if let Some(filter) = sel.filter {
        let keep = |id: &ObjectId, kind: Kind| {
            wanted.contains_key(id)
                || filter.includes(kind, 0, &mut || {
                    db.try_header(id).ok().flatten().map_or(0, |h| h.size)
                })
        };
        let mut kept = Bits::with_len(objects.len());
        for (i, pos) in send.ones().enumerate() {
            super::check_interrupt(interrupt, i + 1)?;
            if pos < objects.len() && index.kind(pos).is_some_and(|k| keep(&objects.id(pos), k)) {
                kept.set(pos);
            }
        }
        send = kept;
        ext.retain(|id, kind| keep(id, *kind));
    }

    // include-tag: a tag whose peeled object is sent comes along, with the tags it peels
    // through.
    let mut buf = Vec::new();
    let sent =
        |id: &ObjectId, send: &Bits, ext: &HashMap<ObjectId, Kind>| match objects.position(id) {
            Some(pos) => send.get(pos),
            None => ext.contains_key(id),
        };
    for (tag, peeled) in sel.tags {
        if !sent(peeled, &send, &ext) {
            continue;
        }
        let mut next = *tag;
        while !sent(&next, &send, &ext) {
            let Some((data, _)) = db.try_find(&next, &mut buf).map_err(|e| Error::Read {
                context: "reading tag",
                id: next,
                source: e.into(),
            })?
            else {
                break;
            };
            if data.kind != Kind::Tag {
                break;
            }
            let target = super::tag_target(next, data.data)?;
            match objects.position(&next) {
                Some(pos) => send.set(pos),
                None => {
                    ext.insert(next, Kind::Tag);
                }
            }
            next = target;
        }
    }

    let mut plan = Plan::default();
    let pack_id = objects.pack_id(db);
    let mut location_buf = Vec::new();
    let mut locate = |id: &ObjectId| {
        db.location_by_oid(id, &mut location_buf)
            .map_err(|e| Error::Read {
                context: "locating object",
                id: *id,
                source: e.into(),
            })
    };
    plan.counts.reserve(send.count() + ext.len());
    for (i, pos) in send.ones().enumerate() {
        super::check_interrupt(interrupt, i + 1)?;
        if pos >= objects.len() {
            break;
        }
        let id = objects.id(pos);
        let location = match pack_id {
            Some(pack_id) => Some(objects.location(pos, pack_id)),
            None => locate(&id)?,
        };
        plan.counts.push(Count::from_data(id, location));
        count_kind(&mut plan.stats, index.kind(pos));
    }
    for (id, kind) in &ext {
        let location = locate(id)?;
        if location.is_none() && !db.contains(id) {
            return Err(Error::Missing(*id));
        }
        plan.counts.push(Count::from_data(*id, location));
        count_kind(&mut plan.stats, Some(*kind));
    }
    if sel.thin && !sel.common.is_empty() {
        let mut bases = want.bits;
        bases.or(&have.bits);
        let mut ext_bases: HashSet<ObjectId> = want.ext.into_keys().collect();
        ext_bases.extend(have.ext.into_keys());
        plan.thin_bases = Some(ThinBases::Bitmap {
            index: index.clone(),
            bits: bases,
            ext: ext_bases,
        });
    }
    Ok(Some(plan))
}

/// The wanted objects, and the tags they peel through to the first object that is not a tag,
/// with their kinds: sent whatever the filter says, as the walk does.
fn wanted_objects(db: &Db, wants: &[ObjectId]) -> Result<HashMap<ObjectId, Kind>, Error> {
    let mut out = HashMap::default();
    let mut buf = Vec::new();
    for want in wants {
        let mut id = *want;
        while !out.contains_key(&id) {
            let (data, _) = super::find(db, &mut buf, id, "reading wanted object")?;
            out.insert(id, data.kind);
            if data.kind != Kind::Tag {
                break;
            }
            id = super::tag_target(id, data.data)?;
        }
    }
    Ok(out)
}

fn count_kind(stats: &mut Stats, kind: Option<Kind>) {
    match kind {
        Some(Kind::Commit) => stats.commits += 1,
        Some(Kind::Tree) => stats.trees += 1,
        Some(Kind::Blob) => stats.blobs += 1,
        Some(Kind::Tag) => stats.tags += 1,
        None => {}
    }
}
