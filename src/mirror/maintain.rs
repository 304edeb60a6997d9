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
//!   of the mirror, or a server's start while neither runs, removes after a crash), installed
//!   as `pack-<hash>.pack` with an index written from what the writer recorded (ids, offsets,
//!   CRCs: nothing is read back or hashed again), and only then are the old
//!   packs (those present when maintenance started) and the loose objects deleted. Before the
//!   swap, the new pack gets its reachability bitmap (`pack-<hash>.bitmap`, written to a
//!   temporary name and renamed, see [`crate::pack::bitmap`]): the newest tips of heads and
//!   tags, and a spread along the history of every ref; what the old pack's bitmap already
//!   covers is taken from it, the rest walked. The bitmap's walk reads the trees of the new
//!   pack straight from the pack by position (a hash map of positions, built once, rather
//!   than an index search per tree entry), with the old packs unmapped first. Readers that
//!   hold an old pack keep it mapped until they finish; new readers find everything in the
//!   new pack. Packs with a `.keep` file are left alone.
//! - **Commit-graph.** Last, the commit-graph of everything the refs reach is rewritten
//!   ([`crate::pack::graph`]), so that walks that decide reachability only (negotiating haves,
//!   `deepen`, checking wants) read parents and times from a table instead of inflating
//!   commits. A plan that walks (shallow requests, no bitmap) gains nothing from it: it needs
//!   each commit's packed size, which gix learns by inflating the entry.
//!
//! [`run`] does only what a mirror needs ([`due`]): a mirror with one pack whose bitmap is
//! missing or stale (a mirror just created, whose pack is the one its first fetch wrote) gets a
//! new bitmap and commit-graph for that pack, which stays as it is; consolidation comes when
//! there are more packs than the policy allows, or when a stale bitmap spans several packs.
//! When that is, the settings that steer it and `smart-git-proxy maintain` are described for
//! operators in `docs/operations.md` (Maintenance); its cost against git's in
//! `docs/performance.md`.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use gix::hashtable::HashSet;
use gix::ObjectId;
use gix_pack::data::output::{self, entry::Kind as EntryKind};
use gix_pack::Find;

use crate::pack::{self, reuse, Db};
use crate::protocol::advert::Refs;

/// What a maintenance did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// What it found to do.
    pub work: Work,
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
    /// Of those, the ones whose bitmap came from the replaced pack's rather than a walk.
    pub bitmap_reused: usize,
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
    /// A pack's index cannot be read.
    #[error("reading {}: {source}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// gix-pack failed while the new pack was planned or written.
    #[error("{context}: {source}")]
    Write {
        /// What was being done.
        context: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The objects chosen cannot make a valid pack.
    #[error("{0}")]
    Invalid(String),
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

/// When background maintenance works on a mirror, and what it does then (see [`due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Consolidate once the mirror has more packs than this (`MAINTENANCE_PACK_THRESHOLD`).
    pub packs: usize,
    /// Refresh the bitmap and the commit-graph once the refs reach more than this many
    /// commits outside the bitmap's pack (`MAINTENANCE_BITMAP_LAG`): requests walk those on
    /// top of the bitmap, a cost that grows with every sync.
    pub bitmap_lag: usize,
}

impl Policy {
    /// What `smart-git-proxy maintain` asks for: one pack, and a bitmap and commit-graph that
    /// cover every commit the refs reach.
    pub const COMPLETE: Policy = Policy {
        packs: 1,
        bitmap_lag: 0,
    };
}

/// What a mirror needs of maintenance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Work {
    /// Nothing: few packs, a bitmap that covers the refs and a commit-graph.
    #[default]
    Nothing,
    /// A commit-graph only (there is none; the bitmap is fresh).
    Graph,
    /// A new bitmap and commit-graph for the mirror's only pack, which stays as it is.
    Bitmap,
    /// All packs and loose objects into one, with its bitmap and commit-graph.
    Consolidate,
}

