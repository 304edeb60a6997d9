//! The object planner: which objects go into the pack.

use std::sync::atomic::{AtomicBool, Ordering};

use gix::hashtable::HashMap;
use gix::objs::{CommitRefIter, Kind, TagRefIter, TreeRefIter};
use gix::ObjectId;
use gix_pack::data::output::Count;
use gix_pack::Find;

use super::{Db, Error};

/// What the client asked for, after negotiation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// Objects wanted. Annotated tags are sent along with the chain they peel through.
    pub wants: &'a [ObjectId],
    /// Objects both sides have (acknowledged haves). Everything reachable from them is left out.
    pub common: &'a [ObjectId],
    /// `include-tag` candidates: `(tag object, fully peeled object)` for every annotated tag ref.
    /// A tag is added when its peeled object is in the pack. Empty when not requested.
    pub tags: &'a [(ObjectId, ObjectId)],
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
}

/// The objects of a pack, each known to exist, with their pack locations resolved.
#[derive(Debug, Default)]
pub struct Plan {
    /// One entry per object, ready for gix-pack.
    pub counts: Vec<Count>,
    /// Totals by kind.
    pub stats: Stats,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Reachable from the common boundary: the client has it.
    Uninteresting,
    /// In the plan.
    Sent,
}

/// How often (in objects) the interrupt flag is checked.
const INTERRUPT_CHECK_INTERVAL: usize = 1024;

/// Compute the objects reachable from `sel.wants` and not from `sel.common`, as
/// `git rev-list --objects <wants> --not <common>` does: commits are walked with the common
/// commits hidden, the trees of the boundary commits (uninteresting parents of sent commits)
/// are marked as present on the client, and the trees of sent commits are walked while
/// skipping everything marked.
///
/// Every object in the result exists; a missing one is an error, so that a pack header never
/// announces objects the body cannot deliver.
pub fn plan(
    repo: &gix::Repository,
    db: &Db,
    sel: &Selection<'_>,
    interrupt: &AtomicBool,
) -> Result<Plan, Error> {
    let mut p = Planner {
        db,
        buf: Vec::new(),
        location_buf: Vec::new(),
        marks: HashMap::default(),
        plan: Plan::default(),
        interrupt,
        stack: Vec::new(),
        work: 0,
    };

    let mut tips = Vec::new();
    let mut tree_wants = Vec::new();
    for want in sel.wants {
        p.add_want(*want, &mut tips, &mut tree_wants)?;
    }

    let mut hidden = Vec::new();
    for have in sel.common {
        match p.peel_to_non_tag(*have)? {
            (id, Kind::Commit) => hidden.push(id),
            (id, Kind::Tree) => p.walk_tree(id, Mark::Uninteresting)?,
            (id, Kind::Blob) => {
                p.marks.entry(id).or_insert(Mark::Uninteresting);
            }
            (_, Kind::Tag) => unreachable!("peeled"),
        }
    }

    let mut commits = Vec::new();
    let mut parents = Vec::new();
    if !tips.is_empty() {
        let walk = repo
            .rev_walk(tips)
            .with_hidden(hidden)
            .all()
            .map_err(|e| Error::Walk(e.to_string()))?;
        for info in walk {
            p.tick()?;
            let info = info.map_err(|e| Error::Walk(e.to_string()))?;
            parents.extend(info.parent_ids.iter().copied());
            commits.push(info.id);
        }
    }
    if !parents.is_empty() {
        let sent: gix::hashtable::HashSet<ObjectId> = commits.iter().copied().collect();
        parents.sort_unstable();
        parents.dedup();
        for boundary in parents.into_iter().filter(|id| !sent.contains(id)) {
            // A boundary commit may be missing only in a broken repository; git fails the same way.
            let tree = p.commit_tree(boundary)?.1;
            p.walk_tree(tree, Mark::Uninteresting)?;
        }
    }

    for commit in &commits {
        let (location, tree) = p.commit_tree(*commit)?;
        p.marks.insert(*commit, Mark::Sent);
        p.plan.counts.push(Count::from_data(*commit, location));
        p.plan.stats.commits += 1;
        p.walk_tree(tree, Mark::Sent)?;
    }
    for tree in tree_wants {
        p.walk_tree(tree, Mark::Sent)?;
    }

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
    Ok(p.plan)
}

struct Planner<'a> {
    db: &'a Db,
    buf: Vec<u8>,
    location_buf: Vec<u8>,
    marks: HashMap<ObjectId, Mark>,
    plan: Plan,
    interrupt: &'a AtomicBool,
    stack: Vec<ObjectId>,
    /// Objects visited so far, for interrupt checks.
    work: usize,
}

