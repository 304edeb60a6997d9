//! Creating and syncing one mirror, on a blocking thread.
//!
//! A sync first lists the upstream's refs (one round trip) and compares them with the mirror's
//! snapshot. Equal refs end the sync there: no fetch, no ref transaction, no file written but
//! the sync time. Otherwise only the refs that changed are fetched (gix locks every ref it
//! maps, so handing it the unchanged thousands of `refs/pull/*` would cost a lock file each),
//! deleted refs are removed and `HEAD` follows the upstream's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::bstr::{BStr, BString, ByteSlice};
use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
use gix::refs::Target;
use gix::ObjectId;

use super::plan::Plan;
use super::record::{self, Held, Record};
use super::{Request, Status};
use crate::config::Secret;
use crate::repo::Snapshot;
use crate::upstream::{self, Listing};

/// What an update did.
pub(super) struct Outcome {
    pub status: Status,
    /// The mirror's snapshot after the update.
    pub snapshot: Arc<Snapshot>,
    /// Refs the upstream has.
    pub refs: usize,
    /// Refs that were created, moved or deleted (and `HEAD`, when it moved).
    pub changed: usize,
    /// Bytes the fetch added.
    pub pack_bytes: u64,
}

/// A local failure with its whole cause chain (gix prints it with `{:#}`).
fn local<E: std::error::Error + 'static>(e: E) -> upstream::Error {
    upstream::Error::local(&e, crate::error_chain(&e))
}

/// Make an empty bare repository at `tmp` (a new mirror's temporary directory), unless a ref
/// listing made it already.
pub(super) fn init(tmp: &Path) -> Result<(), upstream::Error> {
    if tmp.join("HEAD").is_file() {
        return Ok(());
    }
    if let Some(parent) = tmp.parent() {
        std::fs::create_dir_all(parent).map_err(local)?;
    }
    gix::create::into(
        tmp,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
    )
    .map_err(local)?;
    Ok(())
}