/// What the mirror at `dir` with `refs` needs under `policy`: consolidation when it has more
/// packs than [`Policy::packs`], or when its bitmap is missing or stale (see
/// [`uncovered_commits`]) and it has several packs or loose objects; else a new bitmap (and
/// commit-graph) for its one pack when that is stale, or a commit-graph when it has none.
pub fn due(dir: &Path, refs: &Refs, policy: Policy, interrupt: &AtomicBool) -> Result<Work, Error> {
    let packs = packs(dir).map_err(io("listing packs"))?;
    let loose = has_loose_objects(dir).map_err(io("listing loose objects"))?;
    if packs.len() > policy.packs.max(1) {
        return Ok(Work::Consolidate);
    }
    if packs.is_empty() && !loose {
        return Ok(Work::Nothing);
    }
    let stale = match crate::repo::bitmap_file(dir) {
        None => true,
        Some(bitmap) => {
            let repo = crate::repo::open(dir)?;
            let db = pack::db(&repo);
            let idx = bitmap.with_extension("idx");
            let idx = gix_pack::index::File::at(&idx, gix::hash::Kind::Sha1).map_err(|source| {
                Error::Index {
                    path: idx.clone(),
                    source: source.into(),
                }
            })?;
            uncovered_commits(&db, &idx, refs, policy.bitmap_lag, interrupt)? > policy.bitmap_lag
        }
    };
    Ok(match (stale, packs.len() == 1 && !loose) {
        (true, true) => Work::Bitmap,
        (true, false) => Work::Consolidate,
        (false, _) if !has_commit_graph(dir) => Work::Graph,
        (false, _) => Work::Nothing,
    })
}

/// The commits that `refs` reach outside the pack whose index is `idx` (the bitmapped pack,
/// closed under reachability), counted up to `limit + 1`. Requests walk these on top of the
/// bitmap; the walk here visits only them.
pub fn uncovered_commits(
    db: &Db,
    idx: &gix_pack::index::File,
    refs: &Refs,
    limit: usize,
    interrupt: &AtomicBool,
) -> Result<usize, Error> {
    let mut commits = pack::walk::Commits::new(db, HashSet::default());
    let mut stack = Vec::new();
    for r in &refs.refs {
        let tip = r.peeled.unwrap_or(r.target);
        if idx.lookup(tip).is_none() {
            // A tree or blob (no history), else a commit to walk.
            if let Some(commit) = commits.peel_to_commit(tip)? {
                stack.push(commit);
            }
        }
    }
    let mut seen: HashSet<ObjectId> = HashSet::default();
    while let Some(id) = stack.pop() {
        if seen.len() > limit {
            break;
        }
        if idx.lookup(id).is_some() || !seen.insert(id) {
            continue;
        }
        pack::check_interrupt(interrupt, seen.len())?;
        stack.extend(commits.get(id)?.parents.iter().copied());
    }
    Ok(seen.len())
}

/// Whether the objects directory of the mirror at `dir` has a commit-graph (ours, or git's
/// single file or split chain).
fn has_commit_graph(dir: &Path) -> bool {
    let info = dir.join("objects/info");
    pack::graph::path(&dir.join("objects")).is_file()
        || info.join("commit-graphs/commit-graph-chain").is_file()
}

/// Bring the mirror at `dir` up to `policy` ([`due`] decides, under the mirror's maintenance
/// lock): consolidate it, or refresh its bitmap and commit-graph without touching its pack,
/// or nothing. The caller keeps syncs of this mirror out meanwhile.
pub fn run(
    dir: &Path,
    grace: Duration,
    policy: Policy,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let _lock = lock(dir).map_err(io("taking the mirror's maintenance lock"))?;
    super::sync::remove_leftovers(dir);
    let repo = crate::repo::open(dir)?;
    let refs = crate::repo::list_refs(&repo)?;
    match due(dir, &refs, policy, interrupt)? {
        Work::Consolidate => consolidate_locked(dir, grace, thread_limit, interrupt),
        work @ (Work::Bitmap | Work::Graph) => refresh(dir, &repo, &refs, work, interrupt),
        Work::Nothing => Ok(Outcome {
            packs_before: packs(dir).map_err(io("listing packs"))?.len(),
            ..Outcome::default()
        }),
    }
}