impl Planner<'_> {
    /// Count one unit of work and, every so often, check whether the client is still there.
    fn tick(&mut self) -> Result<(), Error> {
        self.work += 1;
        if self.work.is_multiple_of(INTERRUPT_CHECK_INTERVAL)
            && self.interrupt.load(Ordering::Relaxed)
        {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    fn read_err(context: &'static str, id: ObjectId) -> impl FnOnce(gix::Error) -> Error {
        move |e| Error::Read {
            context,
            id,
            message: e.to_string(),
        }
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
            let (data_kind, location, tag_target) = {
                let (data, location) = self
                    .db
                    .try_find(&id, &mut self.buf)
                    .map_err(Self::read_err("reading wanted object", id))?
                    .ok_or(Error::Missing(id))?;
                let target = match data.kind {
                    Kind::Tag => Some(
                        TagRefIter::from_bytes(data.data, id.kind())
                            .target_id()
                            .map_err(|e| Error::Read {
                                context: "decoding tag",
                                id,
                                message: e.to_string(),
                            })?,
                    ),
                    _ => None,
                };
                (data.kind, location, target)
            };
            match (data_kind, tag_target) {
                (Kind::Tag, Some(target)) => {
                    self.marks.insert(id, Mark::Sent);
                    self.plan.counts.push(Count::from_data(id, location));
                    self.plan.stats.tags += 1;
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
                (Kind::Blob, _) | (Kind::Tag, None) => {
                    self.marks.insert(id, Mark::Sent);
                    self.plan.counts.push(Count::from_data(id, location));
                    self.plan.stats.blobs += 1;
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
        let target = TagRefIter::from_bytes(data.data, id.kind())
            .target_id()
            .map_err(|e| Error::Read {
                context: "decoding tag",
                id,
                message: e.to_string(),
            })?;
        self.marks.insert(id, Mark::Sent);
        self.plan.counts.push(Count::from_data(id, location));
        self.plan.stats.tags += 1;
        Ok(Some(target))
    }

    fn peel_to_non_tag(&mut self, mut id: ObjectId) -> Result<(ObjectId, Kind), Error> {
        loop {
            let (data, _) = self
                .db
                .try_find(&id, &mut self.buf)
                .map_err(Self::read_err("reading object", id))?
                .ok_or(Error::Missing(id))?;
            if data.kind != Kind::Tag {
                return Ok((id, data.kind));
            }
            id = TagRefIter::from_bytes(data.data, id.kind())
                .target_id()
                .map_err(|e| Error::Read {
                    context: "decoding tag",
                    id,
                    message: e.to_string(),
                })?;
        }
    }

    fn commit_tree(
        &mut self,
        id: ObjectId,
    ) -> Result<(Option<gix_pack::data::entry::Location>, ObjectId), Error> {
        let (data, location) = self
            .db
            .try_find(&id, &mut self.buf)
            .map_err(Self::read_err("reading commit", id))?
            .ok_or(Error::Missing(id))?;
        let tree = CommitRefIter::from_bytes(data.data, id.kind())
            .tree_id()
            .map_err(|e| Error::Read {
                context: "decoding commit",
                id,
                message: e.to_string(),
            })?;
        Ok((location, tree))
    }

    /// Walk the tree `root` and everything below it that is not marked yet, marking it `mark`;
    /// with [`Mark::Sent`], every newly marked object is added to the plan.
    fn walk_tree(&mut self, root: ObjectId, mark: Mark) -> Result<(), Error> {
        if self.marks.contains_key(&root) {
            return Ok(());
        }
        self.marks.insert(root, mark);
        self.stack.clear();
        self.stack.push(root);
        while let Some(tree) = self.stack.pop() {
            self.tick()?;
            let (data, location) = self
                .db
                .try_find(&tree, &mut self.buf)
                .map_err(Self::read_err("reading tree", tree))?
                .ok_or(Error::Missing(tree))?;
            if data.kind != Kind::Tree {
                return Err(Error::Read {
                    context: "expected a tree at",
                    id: tree,
                    message: format!("found a {}", data.kind),
                });
            }
            if mark == Mark::Sent {
                self.plan.counts.push(Count::from_data(tree, location));
                self.plan.stats.trees += 1;
            }
            for entry in TreeRefIter::from_bytes(data.data, tree.kind()) {
                let entry = entry.map_err(|e| Error::Read {
                    context: "decoding tree",
                    id: tree,
                    message: e.to_string(),
                })?;
                // Submodule commits live in another repository.
                if entry.mode.is_commit() {
                    continue;
                }
                let id = entry.oid.to_owned();
                if self.marks.contains_key(&id) {
                    continue;
                }
                self.marks.insert(id, mark);
                if entry.mode.is_tree() {
                    self.stack.push(id);
                } else if mark == Mark::Sent {
                    let location = self
                        .db
                        .location_by_oid(&id, &mut self.location_buf)
                        .map_err(Self::read_err("locating blob", id))?;
                    if location.is_none() && !self.db.contains(&id) {
                        return Err(Error::Missing(id));
                    }
                    self.plan.counts.push(Count::from_data(id, location));
                    self.plan.stats.blobs += 1;
                }
            }
        }
        Ok(())
    }
}
