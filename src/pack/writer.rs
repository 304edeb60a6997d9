//! Pack writing on gix-pack: entries are produced on worker threads in chunks and written in
//! order, so memory holds a few chunks of compressed entries, never the whole pack. Thin packs
//! (fetches) make their entries on the writing thread instead ([`ThinEntries`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;
use gix_pack::data::output::{self, bytes::FromEntriesIter, entry::Kind as EntryKind};

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use gix_pack::data::output::Count;
use gix_pack::Find;

use super::{bitmap, Db, Error, Plan, ThinBases};

/// Knobs of [`write()`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// The client understands offset deltas. Without it, in-pack deltas are written as
    /// ref-deltas against their (in-pack) base.
    pub ofs_delta: bool,
    /// Threads compressing entries; `None` uses every core.
    pub thread_limit: Option<usize>,
    /// zlib level (0–9) for objects that cannot be copied from a pack and are compressed anew,
    /// e.g. the delta bases a shallow pack must send whole.
    pub compression: gix::zlib::Compression,
}

/// What [`write()`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Objects written.
    pub objects: usize,
    /// Entries written as deltas (copied from an existing pack).
    pub deltas: usize,
    /// Of those, deltas against an object the client has, outside the pack (a thin pack).
    pub thin_deltas: usize,
    /// Bytes written, trailer included.
    pub bytes: u64,
}

/// Write `plan` as a version 2 pack to `out`. Stops early with [`Error::Interrupted`] once
/// `interrupt` is set.
pub fn write(
    db: Db,
    plan: Plan,
    out: impl Write,
    opts: WriteOptions,
    interrupt: &AtomicBool,
) -> Result<WriteStats, Error> {
    let num_objects = u32::try_from(plan.counts.len()).map_err(|_| Error::TooManyObjects)?;
    let entries: Box<dyn Iterator<Item = gix::Result<Vec<output::Entry>>>> = match plan.thin_bases {
        Some(bases) => Box::new(ThinEntries::new(
            db.clone(),
            plan.counts,
            bases,
            opts.compression,
        )),
        None => Box::new(gix::parallel::InOrderIter::from(parallel_entries(
            db.clone(),
            plan.counts,
            plan.source,
            opts,
        ))),
    };

    let mut stats = WriteStats::default();
    let mut ids: Vec<ObjectId> = Vec::new();
    let ofs_delta = opts.ofs_delta;
    let stats_ref = &mut stats;
    let entries = entries.map(move |chunk| {
        if interrupt.load(Ordering::Relaxed) {
            return Err(gix::error::message("interrupted").into());
        }
        let mut chunk = chunk?;
        for entry in &mut chunk {
            stats_ref.objects += 1;
            match entry.kind {
                EntryKind::DeltaRef { object_index } => {
                    stats_ref.deltas += 1;
                    if !ofs_delta {
                        entry.kind = EntryKind::DeltaOid {
                            id: ids[object_index],
                        };
                    }
                }
                // Only thin packs have them, against a base the client has.
                EntryKind::DeltaOid { .. } => {
                    stats_ref.deltas += 1;
                    stats_ref.thin_deltas += 1;
                }
                EntryKind::Base(_) => {}
            }
            if !ofs_delta {
                ids.push(entry.id);
            }
        }
        Ok(chunk)
    });
    let mut writer = FromEntriesIter::new(
        entries,
        out,
        num_objects,
        gix_pack::data::Version::V2,
        gix::hash::Kind::Sha1,
    );
    let mut bytes = 0;
    for written in writer.by_ref() {
        match written {
            Ok(n) => bytes += n,
            Err(e) if interrupt.load(Ordering::Relaxed) => {
                tracing::debug!(error = %e, "pack writing interrupted");
                return Err(Error::Interrupted);
            }
            Err(e) => return Err(Error::Write(e.into())),
        }
    }
    drop(writer);
    stats.bytes = bytes;
    Ok(stats)
}