/// Write the bitmap of the mirror's only pack (for [`Work::Bitmap`]) and the commit-graph,
/// leaving the pack as it is.
fn refresh(
    dir: &Path,
    repo: &gix::Repository,
    refs: &Refs,
    work: Work,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let db = pack::db(repo);
    let packs = packs(dir).map_err(io("listing packs"))?;
    let mut outcome = Outcome {
        work,
        packs_before: packs.len(),
        ..Outcome::default()
    };
    // The graph first: the bitmap's walk then reads commits from it.
    outcome.commit_graph = write_graph(dir, &db, refs, interrupt);
    if let (Work::Bitmap, [pack]) = (work, packs.as_slice()) {
        let written = write_bitmap(&db, pack, refs, None, interrupt);
        outcome.bitmap_commits = written.as_ref().map_or(0, |w| w.commits);
        outcome.bytes = std::fs::metadata(pack)
            .map_err(io("reading the pack"))?
            .len();
        let whole = written
            .and_then(|written| whole_pack_region(&db, pack, &written.path, refs, interrupt));
        match whole {
            Some(region) => {
                outcome.regions[0] = region.objects as usize;
                reuse::write_layout(dir, &region).map_err(io("writing the pack layout"))?;
            }
            // A consolidation's layout for these refs still holds; any other is stale.
            None if reuse::read_layout(dir, refs).is_some() => {}
            None => reuse::remove_layout(dir).map_err(io("removing the pack layout"))?,
        }
    }
    Ok(outcome)
}

/// The whole of `pack` as the region a clone reuses (see [`reuse`]), when what a clone wants
/// (`HEAD`, heads and tags) reaches every object in it and nothing else: a mirror created from a
/// repository without other refs. `bitmap` is the pack's new bitmap, which answers that. `None`
/// too when it cannot be told: clones are then planned, as without the region.
fn whole_pack_region(
    db: &Db,
    pack: &Path,
    bitmap: &Path,
    refs: &Refs,
    interrupt: &AtomicBool,
) -> Option<reuse::Region> {
    let index = pack::bitmap::Index::open(bitmap).ok()?;
    let objects = u32::try_from(index.objects().len()).ok()?;
    let tips = reuse::clone_tips(refs);
    match pack::bitmap::Reachable::compute(db, std::sync::Arc::new(index), &tips, interrupt) {
        Ok(Some(reached)) if reached.is_whole_pack() => {}
        Ok(_) => return None,
        Err(e) => {
            tracing::debug!(pack = %pack.display(), error = %e, "no clone region");
            return None;
        }
    }
    Some(reuse::Region {
        pack: pack.file_name()?.to_string_lossy().into_owned(),
        objects,
        end: std::fs::metadata(pack)
            .ok()?
            .len()
            .checked_sub(reuse::TRAILER)?,
        tips: reuse::tips_digest(&tips),
    })
}

/// The tips a bitmap is written for: what a clone wants (`HEAD`, heads and tags), preferred,
/// and the other refs.
fn bitmap_tips(refs: &Refs) -> (Vec<ObjectId>, Vec<ObjectId>) {
    let (clone, other): (Vec<_>, Vec<_>) =
        refs.refs.iter().partition(|r| reuse::is_clone_ref(&r.name));
    let targets = |refs: Vec<&crate::protocol::Ref>| refs.iter().map(|r| r.target).collect();
    (targets(clone), targets(other))
}

/// Write the bitmap of `pack` for `refs` (see [`pack::bitmap::write`]), reusing the bitmap at
/// `replaced` when there is one: what was written, `None` when nothing was (the pack is
/// complete without it: requests walk instead).
fn write_bitmap(
    db: &Db,
    pack: &Path,
    refs: &Refs,
    replaced: Option<&Path>,
    interrupt: &AtomicBool,
) -> Option<pack::bitmap::WriteOutcome> {
    let (preferred, other) = bitmap_tips(refs);
    let tips = pack::bitmap::Tips {
        preferred: &preferred,
        other: &other,
    };
    match pack::bitmap::write(db, pack, tips, replaced, interrupt) {
        Ok(written) => {
            tracing::debug!(?written, "bitmap written");
            Some(written)
        }
        Err(e) => {
            tracing::warn!(pack = %pack.display(), error = %e, "no reachability bitmap written");
            None
        }
    }
}

/// Write the commit-graph of everything `refs` reach; `None` when none was written (the
/// walks then read the objects).
fn write_graph(dir: &Path, db: &Db, refs: &Refs, interrupt: &AtomicBool) -> Option<usize> {
    let tips: Vec<ObjectId> = refs.refs.iter().map(|r| r.target).collect();
    pack::graph::write(&dir.join("objects"), db, &tips, interrupt).unwrap_or_else(|e| {
        tracing::warn!(mirror = %dir.display(), "no commit-graph: {e}");
        None
    })
}

