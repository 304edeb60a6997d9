//! Pack writing on gix-pack: entries are produced on worker threads in chunks and written in
//! order, so memory holds a few chunks of compressed entries, never the whole pack.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;
use gix_pack::data::output::{self, bytes::FromEntriesIter, entry::Kind as EntryKind};

use super::{Db, Error, Plan};

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
    let entries = output::entry::iter_from_counts(
        plan.counts,
        db.clone(),
        Box::new(gix::progress::Discard),
        output::entry::iter_from_counts::Options {
            thread_limit: opts.thread_limit,
            // gix then keeps every delta whose base is outside the pack as a ref-delta, without
            // knowing whether the client has that base: those are checked below.
            allow_thin_pack: thin_bases.is_some(),
            compression: opts.compression,
            ..Default::default()
        },
    )
    .map_err(|e| Error::Write(e.to_string()))?;

    let mut stats = WriteStats::default();
    let mut ids: Vec<ObjectId> = Vec::new();
    let ofs_delta = opts.ofs_delta;
    let stats_ref = &mut stats;
    let mut buf = Vec::new();
    let entries = gix::parallel::InOrderIter::from(entries).map(move |chunk| {
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