/// The counts of a pack sorted by pack and offset (unpacked objects first), as gix-pack orders
/// entries, and the range of each pack in them: a delta whose base is in the same range is
/// written as an offset delta.
struct Sorted {
    counts: Vec<Count>,
    ranges: Vec<(u32, Range<usize>)>,
}

impl Sorted {
    fn new(mut counts: Vec<Count>) -> Self {
        counts.sort_by_key(Sorted::key);
        let mut ranges: Vec<(u32, Range<usize>)> = Vec::new();
        for (i, count) in counts.iter().enumerate() {
            if let Some(location) = count.entry_pack_location.as_ref() {
                match ranges.last_mut() {
                    Some((pack, range)) if *pack == location.pack_id => range.end = i + 1,
                    _ => ranges.push((location.pack_id, i..i + 1)),
                }
            }
        }
        Sorted { counts, ranges }
    }

    /// The index of the count of the object at `offset` in pack `pack_id`, if there is one.
    fn index_of(&self, pack_id: u32, offset: u64) -> Option<usize> {
        self.counts
            .binary_search_by_key(&Some((pack_id, offset)), Sorted::key)
            .ok()
    }

    /// The order of counts: by pack, then offset; unpacked objects first.
    fn key(count: &Count) -> Option<(u32, u64)> {
        count
            .entry_pack_location
            .as_ref()
            .map(|l| (l.pack_id, l.pack_offset))
    }

    /// The range of `counts` in pack `pack_id`, or `i..i + 1` (no other base).
    fn range(&self, pack_id: u32, i: usize) -> Range<usize> {
        self.ranges
            .binary_search_by_key(&pack_id, |r| r.0)
            .map(|r| self.ranges[r].1.clone())
            .unwrap_or(i..i + 1)
    }
}

/// Objects per chunk of work of [`parallel_entries`], at most: small enough that every thread
/// gets several chunks of a `--depth=1` pack (a few thousand objects), large enough that
/// handing a chunk over costs nothing next to compressing it.
const MAX_CHUNK: usize = 256;

/// The entries of a pack that is not thin, made by `opts.thread_limit` threads (every core by
/// default) in chunks of consecutive counts and handed back tagged with their order. Each
/// thread keeps its own database handle (and so its own delta-base cache: consecutive counts
/// share delta chains) and its own zlib state: an object that cannot be copied (a delta whose
/// base is not in the pack, such as most of a `--depth=1` pack) is decoded and compressed
/// anew, and compression is most of that pack's cost.
fn parallel_entries(
    db: Db,
    counts: Vec<Count>,
    source: Option<(Arc<bitmap::Index>, u32)>,
    opts: WriteOptions,
) -> impl Iterator<Item = gix::Result<(gix::parallel::SequenceId, Vec<output::Entry>)>> {
    let threads = gix::parallel::num_threads(opts.thread_limit);
    let sorted = Arc::new(Sorted::new(counts));
    let len = sorted.counts.len();
    let chunk = (len / (threads * 4)).clamp(1, MAX_CHUNK);
    let chunks = (0..len.div_ceil(chunk)).map(move |n| (n, n * chunk..((n + 1) * chunk).min(len)));
    let compression = opts.compression;
    gix::parallel::Stepwise::new(
        chunks,
        Some(threads),
        move |_| {
            let decoder = source
                .clone()
                .map(|(index, pack_id)| Decoder::new(index, pack_id));
            (
                db.clone(),
                Vec::new(),
                super::Deflater::new(compression),
                decoder,
            )
        },
        move |(n, range): (usize, Range<usize>), (db, buf, deflater, decoder)| {
            let mut out = Vec::with_capacity(range.len());
            for i in range {
                out.push(copied_or_compressed(
                    db,
                    &sorted,
                    i,
                    buf,
                    deflater,
                    decoder.as_mut(),
                )?);
            }
            Ok((n, out))
        },
        gix::parallel::IdentityWithResult::<_, gix::Error>::default(),
    )
}