/// Consolidate the packs and loose objects of the mirror at `dir` into one pack (see the
/// module documentation), whatever [`due`] says. The caller keeps syncs of this mirror out
/// meanwhile.
pub fn consolidate(
    dir: &Path,
    grace: Duration,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let _lock = lock(dir).map_err(io("taking the mirror's maintenance lock"))?;
    // A maintenance or sync killed midway left its temporaries (as large as the new pack).
    super::sync::remove_leftovers(dir);
    consolidate_locked(dir, grace, thread_limit, interrupt)
}

/// [`consolidate`], under the maintenance lock.
fn consolidate_locked(
    dir: &Path,
    grace: Duration,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
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
    let replaced = crate::repo::bitmap_file(dir);
    let bitmap = replaced.as_deref().and_then(crate::repo::load_bitmap);
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
    // Each object's region, which also tells what is planned already.
    let mut region_of: Regions = first.iter().map(|c| (c.id, 0)).collect();
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
    second.retain(|c| match region_of.entry(c.id) {
        gix::hashtable::hash_map::Entry::Vacant(v) => {
            v.insert(1);
            true
        }
        gix::hashtable::hash_map::Entry::Occupied(_) => false,
    });
    let (third, dropped) = unreachable(dir, &old_loose, &db, &mut region_of, grace)?;
    let regions = [first.len(), second.len(), third.len()];

    let pack_dir = dir.join("objects/pack");
    let tmp = pack_dir.join(format!(".tmp-maintenance-{}.pack", std::process::id()));
    let written = write_regions(
        &db,
        [first, second, third],
        region_of,
        &tmp,
        thread_limit,
        interrupt,
    );
    let bytes = written.as_ref().map_or(0, |w| w.bytes);
    // Where the first region ends: at the entry that follows it, or the trailer.
    let end = written.as_ref().map_or(0, |w| {
        w.index
            .get(regions[0])
            .map_or(bytes.saturating_sub(20), |e| e.offset)
    });
    let installed = written.and_then(|w| install(&tmp, &pack_dir, w));
    let _ = std::fs::remove_file(&tmp);
    let new_pack = installed?;
    tracing::debug!(pack = %new_pack.display(), bytes, "pack written");
    let region = reuse::Region {
        pack: new_pack
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        objects: u32::try_from(regions[0]).unwrap_or(u32::MAX),
        end,
        tips: reuse::tips_digest(&clone_tips),
    };
    // A new repository handle for the new pack: the old one keeps the old packs mapped, with
    // the pages copying touched resident (as large as the pack), which nothing reads now.
    drop((db, repo, bitmap));
    let repo = crate::repo::open(dir)?;
    let db = pack::db(&repo);
    let bitmap = write_bitmap(&db, &new_pack, &refs, replaced.as_deref(), interrupt);

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
    let commit_graph = write_graph(dir, &db, &refs, interrupt);
    Ok(Outcome {
        work: Work::Consolidate,
        packs_before: old_packs.len(),
        regions,
        dropped,
        bytes,
        commit_graph,
        bitmap_commits: bitmap.as_ref().map_or(0, |w| w.commits),
        bitmap_reused: bitmap.as_ref().map_or(0, |w| w.reused),
    })
}

/// The region of each object (0, 1, 2: see [`consolidate`]).
type Regions = gix::hashtable::HashMap<ObjectId, u8>;

/// The objects without a region yet (of every pack and of `loose`), as counts for the third
/// region, and how many were too old to keep; the kept ones get region 2.
fn unreachable(
    dir: &Path,
    loose: &[(PathBuf, ObjectId)],
    db: &Db,
    region_of: &mut Regions,
    grace: Duration,
) -> Result<(Vec<output::Count>, usize), Error> {
    let now = SystemTime::now();
    let young = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_or(true, |t| now.duration_since(t).unwrap_or_default() < grace)
    };
    let mut kept = Vec::new();
    let mut dropped = 0;
    let mut buf = Vec::new();
    let mut consider = |id: ObjectId, keep: bool| -> Result<(), Error> {
        if region_of.contains_key(&id) {
            return Ok(());
        }
        if !keep {
            dropped += 1;
            return Ok(());
        }
        region_of.insert(id, 2);
        let location = db
            .location_by_oid(&id, &mut buf)
            .map_err(|e| Error::Write {
                context: format!("locating {id}"),
                source: e.into(),
            })?;
        kept.push(output::Count::from_data(id, location));
        Ok(())
    };
    for pack in packs(dir).map_err(io("listing packs"))? {
        let idx = pack.with_extension("idx");
        let keep = young(&pack);
        let index = gix_pack::index::File::at(&idx, gix::hash::Kind::Sha1).map_err(|source| {
            Error::Index {
                path: idx.clone(),
                source: source.into(),
            }
        })?;
        for entry in index.iter() {
            consider(entry.oid, keep)?;
        }
    }
    for (path, id) in loose {
        consider(*id, young(path))?;
    }
    Ok((kept, dropped))
}