/// Fetch everything of `req`'s upstream into the temporary directory `tmp` with
/// `authorization`, and give it the record held in `held` (what is kept of a mirror it
/// replaces), marked `private` or not and synced now. `tmp` is removed if that fails.
fn build(
    req: &Request,
    tmp: &Path,
    authorization: Option<&str>,
    private: bool,
    held: &parking_lot::Mutex<Held>,
    opts: &upstream::Options,
    interrupt: &AtomicBool,
) -> Result<(upstream::Fetched, Record), upstream::Error> {
    let result = (|| {
        init(tmp)?;
        let fetched = upstream::fetch(
            tmp,
            &req.url,
            &upstream::Refs::All,
            authorization,
            opts,
            interrupt,
        )?;
        apply(tmp, &fetched.listing, &HashMap::new(), None)?;
        let mut record = held.lock().record.clone();
        record.private = private;
        record.last_success_ms = Some(record::now_ms());
        record.write(tmp).map_err(local)?;
        Ok((fetched, record))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    result
}

/// Rename the new mirror into place with `rename`, and hold its `record` from then on: under
/// the lock of the record held, so that a serve written meanwhile does not write the record
/// of the mirror it replaces (or a new mirror's without its privacy).
fn install(
    held: &parking_lot::Mutex<Held>,
    record: &Record,
    rename: impl FnOnce() -> Result<(), upstream::Error>,
) -> Result<(), upstream::Error> {
    let mut held = held.lock();
    rename()?;
    held.record.private = record.private;
    held.record.last_success_ms = record.last_success_ms;
    Ok(())
}

/// What a creation reports, from what it fetched.
fn created(
    dir: &Path,
    status: Status,
    fetched: &upstream::Fetched,
) -> Result<Outcome, upstream::Error> {
    let snapshot = Snapshot::open(dir, None).map_err(local)?;
    Ok(Outcome {
        status,
        snapshot: Arc::new(snapshot),
        refs: fetched.listing.refs.len(),
        changed: fetched.listing.refs.len(),
        pack_bytes: fetched.pack_bytes,
    })
}

/// Create the mirror of `req` in the temporary directory `tmp`, fetching with
/// `authorization`, then rename it into place; `held` is the record the store holds for it.
pub(super) fn create(
    req: &Request,
    tmp: &Path,
    authorization: Option<&str>,
    private: bool,
    held: &parking_lot::Mutex<Held>,
    opts: &upstream::Options,
    interrupt: &AtomicBool,
) -> Result<Outcome, upstream::Error> {
    let (fetched, record) = build(req, tmp, authorization, private, held, opts, interrupt)?;
    // The mirror's parent directories are made only now, for a mirror that exists.
    let installed = (|| {
        if let Some(parent) = req.dir.parent() {
            std::fs::create_dir_all(parent).map_err(local)?;
        }
        install(held, &record, || {
            std::fs::rename(tmp, &req.dir).map_err(local)
        })
    })();
    if let Err(e) = installed {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    created(&req.dir, Status::Clone, &fetched)
}

/// Make the existing mirror of `req` again, anonymously, in `tmp`, and swap it into place:
/// what its earlier syncs fetched with credentials is not kept. The old mirror is moved to
/// `aside` under its maintenance lock, then deleted; readers that hold its packs keep them
/// until they finish, as after a maintenance. If anything fails, the old mirror stays. `held`
/// is the record the store holds for it.
pub(super) fn recreate(
    req: &Request,
    tmp: &Path,
    aside: &Path,
    held: &parking_lot::Mutex<Held>,
    opts: &upstream::Options,
    interrupt: &AtomicBool,
) -> Result<Outcome, upstream::Error> {
    let (fetched, record) = build(req, tmp, None, false, held, opts, interrupt)?;
    let swapped = (|| {
        let _maintenance = super::maintain::lock(&req.dir).map_err(local)?;
        install(held, &record, || {
            std::fs::rename(&req.dir, aside).map_err(local)?;
            if let Err(e) = std::fs::rename(tmp, &req.dir) {
                let _ = std::fs::rename(aside, &req.dir);
                return Err(local(e));
            }
            Ok(())
        })
    })();
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::remove_dir_all(aside) {
        // Removed at the next start.
        tracing::warn!(dir = %aside.display(), error = %e, "cannot delete a replaced mirror");
    }
    created(&req.dir, Status::Sync, &fetched)
}

/// The snapshot of the mirror at `dir` as it is on disk now: `previous` when nothing changed,
/// else a new one. Someone else (an operator's `git fetch`) may have changed the mirror.
pub(super) fn refresh(
    dir: &Path,
    previous: Option<Arc<Snapshot>>,
) -> Result<Arc<Snapshot>, crate::repo::Error> {
    match previous {
        Some(s) if s.is_current(dir)? => Ok(s),
        previous => Ok(Arc::new(Snapshot::open(dir, previous.as_deref())?)),
    }
}

/// A ref lock older than this is a crash's leftover: git and gix hold theirs for milliseconds.
const STALE_LOCK: std::time::Duration = std::time::Duration::from_secs(600);

/// What a sync or maintenance that died left in the mirror at `dir`: temporary pack, index,
/// bitmap and commit-graph files (`objects/pack/.tmp*`, `objects/info/.tmp*`, which both
/// write only under the mirror's maintenance lock), and ref locks and record temporaries
/// older than [`STALE_LOCK`] (a leftover ref lock would make every later sync fail).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for temporaries in [dir.join("objects/pack"), dir.join("objects/info")] {
        if let Ok(entries) = std::fs::read_dir(temporaries) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    found.push(entry.path());
                }
            }
        }
    }
    let stale = |path: &Path| {
        std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_LOCK)
    };
    for lock in [dir.join("packed-refs.lock"), dir.join("HEAD.lock")] {
        if stale(&lock) {
            found.push(lock);
        }
    }
    // A record's temporary, left by a crash between its write and its rename.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name
                .to_string_lossy()
                .starts_with(super::record::TMP_PREFIX)
                && stale(&path)
            {
                found.push(path);
            }
        }
    }
    for entry in walkdir::WalkDir::new(dir.join("refs"))
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_file()
            && entry.file_name().to_string_lossy().ends_with(".lock")
            && stale(entry.path())
        {
            found.push(entry.into_path());
        }
    }
    found
}

/// Remove the [`leftovers`] of the mirror at `dir`; the caller holds its maintenance lock.
/// Returns how many files were removed.
pub(super) fn remove_leftovers(dir: &Path) -> usize {
    let mut removed = 0;
    for path in leftovers(dir) {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a leftover of an interrupted sync or maintenance");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover")
            }
        }
    }
    removed
}

/// Remove the [`leftovers`] of the mirror at `dir` under its maintenance lock, unless someone
/// holds it: then they are the files of a maintenance (`smart-git-proxy maintain`) running
/// now, which it removes itself when it ends, or its next run does.
pub(super) fn remove_leftovers_unless_busy(dir: &Path) -> usize {
    if leftovers(dir).is_empty() {
        return 0;
    }
    match super::maintain::try_lock(dir) {
        Ok(Some(_lock)) => remove_leftovers(dir),
        Ok(None) => {
            tracing::info!(mirror = %dir.display(), "leftovers kept: maintenance holds the mirror");
            0
        }
        Err(e) => {
            tracing::warn!(mirror = %dir.display(), error = %e, "leftovers kept: cannot take the maintenance lock");
            0
        }
    }
}