/// How `from_pack_entry` names a delta's base outside the pack (thin packs only).
type BaseLookup = fn(u32, u64) -> gix::Result<Option<ObjectId>>;

/// Entry `i` of `sorted`: copied from its pack when it is whole or a delta against another
/// object of the pack, otherwise decoded (by `decoder` when it reads that pack) and compressed
/// whole.
fn copied_or_compressed(
    db: &Db,
    sorted: &Sorted,
    i: usize,
    buf: &mut Vec<u8>,
    deflater: &mut super::Deflater,
    decoder: Option<&mut Decoder>,
) -> gix::Result<output::Entry> {
    let count = &sorted.counts[i];
    if let Some(location) = count.entry_pack_location.as_ref() {
        if let Some(packed) = db.entry_by_location(location) {
            let range = sorted.range(location.pack_id, i);
            let no_thin_bases: Option<BaseLookup> = None;
            if let Some(entry) = output::Entry::from_pack_entry(
                packed,
                count,
                &sorted.counts[range.clone()],
                range.start,
                no_thin_bases,
                gix_pack::data::Version::V2,
            ) {
                return entry;
            }
        }
    }
    let id = count.id;
    let decoded = match (decoder, count.entry_pack_location.as_ref()) {
        (Some(decoder), Some(location)) => decoder.decode(db, location, i, |offset| {
            sorted.index_of(location.pack_id, offset)
        }),
        _ => None,
    };
    let (kind, data) = match decoded {
        Some(decoded) => {
            if let Some((index, base)) = decoded.base {
                if let Some(entry) = delta_in_pack(id, decoded.data, index, base, deflater)? {
                    return Ok(entry);
                }
            }
            (decoded.kind, decoded.data)
        }
        None => {
            let (data, _) = db
                .try_find(&id, buf)?
                .ok_or_else(|| gix::error::message!("object {id} vanished while writing a pack"))?;
            (data.kind, data.data)
        }
    };
    Ok(output::Entry {
        id,
        kind: EntryKind::Base(kind),
        decompressed_size: data.len(),
        compressed_data: deflater.deflate(data)?,
    })
}

/// Object `id` (`target`) as a delta against the object written `index`-th in the pack
/// (`base`, the same kind), when that is at most half its size, git's rule for a new delta;
/// `None` otherwise.
fn delta_in_pack(
    id: ObjectId,
    target: &[u8],
    index: usize,
    base: &[u8],
    deflater: &mut super::Deflater,
) -> gix::Result<Option<output::Entry>> {
    let Some(delta) = new_delta(base, target, target.len() / 2) else {
        return Ok(None);
    };
    Ok(Some(output::Entry {
        id,
        kind: EntryKind::DeltaRef {
            object_index: index,
        },
        decompressed_size: delta.len(),
        compressed_data: deflater.deflate(&delta)?,
    }))
}

/// The delta that makes `target` from `base`, when it is at most `max` bytes and neither is
/// larger than [`MAX_DELTA_OBJECT`].
fn new_delta(base: &[u8], target: &[u8], max: usize) -> Option<Vec<u8>> {
    // A delta inserts at least what the target has more than the base.
    if max == 0
        || target.len() > MAX_DELTA_OBJECT
        || base.len() > MAX_DELTA_OBJECT
        || target.len() > base.len().saturating_add(max)
    {
        return None;
    }
    super::delta::Index::new(base).and_then(|base| super::delta::encode(&base, target, max))
}

/// What [`Decoder::decode`] made of an object.
struct Decoded<'a> {
    kind: gix::object::Kind,
    data: &'a [u8],
    /// The nearest object of its stored delta chain that the pack sends, as the index of its
    /// entry and its data: a base for a new delta (see [`Decoder`]).
    base: Option<(usize, &'a [u8])>,
}