/// Whether the mirror at `dir` has a loose object.
fn has_loose_objects(dir: &Path) -> std::io::Result<bool> {
    for fanout in std::fs::read_dir(dir.join("objects"))? {
        let fanout = fanout?;
        let name = fanout.file_name();
        let name = name.to_string_lossy();
        if name.len() == 2
            && name.bytes().all(|b| b.is_ascii_hexdigit())
            && std::fs::read_dir(fanout.path())?.next().is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
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

/// Objects per unit of copying work.
const COPY_CHUNK: usize = 4096;

/// Write the regions, in order, as one pack at `path`; what its index needs.
fn write_regions(
    db: &Db,
    regions: [Vec<output::Count>; 3],
    region_of: Regions,
    path: &Path,
    thread_limit: Option<usize>,
    interrupt: &AtomicBool,
) -> Result<Written, Error> {
    let total: usize = regions.iter().map(Vec::len).sum();
    let num_objects =
        u32::try_from(total).map_err(|_| Error::Invalid("too many objects for one pack".into()))?;
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
                // Each chunk that meets a delta whose base lies outside it lists and sorts the
                // offsets of the base's whole pack: few, large chunks.
                chunk_size: COPY_CHUNK,
                ..Default::default()
            },
        )
        .map_err(|e| Error::Write {
            context: "counting the objects to copy".into(),
            source: e.into(),
        })?;
        chunks.push(Box::new(gix::parallel::InOrderIter::from(entries)));
    }
    // Entries of each region come with indices local to it; `written` maps ids to their index
    // in the whole pack, `starts` where each region began.
    let mut written: gix::hashtable::HashMap<ObjectId, u32> = Default::default();
    written.reserve(total);
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
                        Some(r) if usize::from(*r) <= region => {
                            if let Some(at) = written.get(&id) {
                                entry.kind = EntryKind::DeltaRef {
                                    object_index: *at as usize,
                                };
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
                // At most u32::MAX objects (checked above).
                written.insert(entry.id, index as u32);
            }
            Ok(chunk)
        });
    let file = std::fs::File::create(path).map_err(io("creating the new pack"))?;
    let mut out = Hashed {
        inner: BufWriter::new(file),
        hasher: gix::hash::hasher(gix::hash::Kind::Sha1),
    };
    let mut header = Vec::with_capacity(12);
    header.extend_from_slice(b"PACK");
    header.extend_from_slice(&2u32.to_be_bytes());
    header.extend_from_slice(&num_objects.to_be_bytes());
    out.write_all(&header).map_err(io("writing the new pack"))?;
    let mut offset = header.len() as u64;
    let mut index: Vec<Indexed> = Vec::with_capacity(total);
    for chunk in entries {
        let chunk: Vec<output::Entry> = chunk.map_err(|e: gix::Error| Error::Write {
            context: "copying objects".into(),
            source: e.into(),
        })?;
        for entry in chunk {
            if entry.is_invalid() {
                return Err(Error::Invalid(format!(
                    "object {} cannot be written",
                    entry.id
                )));
            }
            let entry_header = entry.to_entry_header(gix_pack::data::Version::V2, |base| {
                offset - index[base].offset
            });
            header.clear();
            entry_header
                .write_to(entry.decompressed_size as u64, &mut header)
                .map_err(io("writing the new pack"))?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(&header);
            crc.update(&entry.compressed_data);
            out.write_all(&header).map_err(io("writing the new pack"))?;
            out.write_all(&entry.compressed_data)
                .map_err(io("writing the new pack"))?;
            index.push(Indexed {
                id: entry.id,
                offset,
                crc: crc.finalize(),
            });
            offset += (header.len() + entry.compressed_data.len()) as u64;
        }
    }
    if index.len() != total {
        return Err(Error::Invalid(format!(
            "{} objects written of {total}",
            index.len()
        )));
    }
    let checksum = out.hasher.try_finalize().map_err(|e| Error::Write {
        context: "hashing the new pack".into(),
        source: e.into(),
    })?;
    let mut file = out.inner;
    file.write_all(checksum.as_bytes())
        .map_err(io("writing the new pack"))?;
    file.flush().map_err(io("writing the new pack"))?;
    file.get_ref()
        .sync_all()
        .map_err(io("writing the new pack"))?;
    Ok(Written {
        index,
        checksum,
        bytes: offset + checksum.as_bytes().len() as u64,
    })
}

