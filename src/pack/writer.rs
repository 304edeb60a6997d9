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

use super::{bitmap, Db, Error, Plan};

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
    let num_objects = u32::try_from(plan.counts.len())
        .map_err(|_| Error::Write("too many objects for one pack".into()))?;
    let thin_bases = plan.thin_bases;
    let entries: Box<dyn Iterator<Item = gix::Result<Vec<output::Entry>>>> = match &thin_bases {
        // Every delta whose base is outside the pack is kept as a ref-delta, without knowing
        // whether the client has that base: those are checked below.
        Some(bases) => Box::new(ThinEntries::new(
            db.clone(),
            plan.counts,
            bases.bitmap().cloned(),
            opts.compression,
        )),
        None => Box::new(gix::parallel::InOrderIter::from(
            output::entry::iter_from_counts(
                plan.counts,
                db.clone(),
                Box::new(gix::progress::Discard),
                output::entry::iter_from_counts::Options {
                    thread_limit: opts.thread_limit,
                    compression: opts.compression,
                    ..Default::default()
                },
            )
            .map_err(|e| Error::Write(e.to_string()))?,
        )),
    };

    let mut stats = WriteStats::default();
    let mut ids: Vec<ObjectId> = Vec::new();
    let ofs_delta = opts.ofs_delta;
    let stats_ref = &mut stats;
    let mut buf = Vec::new();
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
                EntryKind::DeltaOid { id } => {
                    if thin_bases.as_ref().is_some_and(|b| b.contains(&id)) {
                        stats_ref.deltas += 1;
                        stats_ref.thin_deltas += 1;
                    } else {
                        // A base the client may lack: the object goes whole.
                        *entry = super::whole_entry(&db, entry.id, &mut buf, opts.compression)?;
                    }
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
            Err(e) => return Err(Error::Write(e.to_string())),
        }
    }
    drop(writer);
    stats.bytes = bytes;
    Ok(stats)
}

/// Entries per chunk of [`ThinEntries`]: what the writer holds at a time.
const THIN_CHUNK: usize = 1000;

/// The entries of a thin pack, made on the writing thread, in the order gix-pack would make
/// them (by pack, then offset).
///
/// gix-pack's parallel `iter_from_counts` learns the id of a delta's base outside the pack
/// from a table of the whole source pack (every entry's offset and id, sorted), which it builds
/// anew for every chunk of work that meets such a delta: four times for a fetch of 1,500
/// objects from a 415k-object pack, and once per 1,000 objects beyond that. Profiled, that was
/// 57 % of an incremental fetch's server time. Here the bitmapped pack's order, which the
/// snapshot keeps, answers without a table, and another pack's table is built at most once.
/// Thin packs are fetches, small next to clones, so one thread copying entries is enough.
struct ThinEntries {
    counts: Vec<Count>,
    /// The range of `counts` in each pack, by gix pack id, in `counts` order.
    ranges: Vec<(u32, Range<usize>)>,
    next: usize,
    bases: BaseIds,
    buf: Vec<u8>,
    compression: gix::zlib::Compression,
}

/// Ids of pack entries by offset, for deltas whose base is not in the pack.
struct BaseIds {
    db: Db,
    /// The bitmapped pack's order, and its gix pack id once looked up.
    bitmap: Option<(Arc<bitmap::Index>, Option<Option<u32>>)>,
    /// Offset-sorted tables of other packs, built on first use.
    tables: HashMap<u32, Vec<(u64, ObjectId)>>,
}

impl BaseIds {
    fn id_at(&mut self, pack_id: u32, offset: u64) -> gix::Result<Option<ObjectId>> {
        if let Some((index, id)) = &mut self.bitmap {
            let bitmapped = *id.get_or_insert_with(|| index.objects().pack_id(&self.db));
            if bitmapped == Some(pack_id) {
                return Ok(index.objects().id_at_offset(offset));
            }
        }
        if !self.tables.contains_key(&pack_id) {
            let mut table = self.db.pack_offsets_and_oid(pack_id)?.ok_or_else(|| {
                gix::error::message!("pack {pack_id} vanished while writing a pack")
            })?;
            table.sort_unstable_by_key(|e| e.0);
            self.tables.insert(pack_id, table);
        }
        let table = &self.tables[&pack_id];
        Ok(table
            .binary_search_by_key(&offset, |e| e.0)
            .ok()
            .map(|i| table[i].1))
    }
}

impl ThinEntries {
    fn new(
        db: Db,
        mut counts: Vec<Count>,
        bitmap: Option<Arc<bitmap::Index>>,
        compression: gix::zlib::Compression,
    ) -> Self {
        let key = |c: &Count| {
            c.entry_pack_location
                .as_ref()
                .map(|l| (l.pack_id, l.pack_offset))
        };
        // Unpacked objects first, then by pack and offset, as gix-pack orders them.
        counts.sort_by_key(key);
        let mut ranges: Vec<(u32, Range<usize>)> = Vec::new();
        for (i, count) in counts.iter().enumerate() {
            if let Some(location) = count.entry_pack_location.as_ref() {
                match ranges.last_mut() {
                    Some((pack, range)) if *pack == location.pack_id => range.end = i + 1,
                    _ => ranges.push((location.pack_id, i..i + 1)),
                }
            }
        }
        ThinEntries {
            counts,
            ranges,
            next: 0,
            bases: BaseIds {
                db,
                bitmap: bitmap.map(|index| (index, None)),
                tables: HashMap::new(),
            },
            buf: Vec::new(),
            compression,
        }
    }

    fn entry(&mut self, i: usize) -> gix::Result<output::Entry> {
        let count = &self.counts[i];
        if let Some(location) = count.entry_pack_location.as_ref() {
            if let Some(packed) = self.bases.db.entry_by_location(location) {
                let range = self
                    .ranges
                    .binary_search_by_key(&location.pack_id, |r| r.0)
                    .map(|r| self.ranges[r].1.clone())
                    .unwrap_or(i..i + 1);
                let bases = &mut self.bases;
                if let Some(entry) = output::Entry::from_pack_entry(
                    packed,
                    count,
                    &self.counts[range.clone()],
                    range.start,
                    Some(|pack_id, offset| bases.id_at(pack_id, offset)),
                    gix_pack::data::Version::V2,
                ) {
                    return entry;
                }
            }
        }
        // Not packed, or packed in a way that cannot be copied (a ref-delta): compressed anew.
        let id = count.id;
        super::whole_entry(&self.bases.db, id, &mut self.buf, self.compression)
    }
}

impl Iterator for ThinEntries {
    type Item = gix::Result<Vec<output::Entry>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.counts.len() {
            return None;
        }
        let end = (self.next + THIN_CHUNK).min(self.counts.len());
        let mut chunk = Vec::with_capacity(end - self.next);
        for i in self.next..end {
            match self.entry(i) {
                Ok(entry) => chunk.push(entry),
                Err(e) => {
                    self.next = self.counts.len();
                    return Some(Err(e));
                }
            }
        }
        self.next = end;
        Some(Ok(chunk))
    }
}