/// Delta chains deeper than this are left to gix-pack.
const MAX_CHAIN: usize = 10_000;
/// Objects (and deltas) larger than this are left to gix-pack: the size comes from the pack
/// entry's header, and is allocated before anything is inflated.
const MAX_DECODED: usize = 1 << 30;

/// Decodes objects of the bitmapped pack for [`copied_or_compressed`], from the pack entries
/// themselves: the entries of a delta chain are found by offset through the bitmap's pack
/// order, inflated with libdeflate (which inflates a buffer of known size about 1.45 times
/// faster than zlib-rs on these objects) and patched with [`super::delta::apply`]. Most of a
/// `--depth=1` pack is such objects, whose delta bases are versions the pack does not send.
/// Anything unexpected (a ref-delta, an entry that does not decode) is left to gix-pack,
/// which reports it.
///
/// An object whose stored delta base the pack does not send may still have a base further
/// down its chain that the pack sends: a clone of a mirror with `refs/pull/*` sends most
/// versions of a file, while git's repack made them deltas against versions only pull
/// requests reach. Such an object becomes a delta against that earlier entry (git's delta
/// search finds it another base too); its data passes by while the chain is resolved. A base
/// further down a chain always comes earlier in the pack, so new deltas point backwards, like
/// every other entry, and never make a cycle. When no version down the chain is sent,
/// another version stored against the same base ("sibling": git's delta search made both
/// deltas against that base because they are alike) that the pack sends earlier is the base
/// instead; its data is the base's, which the chain passes by, patched with its own delta.
struct Decoder {
    index: Arc<bitmap::Index>,
    pack_id: u32,
    inflater: libdeflater::Decompressor,
    /// The chain's entries, the object's first, as read from the pack.
    chain: Vec<gix_pack::find::Entry>,
    base: Vec<u8>,
    delta: Vec<u8>,
    target: Vec<u8>,
    /// The data of the chain's object that the pack sends ([`Decoded::base`]).
    sent: Vec<u8>,
    /// The pack's deltas by base, once a sibling was looked for.
    children: Option<Arc<bitmap::Children>>,
    /// A sibling's delta, inflated.
    sibling_delta: Vec<u8>,
}

impl Decoder {
    fn new(index: Arc<bitmap::Index>, pack_id: u32) -> Decoder {
        Decoder {
            index,
            pack_id,
            inflater: libdeflater::Decompressor::new(),
            chain: Vec::new(),
            base: Vec::new(),
            delta: Vec::new(),
            target: Vec::new(),
            sent: Vec::new(),
            children: None,
            sibling_delta: Vec::new(),
        }
    }

