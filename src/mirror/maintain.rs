//! Maintenance: a mirror's packs consolidated into one, in-process, with gix-pack.
//!
//! Every sync that fetches adds a pack, and object lookups, walks and delta-base reuse get
//! slower with each. Consolidation writes one pack holding every object of the old ones and
//! then deletes them:
//!
//! - **Layout.** Three regions, in this order: the objects reachable from `HEAD`,
//!   `refs/heads/*` and `refs/tags/*` (what a clone needs); those reachable only from other refs
//!   (`refs/pull/*` and the like); and unreachable objects still within the grace period. Within
//!   a region, entries keep the order of the packs they come from (gix-pack copies in pack
//!   order, which is what makes copying cheap).
//! - **Deltas are copied, never computed.** A delta whose base is in the same source pack stays
//!   an offset delta; one whose base came from another pack becomes a delta against the base's
//!   new position (an offset delta when the base is already written, else a ref-delta by id).
//!   A delta's base always lies in the same region or an earlier one, so that the first region
//!   is a complete pack by itself: when a base lies in a later region, the object is written
//!   whole instead.
//! - **Unreachable objects** (refs deleted or force-pushed upstream) are kept while the pack or
//!   loose file that holds them is younger than the grace period, so that a client in the middle
//!   of a negotiation still finds what it was shown; older ones are dropped.
//! - **Swap.** The new pack is written to a temporary file (which the next maintenance or sync
//!   of the mirror, or a server's start while neither runs, removes after a crash), indexed by gix-pack into `pack-<hash>.pack`/`.idx`, and only then are the old
//!   packs (those present when maintenance started) and the loose objects deleted. Before the
//!   swap, the new pack gets its reachability bitmap (`pack-<hash>.bitmap`, written to a
//!   temporary name and renamed, see [`crate::pack::bitmap`]): ref tips first (heads and
//!   tags, then other refs), and a spread along their history. Readers that
//!   hold an old pack keep it mapped until they finish; new readers find everything in the new
//!   pack. Packs with a `.keep` file are left alone.
//! - **Commit-graph.** Last, the commit-graph of everything the refs reach is rewritten
//!   ([`crate::pack::graph`]), so that walks read parents and times from a table.

use std::collections::HashMap as StdHashMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use gix::hashtable::HashSet;
use gix::ObjectId;
use gix_pack::data::output::{self, bytes::FromEntriesIter, entry::Kind as EntryKind};
use gix_pack::Find;

use crate::pack::{self, reuse, Db};

/// What a consolidation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Packs before.
    pub packs_before: usize,
    /// Objects in the new pack, by region: ref-reachable from heads and tags, from other refs
    /// only, unreachable within the grace period.
    pub regions: [usize; 3],
    /// Unreachable objects dropped (older than the grace period).
    pub dropped: usize,
    /// Bytes of the new pack.
    pub bytes: u64,
    /// Commits in the commit-graph written afterwards (`None`: none was written).
    pub commit_graph: Option<usize>,
    /// Commits with a reachability bitmap in the new pack's `.bitmap` (0 when writing it
    /// failed: the mirror is served by walking then).
    pub bitmap_commits: usize,
}

/// Why maintenance failed; the mirror is then left as it was.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] crate::repo::Error),
    /// Selecting or writing objects failed.
    #[error(transparent)]
    Pack(#[from] pack::Error),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// gix-pack failed writing or indexing the pack.
    #[error("{0}")]
    Write(String),
}

/// The lock file of maintenance, in the mirror.
const LOCK_FILE: &str = "smart-git-proxy-maintenance.lock";

/// The mirror's maintenance lock, held until the file is dropped: maintenance and syncs take
/// it, so that `smart-git-proxy maintain` and a server's sync of the same mirror never overlap
/// (a sync could otherwise fetch against objects maintenance is about to drop). Within one
/// process both also run under the mirror's mutex, so it never blocks there.
pub fn lock(dir: &Path) -> std::io::Result<std::fs::File> {
    loop {
        let file = open_lock_file(dir)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        if still_at(&file, dir)? {
            return Ok(file);
        }
    }
}

fn open_lock_file(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
}