/// Sync the existing mirror of `req`, whose snapshot (current, see [`refresh`]) is `snapshot`,
/// as `plan` says: to its listing (the upstream's refs as its credentials show them), fetching
/// with those credentials, private or not. `held` is the record the store holds for the
/// mirror.
pub(super) fn sync(
    req: &Request,
    snapshot: Arc<Snapshot>,
    plan: Plan,
    held: &parking_lot::Mutex<Held>,
    opts: &upstream::Options,
    interrupt: &AtomicBool,
) -> Result<Outcome, upstream::Error> {
    let Plan {
        listing,
        authorization,
        private,
        ..
    } = plan;
    let authorization = authorization.as_ref().map(Secret::expose);
    let dir = &req.dir;
    let _maintenance = super::maintain::lock(dir).map_err(local)?;
    remove_leftovers(dir);
    // Before any object fetched with credentials lands in the mirror.
    set_private(held, dir, private)?;
    let ours: HashMap<&BStr, ObjectId> =
        crate::protocol::advert::sorted_part(&snapshot.refs().refs)
            .iter()
            .map(|r| (r.name.as_ref(), r.target))
            .collect();
    let changed: Vec<BString> = listing
        .refs
        .iter()
        .filter(|(name, id)| ours.get(name.as_bstr()) != Some(id))
        .map(|(name, _)| name.clone())
        .collect();
    let mut pack_bytes = 0;
    if !changed.is_empty() {
        pack_bytes = upstream::fetch(
            dir,
            &req.url,
            &upstream::Refs::Only(changed.clone()),
            authorization,
            opts,
            interrupt,
        )?
        .pack_bytes;
    }
    let head = snapshot
        .refs()
        .refs
        .first()
        .filter(|r| r.name == "HEAD")
        .and_then(|r| r.symref_target.as_ref())
        .or(snapshot.refs().unborn_head.as_ref());
    let edits = apply(dir, &listing, &ours, head)?;
    record::update(held, dir, |r| r.last_success_ms = Some(record::now_ms())).map_err(local)?;
    let changed = changed.len() + edits;
    let snapshot = if changed > 0 {
        Arc::new(Snapshot::open(dir, Some(&snapshot)).map_err(local)?)
    } else {
        snapshot
    };
    Ok(Outcome {
        status: Status::Sync,
        snapshot,
        refs: listing.refs.len(),
        changed,
        pack_bytes,
    })
}

/// What gix's fetch does not do: delete the refs of `ours` the upstream no longer has, and point
/// `HEAD` where the upstream's points when that differs from `head`. Returns the edits made.
fn apply(
    dir: &Path,
    listing: &Listing,
    ours: &HashMap<&BStr, ObjectId>,
    head: Option<&BString>,
) -> Result<usize, upstream::Error> {
    let theirs: std::collections::HashSet<&BStr> =
        listing.refs.iter().map(|(n, _)| n.as_ref()).collect();
    let mut edits = Vec::new();
    for name in ours.keys().filter(|n| !theirs.contains(*n)) {
        edits.push(RefEdit {
            change: Change::Delete {
                expected: PreviousValue::Any,
                log: RefLog::AndReference,
            },
            name: (*name).try_into().map_err(local)?,
            deref: false,
        });
    }
    if let Some(target) = listing.head.as_ref().filter(|t| Some(*t) != head) {
        let target: gix::refs::FullName = target.clone().try_into().map_err(local)?;
        edits.push(RefEdit {
            change: Change::Update {
                log: LogChange::default(),
                expected: PreviousValue::Any,
                new: Target::Symbolic(target),
            },
            name: "HEAD".try_into().map_err(local)?,
            deref: false,
        });
    }
    let count = edits.len();
    if count > 0 {
        let repo = gix::open_opts(dir, gix::open::Options::isolated()).map_err(local)?;
        repo.edit_references(edits).map_err(local)?;
    }
    Ok(count)
}

/// Mark the mirror at `dir`, whose record the store holds in `held`, private (served only to
/// clients whose credentials the upstream accepts) or public.
pub(super) fn set_private(
    held: &parking_lot::Mutex<Held>,
    dir: &Path,
    private: bool,
) -> Result<(), upstream::Error> {
    record::update(held, dir, |r| r.private = private).map_err(local)
}
