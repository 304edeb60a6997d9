//! The object planner: which objects go into the pack.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::{FindHeader, Kind, TreeRefIter};
use gix::ObjectId;
use gix_pack::data::output::Count;
use gix_pack::Find;

use super::bitmap;
use super::walk::{self, Commits};
use super::{Db, Error};
use crate::protocol::filter::Filter;

/// What the client asked for, after negotiation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// Objects wanted. Annotated tags are sent along with the chain they peel through. Wanted
    /// objects are sent even when the filter would omit them.
    pub wants: &'a [ObjectId],
    /// Objects both sides have (acknowledged haves). Everything reachable from them is left out.
    pub common: &'a [ObjectId],
    /// `include-tag` candidates: `(tag object, fully peeled object)` for every annotated tag ref.
    /// A tag is added when its peeled object is in the pack. Empty when not requested.
    pub tags: &'a [(ObjectId, ObjectId)],
    /// Shallow boundary: commits whose parents are neither walked nor sent.
    pub shallow: &'a [ObjectId],
    /// Partial-clone filter for the objects that are not wanted directly.
    pub filter: Option<&'a Filter>,
    /// The client takes a thin pack: deltas against objects it has. Only honoured without a
    /// filter, since a partial clone may lack the blobs of its own commits.
    pub thin: bool,
    /// The reachability bitmaps of the repository, if it has any: the plan is then computed
    /// from them when they cover the request, and walked otherwise.
    pub bitmap: Option<&'a Arc<bitmap::Index>>,
}

/// How many objects of each kind the plan holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commits.
    pub commits: usize,
    /// Trees.
    pub trees: usize,
    /// Blobs.
    pub blobs: usize,
    /// Annotated tags.
    pub tags: usize,
}

impl Stats {
    /// All objects.
    pub fn total(&self) -> usize {
        self.commits + self.trees + self.blobs + self.tags
    }

    fn count(&mut self, kind: Kind) {
        match kind {
            Kind::Commit => self.commits += 1,
            Kind::Tree => self.trees += 1,
            Kind::Blob => self.blobs += 1,
            Kind::Tag => self.tags += 1,
        }
    }
}

/// The objects of a pack, each known to exist, with their pack locations resolved.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    /// One entry per object, ready for gix-pack.
    pub counts: Vec<Count>,
    /// Totals by kind.
    pub stats: Stats,
    /// For a thin pack: the objects outside the pack that the client is known to have, which
    /// deltas may be written against by id.
    pub thin_bases: Option<ThinBases>,
    /// The bitmapped pack and its gix pack id, when the repository has one: objects of it
    /// that must be decoded are read from it directly (see the pack writer).
    pub source: Option<(Arc<bitmap::Index>, u32)>,
}

/// The objects a thin pack's deltas may use as bases.
#[derive(Debug, Clone)]
pub enum ThinBases {
    /// From the walk: for sent trees and blobs, the object the client has at the same path in
    /// the trees of the common boundary (git's "preferred bases"). A delta may use that one.
    SamePath(HashMap<ObjectId, ObjectId>),
    /// Everything the wants and the common commits reach, from the bitmaps.
    Bitmap {
        /// The bitmaps `bits` are positions of.
        index: Arc<bitmap::Index>,
        /// Objects of the bitmapped pack.
        bits: bitmap::Bits,
        /// Objects outside of it.
        ext: HashSet<ObjectId>,
    },
}

impl ThinBases {
    /// Whether a delta may be written against `id`, which the pack does not hold.
    pub fn contains(&self, id: &ObjectId) -> bool {
        match self {
            ThinBases::SamePath(_) => false,
            ThinBases::Bitmap { index, bits, ext } => match index.objects().position(id) {
                Some(pos) => bits.get(pos),
                None => ext.contains(id),
            },
        }
    }