/// Whether the locked `file` is still the one `dir` names: eviction holds the lock while it
/// moves the mirror away, and a waiter that then gets it holds the removed mirror's file,
/// which excludes nobody from a mirror created anew at the same path.
fn still_at(file: &std::fs::File, dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let locked = file.metadata()?;
    Ok(match std::fs::metadata(dir.join(LOCK_FILE)) {
        Ok(now) => (now.dev(), now.ino()) == (locked.dev(), locked.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

/// The mirror's maintenance lock if nobody holds it (see [`lock`]); `None` if someone does.
pub fn try_lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    loop {
        let file = open_lock_file(dir)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) if still_at(&file, dir)? => return Ok(Some(file)),
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// The `.pack` files of the mirror at `dir` that have an index, without those protected by a
/// `.keep` file.
pub fn packs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    // By index, as git lists packs: a `.pack` whose `.idx` is gone (a crash between the two
    // deletions) or not written yet (a fetch in progress) is not a pack to read.
    for entry in std::fs::read_dir(dir.join("objects/pack"))? {
        let idx = entry?.path();
        let name = idx.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let pack = idx.with_extension("pack");
        if name.starts_with("pack-")
            && name.ends_with(".idx")
            && pack.is_file()
            && !idx.with_extension("keep").exists()
        {
            out.push(pack);
        }
    }
    out.sort();
    Ok(out)
}

/// Consolidate the packs and loose objects of the mirror at `dir` into one pack (see the
/// module documentation). The caller keeps syncs of this mirror out meanwhile.
pub fn consolidate(
    dir: &Path,
    grace: Duration,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let _lock = lock(dir).map_err(io("taking the mirror's maintenance lock"))?;
    // A maintenance or sync killed midway left its temporaries (as large as the new pack).
    super::sync::remove_leftovers(dir);
    let old_packs = packs(dir).map_err(io("listing packs"))?;
    // Only these are deleted at the end: a loose object written meanwhile (an operator's git)
    // stays.
    let old_loose = loose_objects(dir).map_err(io("listing loose objects"))?;
    // The layout describes packs that are about to go.
    reuse::remove_layout(dir).map_err(io("removing the pack layout"))?;
    let repo = crate::repo::open(dir)?;
    let db = pack::db(&repo);
    let refs = crate::repo::list_refs(&repo)?;
    let clone_tips = reuse::clone_tips(&refs);
    let other_tips: Vec<ObjectId> = refs
        .refs
        .iter()
        .filter(|r| !reuse::is_clone_ref(&r.name))
        .map(|r| r.target)
        .collect();
    // The bitmap of the last maintenance (or git's) answers most of the regions' planning.
    let bitmap = crate::repo::bitmap_file(dir).and_then(|path| crate::repo::load_bitmap(&path));
    let first = pack::plan(
        &db,
        &pack::Selection {
            wants: &clone_tips,
            bitmap: bitmap.as_ref(),
            ..Default::default()
        },
        interrupt,
    )?
    .counts;
    let mut seen: HashSet<ObjectId> = first.iter().map(|c| c.id).collect();
    let mut second = pack::plan(
        &db,
        &pack::Selection {
            wants: &other_tips,
            common: &clone_tips,
            bitmap: bitmap.as_ref(),
            ..Default::default()
        },
        interrupt,
    )?
    .counts;
    // The walking planner leaves out what the clone tips' boundary reaches, not all they reach.
    second.retain(|c| seen.insert(c.id));
    let (third, dropped) = unreachable(dir, &old_loose, &db, &mut seen, grace)?;
    let regions = [first.len(), second.len(), third.len()];

    let pack_dir = dir.join("objects/pack");
    let tmp = pack_dir.join(format!(".tmp-maintenance-{}.pack", std::process::id()));
    let written = write_regions(&db, [first, second, third], &tmp, thread_limit, interrupt);
    let indexed = written.and_then(|()| index(&tmp, &pack_dir, interrupt));
    let _ = std::fs::remove_file(&tmp);
    let (new_pack, bytes) = indexed?;
    let region = reuse::Region {
        pack: new_pack
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        objects: u32::try_from(regions[0]).unwrap_or(u32::MAX),
        end: region_end(&new_pack, regions[0], bytes)?,
        tips: reuse::tips_digest(&clone_tips),
    };
    let bitmap_tips: Vec<ObjectId> = clone_tips.iter().chain(&other_tips).copied().collect();
    let bitmap_commits = match pack::bitmap::write(&db, &new_pack, &bitmap_tips, interrupt) {
        Ok(written) => {
            tracing::debug!(?written, "bitmap written");
            written.commits
        }
        // The pack is complete without it; requests walk instead.
        Err(e) => {
            tracing::warn!(pack = %new_pack.display(), error = %e, "no reachability bitmap written");
            0
        }
    };

    for old in old_packs.iter().filter(|p| **p != new_pack) {
        for ext in ["idx", "rev", "bitmap", "mtimes", "pack"] {
            match std::fs::remove_file(old.with_extension(ext)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("removing an old pack")(e))
                }
                _ => {}
            }
        }
    }
    for (loose, _) in &old_loose {
        let _ = std::fs::remove_file(loose);
    }
    reuse::write_layout(dir, &region).map_err(io("writing the pack layout"))?;
    // The packs are in place; a graph that cannot be written leaves walks on the objects.
    let tips: Vec<ObjectId> = refs.refs.iter().map(|r| r.target).collect();
    let commit_graph = pack::graph::write(&dir.join("objects"), &db, &tips, interrupt)
        .unwrap_or_else(|e| {
            tracing::warn!(mirror = %dir.display(), "no commit-graph: {e}");
            None
        });
    Ok(Outcome {
        packs_before: old_packs.len(),
        regions,
        dropped,
        bytes,
        commit_graph,
        bitmap_commits,
    })
}

/// The objects not in `seen` (of every pack and of `loose`), as counts for the third region,
/// and how many were too old to keep; adds the kept ones to `seen`.
fn unreachable(
    dir: &Path,
    loose: &[(PathBuf, ObjectId)],
    db: &Db,
    seen: &mut HashSet<ObjectId>,
    grace: Duration,
) -> Result<(Vec<output::Count>, usize), Error> {
    let now = SystemTime::now();
    let young = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_or(true, |t| now.duration_since(t).unwrap_or_default() < grace)
    };
    let mut candidates: Vec<(ObjectId, bool)> = Vec::new();
    for pack in packs(dir).map_err(io("listing packs"))? {
        let idx = pack.with_extension("idx");
        let keep = young(&pack);
        let index = gix_pack::index::File::at(&idx, gix::hash::Kind::Sha1)
            .map_err(|e| Error::Write(format!("reading {}: {e}", idx.display())))?;
        candidates.extend(index.iter().map(|e| (e.oid, keep)));
    }
    for (path, id) in loose {
        candidates.push((*id, young(path)));
    }
    let mut kept = Vec::new();
    let mut dropped = 0;
    let mut buf = Vec::new();
    for (id, keep) in candidates {
        if seen.contains(&id) {
            continue;
        }
        if !keep {
            dropped += 1;
            continue;
        }
        seen.insert(id);
        let location = db
            .location_by_oid(&id, &mut buf)
            .map_err(|e| Error::Write(format!("locating {id}: {e}")))?;
        kept.push(output::Count::from_data(id, location));
    }
    Ok((kept, dropped))
}