/// A writer that hashes what goes through it (the pack's trailing checksum).
struct Hashed<W> {
    inner: W,
    hasher: gix::hash::Hasher,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An entry of the new pack, as its index lists it.
struct Indexed {
    id: ObjectId,
    offset: u64,
    /// CRC-32 of the entry's bytes in the pack (header and data).
    crc: u32,
}

/// The new pack as [`write_regions`] wrote it.
struct Written {
    /// Its entries, in pack order.
    index: Vec<Indexed>,
    /// The pack's checksum, which names it.
    checksum: ObjectId,
    /// Its size.
    bytes: u64,
}

/// Install the pack written to `tmp` in `pack_dir` as `pack-<checksum>.pack`, with the
/// version 2 index (`gitformat-pack`) of its entries written from what the writer recorded:
/// the ids, offsets and CRCs are known, so nothing is read back, inflated or hashed again (as
/// git's `pack-objects` writes its index). The index is renamed into place last: readers find
/// packs by their index. Returns the pack's path.
fn install(tmp: &Path, pack_dir: &Path, written: Written) -> Result<PathBuf, Error> {
    let Written {
        mut index,
        checksum,
        ..
    } = written;
    index.sort_unstable_by_key(|e| e.id);
    let n = index.len();
    let mut idx = Vec::with_capacity(8 + 256 * 4 + n * (20 + 4 + 4) + 40);
    idx.extend_from_slice(b"\xfftOc");
    idx.extend_from_slice(&2u32.to_be_bytes());
    let mut count = 0usize;
    for byte in 0..=255u8 {
        count += index[count..]
            .iter()
            .take_while(|e| e.id.as_bytes()[0] == byte)
            .count();
        // At most u32::MAX objects: the pack header says how many in 32 bits.
        idx.extend_from_slice(&(count as u32).to_be_bytes());
    }
    for e in &index {
        idx.extend_from_slice(e.id.as_bytes());
    }
    for e in &index {
        idx.extend_from_slice(&e.crc.to_be_bytes());
    }
    let mut large = Vec::new();
    for e in &index {
        let small = match u32::try_from(e.offset) {
            Ok(o) if o & LARGE_OFFSET == 0 => o,
            _ => {
                large.extend_from_slice(&e.offset.to_be_bytes());
                LARGE_OFFSET | (large.len() / 8 - 1) as u32
            }
        };
        idx.extend_from_slice(&small.to_be_bytes());
    }
    idx.extend_from_slice(&large);
    idx.extend_from_slice(checksum.as_bytes());
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(&idx);
    let trailer = hasher.try_finalize().map_err(|e| Error::Write {
        context: "hashing the new index".into(),
        source: e.into(),
    })?;
    idx.extend_from_slice(trailer.as_bytes());

    let tmp_idx = tmp.with_extension("idx");
    let written = std::fs::File::create(&tmp_idx).and_then(|mut f| {
        f.write_all(&idx)?;
        f.sync_all()
    });
    let pack = pack_dir.join(format!("pack-{}.pack", checksum.to_hex()));
    let installed = written
        .and_then(|()| std::fs::rename(tmp, &pack))
        .and_then(|()| std::fs::rename(&tmp_idx, pack.with_extension("idx")));
    if let Err(e) = installed {
        let _ = std::fs::remove_file(&tmp_idx);
        return Err(io("installing the new pack")(e));
    }
    Ok(pack)
}

/// In an index's offset table: the offset is in the table of large offsets, at this index.
const LARGE_OFFSET: u32 = 0x8000_0000;