    /// The object at `location`, whose entry is the `this`-th of the pack, when it is in the
    /// bitmapped pack and decodes. `sent` gives the index of the entry the pack writes for the
    /// object at an offset of that pack, if it writes one.
    fn decode(
        &mut self,
        db: &Db,
        location: &gix_pack::data::entry::Location,
        this: usize,
        sent: impl Fn(u64) -> Option<usize>,
    ) -> Option<Decoded<'_>> {
        use gix_pack::data::entry::Header;
        if location.pack_id != self.pack_id {
            return None;
        }
        let objects = self.index.objects();
        self.chain.clear();
        // Where the object's stored base starts.
        let mut stored = None;
        let mut offset = location.pack_offset;
        // The first object down the chain that the pack sends: its place in the chain, and
        // the index of its entry.
        let mut base = None;
        let kind = loop {
            if self.chain.len() > MAX_CHAIN {
                return None;
            }
            if base.is_none() && !self.chain.is_empty() {
                base = sent(offset).map(|index| (self.chain.len(), index));
            }
            let pos = objects.position_at_offset(offset)?;
            let entry = db.entry_by_location(&objects.location(pos, self.pack_id))?;
            let header =
                gix_pack::data::Entry::from_bytes(&entry.data, offset, gix::hash::Kind::Sha1)
                    .ok()?;
            if self.chain.len() == 1 {
                stored = Some(offset);
            }
            self.chain.push(entry);
            match header.header {
                Header::OfsDelta { base_distance } => {
                    offset = header.checked_base_pack_offset(base_distance)?;
                }
                Header::RefDelta { .. } => return None,
                whole => break whole.as_kind()?,
            }
        };
        // Without a sent version down the chain, a sent sibling under the stored base.
        let sibling = match (base, stored) {
            (None, Some(stored)) => self.sibling(db, &sent, this, stored),
            _ => None,
        };
        let (root, deltas) = self.chain.split_last()?;
        inflate(&mut self.inflater, root, &mut self.base)?;
        let keep = base.map(|(at, _)| at).or(sibling.as_ref().map(|_| 1));
        if keep == Some(deltas.len()) {
            self.sent.clone_from(&self.base);
        }
        for (at, entry) in deltas.iter().enumerate().rev() {
            inflate(&mut self.inflater, entry, &mut self.delta)?;
            super::delta::apply(&self.base, &self.delta, &mut self.target)?;
            std::mem::swap(&mut self.base, &mut self.target);
            if at > 0 && keep == Some(at) {
                self.sent.clone_from(&self.base);
            }
        }
        let base = match sibling {
            // The stored base's data is in `sent`: the sibling is that, patched.
            Some((index, sibling)) => {
                inflate(&mut self.inflater, &sibling, &mut self.sibling_delta)?;
                super::delta::apply(&self.sent, &self.sibling_delta, &mut self.target)?;
                std::mem::swap(&mut self.sent, &mut self.target);
                Some(index)
            }
            None => base.map(|(_, index)| index),
        };
        Some(Decoded {
            kind,
            data: &self.base,
            base: base.map(|index| (index, self.sent.as_slice())),
        })
    }

    /// The entry of an object the pack sends before its `this`-th entry (`sent` gives entry
    /// indexes) that is stored as a delta against the same base as that entry's object, at
    /// `stored`: the nearest such before it, and the sibling's entry.
    fn sibling(
        &mut self,
        db: &Db,
        sent: &impl Fn(u64) -> Option<usize>,
        this: usize,
        stored: u64,
    ) -> Option<(usize, gix_pack::find::Entry)> {
        let objects = self.index.objects();
        let children = Arc::clone(self.children.get_or_insert_with(|| self.index.children()));
        let (index, pos) = children
            .of(objects.position_at_offset(stored)?)
            .filter_map(|pos| Some((sent(objects.offset(pos))?, pos)))
            .filter(|(index, _)| *index < this)
            .max()?;
        let entry = db.entry_by_location(&objects.location(pos, self.pack_id))?;
        Some((index, entry))
    }
}

/// The inflated data of the pack `entry` (its header parsed again), into `out`.
fn inflate(
    inflater: &mut libdeflater::Decompressor,
    entry: &gix_pack::find::Entry,
    out: &mut Vec<u8>,
) -> Option<()> {
    let header = gix_pack::data::Entry::from_bytes(&entry.data, 0, gix::hash::Kind::Sha1).ok()?;
    let start = usize::try_from(header.data_offset).ok()?;
    let size = usize::try_from(header.decompressed_size)
        .ok()
        .filter(|size| *size <= MAX_DECODED)?;
    out.clear();
    out.resize(size, 0);
    let n = inflater
        .zlib_decompress(entry.data.get(start..)?, out)
        .ok()?;
    (n == size).then_some(())
}

/// Entries per chunk of [`ThinEntries`]: what the writer holds at a time.
const THIN_CHUNK: usize = 1000;

/// Objects larger than this are never deltified anew: a delta holds both versions and an index
/// of one in memory.
const MAX_DELTA_OBJECT: usize = 16 * 1024 * 1024;