/// Loose object files with their ids.
fn loose_objects(dir: &Path) -> std::io::Result<Vec<(PathBuf, ObjectId)>> {
    let mut out = Vec::new();
    for fanout in std::fs::read_dir(dir.join("objects"))? {
        let fanout = fanout?;
        let prefix = fanout.file_name().to_string_lossy().into_owned();
        if prefix.len() != 2 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        for entry in std::fs::read_dir(fanout.path())? {
            let entry = entry?;
            let hex = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if let Ok(id) = ObjectId::from_hex(hex.as_bytes()) {
                out.push((entry.path(), id));
            }
        }
    }
    Ok(out)
}

/// Write the regions, in order, as one pack at `path`.
fn write_regions(
    db: &Db,
    regions: [Vec<output::Count>; 3],
    path: &Path,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<(), Error> {
    let total: usize = regions.iter().map(Vec::len).sum();
    let num_objects =
        u32::try_from(total).map_err(|_| Error::Write("too many objects for one pack".into()))?;
    let region_of: StdHashMap<ObjectId, usize> = regions
        .iter()
        .enumerate()
        .flat_map(|(r, counts)| counts.iter().map(move |c| (c.id, r)))
        .collect();
    let mut chunks: Vec<Box<dyn Iterator<Item = gix::Result<Vec<output::Entry>>>>> = Vec::new();
    for counts in regions {
        let entries = output::entry::iter_from_counts(
            counts,
            db.clone(),
            Box::new(gix::progress::Discard),
            output::entry::iter_from_counts::Options {
                thread_limit,
                // Deltas against bases in other packs come out as ref-deltas, fixed up below.
                allow_thin_pack: true,
                ..Default::default()
            },
        )
        .map_err(|e| Error::Write(e.to_string()))?;
        chunks.push(Box::new(gix::parallel::InOrderIter::from(entries)));
    }
    // Entries of each region come with indices local to it; `written` maps ids to their index
    // in the whole pack, `starts` where each region began.
    let mut written: StdHashMap<ObjectId, usize> = StdHashMap::with_capacity(total);
    let mut starts: [Option<usize>; 3] = [None; 3];
    let mut buf = Vec::new();
    let db = db.clone();
    let entries = chunks
        .into_iter()
        .enumerate()
        .flat_map(|(region, iter)| iter.map(move |chunk| (region, chunk)))
        .map(move |(region, chunk)| {
            if interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(gix::error::message("interrupted").into());
            }
            let mut chunk = chunk?;
            let start = *starts[region].get_or_insert(written.len());
            for entry in &mut chunk {
                let index = written.len();
                match entry.kind {
                    EntryKind::DeltaRef { object_index } => {
                        entry.kind = EntryKind::DeltaRef {
                            object_index: start + object_index,
                        };
                    }
                    EntryKind::DeltaOid { id } => match region_of.get(&id) {
                        Some(r) if *r <= region => {
                            if let Some(at) = written.get(&id) {
                                entry.kind = EntryKind::DeltaRef { object_index: *at };
                            }
                        }
                        _ => {
                            *entry = pack::whole_entry(
                                &db,
                                entry.id,
                                &mut buf,
                                gix::zlib::Compression::default(),
                            )?
                        }
                    },
                    EntryKind::Base(_) => {}
                }
                written.insert(entry.id, index);
            }
            Ok(chunk)
        });
    let file = std::fs::File::create(path).map_err(io("creating the new pack"))?;
    let mut out = BufWriter::new(file);
    let mut writer = FromEntriesIter::new(
        entries,
        &mut out,
        num_objects,
        gix_pack::data::Version::V2,
        gix::hash::Kind::Sha1,
    );
    for step in writer.by_ref() {
        step.map_err(|e| Error::Write(e.to_string()))?;
    }
    drop(writer);
    out.flush().map_err(io("writing the new pack"))?;
    out.get_ref()
        .sync_all()
        .map_err(io("writing the new pack"))?;
    Ok(())
}