    /// The object the client has at the path where the walk met `id`, a base for a new delta.
    pub fn same_path(&self, id: &ObjectId) -> Option<ObjectId> {
        match self {
            ThinBases::SamePath(map) => map.get(id).copied(),
            ThinBases::Bitmap { .. } => None,
        }
    }

    /// The bitmap index the bases came from, whose pack order names the objects of its pack
    /// by offset.
    pub fn bitmap(&self) -> Option<&Arc<bitmap::Index>> {
        match self {
            ThinBases::SamePath(_) => None,
            ThinBases::Bitmap { index, .. } => Some(index),
        }
    }
}

/// A path in the trees, hashed: the path of an object is its parent's, extended by its name.
/// Only picks delta bases, so a collision costs at most a larger delta, never correctness.
type PathHash = u64;

/// The path of root trees.
const ROOT: PathHash = 0xcbf2_9ce4_8422_2325;

fn child_path(parent: PathHash, name: &[u8]) -> PathHash {
    name.iter().chain(b"/").fold(parent, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Paths seen by a walk whose pack will be thin.
#[derive(Default)]
struct Paths {
    /// What the client has at each path of the boundary's trees (the first object met there).
    client: std::collections::HashMap<PathHash, ObjectId>,
    /// Each sent tree and blob, with the path it was met at.
    sent: Vec<(ObjectId, PathHash)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mark {
    /// Reachable from the common boundary: the client has it.
    Uninteresting,
    /// In the plan.
    Sent,
    /// Seen but left out by the filter.
    Filtered,
    /// A tree waiting in the breadth-first walk.
    Queued,
}

/// Compute the objects reachable from `sel.wants` and not from `sel.common`, as
/// `git rev-list --objects <wants> --not <common>` does: commits are walked with the common
/// commits hidden (and the shallow boundary as grafts), the trees of the boundary commits
/// (uninteresting parents of sent commits) are marked as present on the client, and the trees
/// of sent commits are walked while skipping everything marked and what the filter omits.
///
/// Every object in the result exists; a missing one is an error, so that a pack header never
/// announces objects the body cannot deliver.
///
/// With [`Selection::bitmap`], the bitmaps answer instead when they can ([`bitmap::plan`]):
/// then the objects the common commits reach are left out exactly, not only those of the
/// boundary's trees, as `git rev-list --objects --use-bitmap-index` does.
pub fn plan(db: &Db, sel: &Selection<'_>, interrupt: &AtomicBool) -> Result<Plan, Error> {
    let mut plan = None;
    if let Some(index) = sel.bitmap {
        plan = bitmap::plan(db, index, sel, interrupt)?;
        match &plan {
            Some(plan) => tracing::debug!(objects = plan.counts.len(), "planned from the bitmap"),
            None => tracing::debug!("the bitmap does not cover the request: walking"),
        }
    }
    let mut plan = match plan {
        Some(plan) => plan,
        None => walk_plan(db, sel, interrupt)?,
    };
    plan.source = sel
        .bitmap
        .and_then(|index| Some((Arc::clone(index), index.objects().pack_id(db)?)));
    Ok(plan)
}

/// [`plan()`] by walking commits and trees.
fn walk_plan(db: &Db, sel: &Selection<'_>, interrupt: &AtomicBool) -> Result<Plan, Error> {
    let grafts: HashSet<ObjectId> = sel.shallow.iter().copied().collect();
    let mut commits = Commits::new(db, grafts).locating();
    let mut p = Planner {
        db,
        buf: Vec::new(),
        location_buf: Vec::new(),
        marks: HashMap::default(),
        plan: Plan::default(),
        interrupt,
        work: 0,
        filter: sel.filter,
        paths: (sel.thin && sel.filter.is_none() && !sel.common.is_empty()).then(Paths::default),
        bitmapped: sel.bitmap.and_then(|index| {
            let objects = index.objects();
            objects.pack_id(db).map(|pack_id| (objects, pack_id))
        }),
    };

    let mut tips = Vec::new();
    let mut tree_wants = Vec::new();
    for want in sel.wants {
        p.add_want(*want, &mut tips, &mut tree_wants)?;
    }

    let mut hidden = Vec::new();
    let mut uninteresting_trees = Vec::new();
    for have in sel.common {
        match p.peel_to_non_tag(*have)? {
            (id, Kind::Commit) => hidden.push(id),
            (id, Kind::Tree) => uninteresting_trees.push(id),
            (id, _) => {
                p.marks.entry(id).or_insert(Mark::Uninteresting);
            }
        }
    }

    let walked = walk::walk(&mut commits, &tips, &hidden, None, interrupt)?;
    for boundary in &walked.boundary {
        uninteresting_trees.push(commits.get(*boundary)?.tree);
    }
    p.walk_trees(
        &uninteresting_trees,
        Mark::Uninteresting,
        &HashSet::default(),
    )?;

    let wanted: HashSet<ObjectId> = tips.iter().copied().collect();
    let keep_commits = sel
        .filter
        .is_none_or(|f| f.includes(Kind::Commit, 0, &mut || 0));
    let descend = sel
        .filter
        .is_none_or(|f| f.descends(0) || f.includes(Kind::Tree, 0, &mut || 0));
    let mut roots = Vec::new();
    for id in &walked.commits {
        let commit = commits.get(*id)?;
        let (location, tree) = (commit.location.clone(), commit.tree);
        if keep_commits || wanted.contains(id) {
            p.marks.insert(*id, Mark::Sent);
            p.plan.counts.push(Count::from_data(*id, location));
            p.plan.stats.commits += 1;
        }
        if descend {
            roots.push(tree);
        }
    }
    let wanted_trees: HashSet<ObjectId> = tree_wants.iter().copied().collect();
    roots.extend(tree_wants);
    p.walk_trees(&roots, Mark::Sent, &wanted_trees)?;

    for (tag, peeled) in sel.tags {
        if p.marks.get(peeled) == Some(&Mark::Sent) && !p.marks.contains_key(tag) {
            let mut next = *tag;
            while !p.marks.contains_key(&next) {
                match p.emit_if_tag(next)? {
                    Some(target) => next = target,
                    None => break,
                }
            }
        }
    }
    if let Some(paths) = p.paths.take() {
        let same_path = paths
            .sent
            .into_iter()
            .filter_map(|(id, path)| {
                let theirs = *paths.client.get(&path)?;
                (theirs != id).then_some((id, theirs))
            })
            .collect();
        p.plan.thin_bases = Some(ThinBases::SamePath(same_path));
    }
    Ok(p.plan)
}

struct Planner<'a> {
    db: &'a Db,
    buf: Vec<u8>,
    location_buf: Vec<u8>,
    marks: HashMap<ObjectId, Mark>,
    plan: Plan,
    interrupt: &'a AtomicBool,
    /// Objects visited so far, for interrupt checks.
    work: usize,
    filter: Option<&'a Filter>,
    /// Kept when the pack will be thin, to find the client's version of what is sent.
    paths: Option<Paths>,
    /// The bitmapped pack's order and gix id, when the repository has a bitmap: objects of
    /// that pack are located from it ([`Planner::locate`]).
    bitmapped: Option<(&'a bitmap::Objects, u32)>,
}

impl Planner<'_> {
    /// Count one unit of work and, every so often, check whether the client is still there.
    fn tick(&mut self) -> Result<(), Error> {
        self.work += 1;
        super::check_interrupt(self.interrupt, self.work)
    }

    fn read_err(context: &'static str, id: ObjectId) -> impl FnOnce(gix::Error) -> Error {
        move |e| Error::Read {
            context,
            id,
            source: e.into(),
        }
    }

    /// Where `id` is packed. gix learns an entry's size by inflating it (a whole blob, for most
    /// objects of a `--depth=1` pack); the bitmapped pack's order gives it as the distance to
    /// the next entry.
    fn locate(
        &mut self,
        id: ObjectId,
        context: &'static str,
    ) -> Result<Option<gix_pack::data::entry::Location>, Error> {
        if let Some((objects, pack_id)) = self.bitmapped {
            if let Some(pos) = objects.position(&id) {
                return Ok(Some(objects.location(pos, pack_id)));
            }
        }
        self.db
            .location_by_oid(&id, &mut self.location_buf)
            .map_err(Self::read_err(context, id))
    }

    fn emit(
        &mut self,
        id: ObjectId,
        kind: Kind,
        location: Option<gix_pack::data::entry::Location>,
    ) {
        self.marks.insert(id, Mark::Sent);
        self.plan.counts.push(Count::from_data(id, location));
        self.plan.stats.count(kind);
    }

    /// Classify a want: tags are sent and peeled, commits become walk tips, trees are walked,
    /// blobs are sent.
    fn add_want(
        &mut self,
        want: ObjectId,
        tips: &mut Vec<ObjectId>,
        trees: &mut Vec<ObjectId>,
    ) -> Result<(), Error> {
        let mut id = want;
        loop {
            if self.marks.get(&id) == Some(&Mark::Sent) {
                return Ok(());
            }
            let (kind, location, tag_target) = {
                let (data, location) =
                    super::find(self.db, &mut self.buf, id, "reading wanted object")?;
                let target = match data.kind {
                    Kind::Tag => Some(super::tag_target(id, data.data)?),
                    _ => None,
                };
                (data.kind, location, target)
            };
            match (kind, tag_target) {
                (Kind::Tag, Some(target)) => {
                    self.emit(id, kind, location);
                    id = target;
                }
                (Kind::Commit, _) => {
                    tips.push(id);
                    return Ok(());
                }
                (Kind::Tree, _) => {
                    trees.push(id);
                    return Ok(());
                }
                (Kind::Blob | Kind::Tag, _) => {
                    self.emit(id, kind, location);
                    return Ok(());
                }
            }
        }
    }

    /// If `id` is a tag that is not yet planned, plan it and return its target.
    fn emit_if_tag(&mut self, id: ObjectId) -> Result<Option<ObjectId>, Error> {
        let Some((data, location)) = self
            .db
            .try_find(&id, &mut self.buf)
            .map_err(Self::read_err("reading tag", id))?
        else {
            return Ok(None);
        };
        if data.kind != Kind::Tag {
            return Ok(None);
        }
        let target = super::tag_target(id, data.data)?;
        self.emit(id, Kind::Tag, location);
        Ok(Some(target))
    }

    fn peel_to_non_tag(&mut self, id: ObjectId) -> Result<(ObjectId, Kind), Error> {
        super::peel(self.db, &mut self.buf, id)
    }

    /// Decide about a tree or blob reached at `depth`; returns whether it is now new to the plan.
    fn take(
        &mut self,
        id: ObjectId,
        kind: Kind,
        depth: u64,
        mark: Mark,
        wanted: bool,
    ) -> Result<bool, Error> {
        if mark == Mark::Uninteresting {
            return Ok(self.marks.insert(id, Mark::Uninteresting).is_none());
        }
        let filter = match self.filter {
            Some(f) if !wanted => f,
            _ => return Ok(true),
        };
        let db = self.db;
        let mut size = || db.try_header(&id).ok().flatten().map_or(0, |h| h.size);
        if filter.includes(kind, depth, &mut size) {
            Ok(true)
        } else {
            self.marks.insert(id, Mark::Filtered);
            Ok(false)
        }
    }

    /// Walk the trees `roots` and everything below them that is not marked yet, marking it
    /// `mark`; with [`Mark::Sent`], every newly marked object the filter passes is added to the
    /// plan. Roots in `wanted` are sent whatever the filter says. When the pack will be thin,
    /// the paths of what the client has and of what is sent are noted ([`Paths`]).
    ///
    /// The walk goes breadth-first, one depth at a time, and reads each level's trees in pack
    /// order. Trees of one path form delta chains whose bases come first in the pack, so in this
    /// order nearly every delta finds its base in the delta-base cache, where a depth-first walk
    /// re-inflates long chains (3x slower on the `large` fixture with a cold cache). It also
    /// reaches every object first at its smallest depth, as `tree:<depth>` filters need.
    fn walk_trees(
        &mut self,
        roots: &[ObjectId],
        mark: Mark,
        wanted: &HashSet<ObjectId>,
    ) -> Result<(), Error> {
        let mut level: Vec<(ObjectId, PathHash)> = Vec::new();
        for root in roots {
            if mark == Mark::Uninteresting {
                if let Some(paths) = &mut self.paths {
                    paths.client.entry(ROOT).or_insert(*root);
                }
            }
            // A wanted tree is sent even when the client is known to have it.
            let queue = match self.marks.get(root) {
                None => true,
                Some(Mark::Sent | Mark::Queued) => false,
                Some(_) => wanted.contains(root),
            };
            if queue {
                self.marks.insert(*root, Mark::Queued);
                level.push((*root, ROOT));
            }
        }
        let mut depth = 0u64;
        let mut keyed = Vec::new();
        let mut children = Vec::new();
        while !level.is_empty() {
            keyed.clear();
            for (id, path) in level.drain(..) {
                let location = self.locate(id, "locating tree")?;
                keyed.push((
                    location.map_or((u32::MAX, u64::MAX), |l| (l.pack_id, l.pack_offset)),
                    id,
                    path,
                ));
            }
            keyed.sort_unstable();
            for (_, tree, path) in std::mem::take(&mut keyed) {
                self.tick()?;
                let included = self.take(tree, Kind::Tree, depth, mark, wanted.contains(&tree))?;
                children.clear();
                let location = {
                    let (data, location) =
                        super::find_kind(self.db, &mut self.buf, tree, Kind::Tree)?;
                    for entry in TreeRefIter::from_bytes(data.data, tree.kind()) {
                        let entry = entry.map_err(|e| Error::Read {
                            context: "decoding tree",
                            id: tree,
                            source: e.into(),
                        })?;
                        // Submodule commits live in another repository.
                        if !entry.mode.is_commit() {
                            let child = match &self.paths {
                                Some(_) => child_path(path, entry.filename),
                                None => ROOT,
                            };
                            children.push((entry.oid.to_owned(), entry.mode.is_tree(), child));
                        }
                    }
                    location
                };
                let decided = match mark {
                    Mark::Sent if included => {
                        self.plan.counts.push(Count::from_data(tree, location));
                        self.plan.stats.trees += 1;
                        if let Some(paths) = &mut self.paths {
                            paths.sent.push((tree, path));
                        }
                        Mark::Sent
                    }
                    Mark::Sent => Mark::Filtered,
                    other => other,
                };
                self.marks.insert(tree, decided);
                if mark == Mark::Sent && self.filter.is_some_and(|f| !f.descends(depth)) {
                    continue;
                }
                for (id, is_tree, path) in children.drain(..) {
                    if mark == Mark::Uninteresting {
                        if let Some(paths) = &mut self.paths {
                            paths.client.entry(path).or_insert(id);
                        }
                    }
                    if self.marks.contains_key(&id) {
                        continue;
                    }
                    if is_tree {
                        self.marks.insert(id, Mark::Queued);
                        level.push((id, path));
                    } else if self.take(id, Kind::Blob, depth + 1, mark, false)?
                        && mark == Mark::Sent
                    {
                        let location = self.locate(id, "locating blob")?;
                        if location.is_none() && !self.db.contains(&id) {
                            return Err(Error::Missing(id));
                        }
                        self.emit(id, Kind::Blob, location);
                        if let Some(paths) = &mut self.paths {
                            paths.sent.push((id, path));
                        }
                    }
                }
            }
            depth += 1;
        }
        Ok(())
    }
}