/// The entries of a thin pack, made on the writing thread, in the order gix-pack would make
/// them (by pack, then offset).
///
/// An entry is copied from the mirror's pack when it can be: a whole object, a delta against
/// another object of the pack, or a delta against an object the client has. gix-pack's
/// parallel `iter_from_counts` learns the id of a delta's base outside the pack from a table of
/// the whole source pack (every entry's offset and id, sorted), which it builds anew for every
/// chunk of work that meets such a delta: 57 % of an incremental fetch's server time. Here the
/// bitmapped pack's order, which the snapshot keeps, answers without a table; without a bitmap
/// the only base the client is known to have is the object at the same path in the boundary's
/// trees, whose location is compared with the delta's base.
///
/// Without a bitmap a fetch's new objects are often whole in the mirror (git's repacks make the
/// newest version the base of the older ones) or deltas against a version the client may lack.
/// Those with a version at the same path on the client are deltified against it anew, as git's
/// delta search does ([`super::delta`]); the delta is kept when it is at most half the object,
/// git's rule. Thin packs are fetches, small next to clones, so one thread is enough.
struct ThinEntries {
    sorted: Sorted,
    next: usize,
    bases: BaseIds,
    thin: ThinBases,
    buf: Vec<u8>,
    base_buf: Vec<u8>,
    deflater: super::Deflater,
}

/// Ids of pack entries by offset, for deltas whose base is not in the pack.
struct BaseIds {
    db: Db,
    /// The bitmapped pack's order, and its gix pack id once looked up.
    bitmap: Option<(Arc<bitmap::Index>, Option<Option<u32>>)>,
    /// Offset-sorted tables of other packs, built on first use; `None` when no object outside
    /// the bitmap (or the same path) may be a base.
    tables: Option<HashMap<u32, Vec<(u64, ObjectId)>>>,
    buf: Vec<u8>,
}

impl BaseIds {
    /// The id of the object at `offset` in pack `pack_id`, when it may be a base: `same_path`
    /// (the client's version of the object) is checked first.
    fn id_at(
        &mut self,
        pack_id: u32,
        offset: u64,
        same_path: Option<ObjectId>,
    ) -> gix::Result<Option<ObjectId>> {
        if let Some((index, id)) = &mut self.bitmap {
            let bitmapped = *id.get_or_insert_with(|| index.objects().pack_id(&self.db));
            if bitmapped == Some(pack_id) {
                return Ok(index.objects().id_at_offset(offset));
            }
        }
        if let Some(candidate) = same_path {
            let location = self.db.location_by_oid(&candidate, &mut self.buf)?;
            if location.is_some_and(|l| l.pack_id == pack_id && l.pack_offset == offset) {
                return Ok(Some(candidate));
            }
        }
        let Some(tables) = &mut self.tables else {
            return Ok(None);
        };
        let table = match tables.entry(pack_id) {
            std::collections::hash_map::Entry::Occupied(table) => table.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let mut table = self.db.pack_offsets_and_oid(pack_id)?.ok_or_else(|| {
                    gix::error::message!("pack {pack_id} vanished while writing a pack")
                })?;
                table.sort_unstable_by_key(|e| e.0);
                slot.insert(table)
            }
        };
        Ok(table
            .binary_search_by_key(&offset, |e| e.0)
            .ok()
            .map(|i| table[i].1))
    }
}

impl ThinEntries {
    fn new(
        db: Db,
        counts: Vec<Count>,
        thin: ThinBases,
        compression: gix::zlib::Compression,
    ) -> Self {
        let bitmap = thin.bitmap().cloned();
        ThinEntries {
            sorted: Sorted::new(counts),
            next: 0,
            bases: BaseIds {
                db,
                tables: bitmap.is_some().then(HashMap::new),
                bitmap: bitmap.map(|index| (index, None)),
                buf: Vec::new(),
            },
            thin,
            buf: Vec::new(),
            base_buf: Vec::new(),
            deflater: super::Deflater::new(compression),
        }
    }