/// Index the pack at `tmp` into `pack_dir` (as `pack-<hash>.pack` and `.idx`): its path and
/// size.
fn index(tmp: &Path, pack_dir: &Path, interrupt: &AtomicBool) -> Result<(PathBuf, u64), Error> {
    let file = std::fs::File::open(tmp).map_err(io("reading the new pack"))?;
    let outcome = gix_pack::Bundle::write_to_directory(
        &mut BufReader::new(file),
        Some(pack_dir),
        &mut gix::progress::Discard,
        interrupt,
        None::<Db>,
        gix::hash::Kind::Sha1,
        gix_pack::bundle::write::Options::default(),
    )
    .map_err(|e| Error::Write(format!("indexing the new pack: {e}")))?;
    // Protection against a concurrent gc, which nothing here runs.
    if let Some(keep) = outcome.keep_path {
        std::fs::remove_file(keep).map_err(io("removing the new pack's .keep"))?;
    }
    let data = outcome
        .data_path
        .ok_or_else(|| Error::Write("indexing gave no pack path".into()))?;
    let bytes = std::fs::metadata(&data)
        .map_err(io("reading the new pack"))?
        .len();
    Ok((data, bytes))
}

/// Where the first `objects` entries (in pack order) of the pack at `path` end.
fn region_end(path: &Path, objects: usize, pack_bytes: u64) -> Result<u64, Error> {
    let idx = path.with_extension("idx");
    let index = gix_pack::index::File::at(&idx, gix::hash::Kind::Sha1)
        .map_err(|e| Error::Write(format!("reading {}: {e}", idx.display())))?;
    let mut offsets: Vec<u64> = index.iter().map(|e| e.pack_offset).collect();
    offsets.sort_unstable();
    Ok(offsets
        .get(objects)
        .copied()
        .unwrap_or(pack_bytes.saturating_sub(20)))
}