    fn entry(&mut self, i: usize) -> gix::Result<output::Entry> {
        let count = &self.sorted.counts[i];
        let same_path = self.thin.same_path(&count.id);
        // The object whole as the pack has it, in case no delta is found.
        let mut copied = None;
        if let Some(location) = count.entry_pack_location.as_ref() {
            if let Some(packed) = self.bases.db.entry_by_location(location) {
                let range = self.sorted.range(location.pack_id, i);
                let bases = &mut self.bases;
                let made = output::Entry::from_pack_entry(
                    packed,
                    count,
                    &self.sorted.counts[range.clone()],
                    range.start,
                    Some(|pack_id, offset| bases.id_at(pack_id, offset, same_path)),
                    gix_pack::data::Version::V2,
                );
                if let Some(entry) = made {
                    let entry = entry?;
                    match entry.kind {
                        EntryKind::DeltaRef { .. } => return Ok(entry),
                        EntryKind::DeltaOid { id }
                            if same_path == Some(id) || self.thin.contains(&id) =>
                        {
                            return Ok(entry)
                        }
                        // Against a base the client may lack: made anew below.
                        EntryKind::DeltaOid { .. } => {}
                        EntryKind::Base(_) if same_path.is_none() => return Ok(entry),
                        EntryKind::Base(_) => copied = Some(entry),
                    }
                }
            }
        }
        // Not packed, packed in a way that cannot be copied (a ref-delta), against a base the
        // client may lack, or whole with a version on the client: the object is needed.
        let id = count.id;
        let db = &self.bases.db;
        let (data, _) = db
            .try_find(&id, &mut self.buf)?
            .ok_or_else(|| gix::error::message!("object {id} vanished while writing a pack"))?;
        if let Some(base) = same_path {
            if let Some(entry) =
                delta_entry(db, id, &data, base, &mut self.base_buf, &mut self.deflater)?
            {
                return Ok(entry);
            }
        }
        match copied {
            Some(entry) => Ok(entry),
            None => Ok(output::Entry {
                id,
                kind: EntryKind::Base(data.kind),
                decompressed_size: data.data.len(),
                compressed_data: self.deflater.deflate(data.data)?,
            }),
        }
    }
}

/// Object `id` (`target`) as a delta against `base_id`, when that is at most half its size
/// (less the base's id), as git requires of a new delta; `None` otherwise.
fn delta_entry(
    db: &Db,
    id: ObjectId,
    target: &gix::objs::Data<'_>,
    base_id: ObjectId,
    buf: &mut Vec<u8>,
    deflater: &mut super::Deflater,
) -> gix::Result<Option<output::Entry>> {
    let max = (target.data.len() / 2).saturating_sub(id.as_bytes().len());
    if max == 0 || target.data.len() > MAX_DELTA_OBJECT {
        return Ok(None);
    }
    let Some((base, _)) = db.try_find(&base_id, buf)? else {
        return Ok(None);
    };
    if base.kind != target.kind {
        return Ok(None);
    }
    let Some(delta) = new_delta(base.data, target.data, max) else {
        return Ok(None);
    };
    Ok(Some(output::Entry {
        id,
        kind: EntryKind::DeltaOid { id: base_id },
        decompressed_size: delta.len(),
        compressed_data: deflater.deflate(&delta)?,
    }))
}

impl Iterator for ThinEntries {
    type Item = gix::Result<Vec<output::Entry>>;

    fn next(&mut self) -> Option<Self::Item> {
        let len = self.sorted.counts.len();
        if self.next >= len {
            return None;
        }
        let end = (self.next + THIN_CHUNK).min(len);
        let mut chunk = Vec::with_capacity(end - self.next);
        for i in self.next..end {
            match self.entry(i) {
                Ok(entry) => chunk.push(entry),
                Err(e) => {
                    self.next = len;
                    return Some(Err(e));
                }
            }
        }
        self.next = end;
        Some(Ok(chunk))
    }
}
