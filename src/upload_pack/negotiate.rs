//! Server-side negotiation state: which haves are common, and when we have enough of them to
//! stop ("ready"). Mirrors git's `upload-pack.c` (`got_oid`, `ok_to_give_up`).

use std::collections::BinaryHeap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::{FindHeader, Kind};
use gix::ObjectId;
use smallvec::SmallVec;

use super::Error;
use crate::pack::bitmap;
use crate::pack::walk::Commits;
use crate::pack::Db;

/// What a `have` line told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Have {
    /// We do not have the object.
    Missing,
    /// We have it; `new` is false when it was already known to be on the client (it is a
    /// parent of an earlier have).
    Common {
        /// Whether this have added to what we know of the client.
        new: bool,
    },
}

/// The state of one negotiation (one stateless request).
///
/// Readiness is kept incrementally, so that a request costs one traversal of the history
/// above its oldest have, however its haves are ordered: the commits reachable from the wants
/// are discovered once, each with the children it was reached from, and a commit found to
/// reach something the client has marks its descendants once. git gets the same bound from
/// commit flags that persist across `ok_to_give_up()` calls.
pub struct Negotiator<'r> {
    repo: &'r gix::Repository,
    commits: Commits<'r>,
    wants: &'r [ObjectId],
    interrupt: &'r AtomicBool,
    /// Objects the client has: acknowledged haves and the parents of commit haves.
    they_have: HashSet<ObjectId>,
    /// Acknowledged haves, in order: the uninteresting side of the pack.
    common: Vec<ObjectId>,
    /// The committer time of the oldest commit have; no need to look below it.
    oldest_have: Option<i64>,
    /// How many of the wants (peeled to commits, distinct) do not reach the client's commits
    /// yet; `None` until readiness is first asked for.
    wants_left: Option<usize>,
    /// Commits reachable from the wants, discovered so far.
    graph: HashMap<ObjectId, Node>,
    /// Discovered commits whose parents are not discovered yet, newest first; those older than
    /// the oldest have wait until an older have arrives.
    pending: BinaryHeap<(i64, ObjectId)>,
    /// Haves recorded since readiness was last computed.
    new_haves: Vec<ObjectId>,
    /// Commits whose parents were read, over the whole negotiation.
    expanded: usize,
    /// The repository's reachability bitmap, if any.
    bitmap: Option<&'r Arc<bitmap::Index>>,
    /// The wants (peeled to commits) that have a bitmap and do not reach the client's commits
    /// yet, with what they reach: a have is checked against them without walking.
    want_bits: Vec<(ObjectId, bitmap::Bits)>,
}

/// A commit reachable from the wants.
#[derive(Default)]
struct Node {
    /// The discovered commits it is a parent of.
    children: SmallVec<[ObjectId; 1]>,
    /// Whether it reaches a commit the client has.
    reaches: bool,
    /// Whether it is a want.
    want: bool,
}

impl<'r> Negotiator<'r> {
    /// Start negotiating for `wants` on `repo`, reading commits through `db`; `interrupt` stops
    /// the traversal (a client that went away).
    pub fn new(
        repo: &'r gix::Repository,
        db: &'r Db,
        wants: &'r [ObjectId],
        interrupt: &'r AtomicBool,
    ) -> Self {
        Negotiator {
            repo,
            commits: Commits::new(db, HashSet::default()),
            wants,
            interrupt,
            they_have: HashSet::default(),
            common: Vec::new(),
            oldest_have: None,
            wants_left: None,
            graph: HashMap::default(),
            pending: BinaryHeap::new(),
            new_haves: Vec::new(),
            expanded: 0,
            bitmap: None,
            want_bits: Vec::new(),
        }
    }

    /// Use the reachability bitmap `index` (when there is one) to tell whether a want reaches
    /// a have: for wants with a bitmap, a lookup instead of a walk down to the have.
    pub fn with_bitmap(mut self, index: Option<&'r Arc<bitmap::Index>>) -> Self {
        self.bitmap = index;
        self
    }

    /// The haves acknowledged so far.
    pub fn common(&self) -> &[ObjectId] {
        &self.common
    }

    /// How many commits the readiness checks expanded (read the parents of), in all: at most
    /// the commits reachable from the wants, however many haves there were.
    pub fn expanded(&self) -> usize {
        self.expanded
    }

    /// Record a `have`.
    pub fn have(&mut self, id: ObjectId) -> Result<Have, Error> {
        let Some(header) = self
            .repo
            .objects
            .try_header(&id)
            .map_err(Error::git("reading a have"))?
        else {
            return Ok(Have::Missing);
        };
        if header.kind == Kind::Commit {
            let commit = self.commits.get(id)?;
            let (parents, time) = (commit.parents.clone(), commit.time);
            if self.oldest_have.is_none_or(|t| time < t) {
                self.oldest_have = Some(time);
            }
            for p in parents {
                if self.they_have.insert(p) {
                    self.new_haves.push(p);
                }
            }
        }
        if !self.they_have.insert(id) {
            return Ok(Have::Common { new: false });
        }
        self.new_haves.push(id);
        self.common.push(id);
        Ok(Have::Common { new: true })
    }

    /// Whether every want reaches something the client has, so that a pack can be made now.
    pub fn ok_to_give_up(&mut self) -> Result<bool, Error> {
        if self.common.is_empty() {
            return Ok(false);
        }
        if self.wants_left.is_none() {
            self.wants_left = Some(0);
            for want in self.wants {
                // Non-commits count as reachable: ancestry cannot tell, and git does not wait
                // for them either.
                if let Some(commit) = self.commits.peel_to_commit(*want)? {
                    if let Some(bits) = self.bitmap.and_then(|b| b.commit_bits(&commit)) {
                        self.want_bits.push((commit, bits));
                    }
                    self.discover(commit, None)?;
                    if let Some(node) = self.graph.get_mut(&commit) {
                        if !node.want && !node.reaches {
                            node.want = true;
                            self.wants_left = self.wants_left.map(|n| n + 1);
                        }
                    }
                }
            }
        }
        let mut reached = Vec::new();
        for id in std::mem::take(&mut self.new_haves) {
            if self.graph.contains_key(&id) {
                self.mark_reaches(id);
            }
            // Commits only, as git's ok_to_give_up() counts them.
            let commit_position = self.bitmap.and_then(|b| {
                let pos = b.objects().position(&id)?;
                (b.kind(pos) == Some(Kind::Commit)).then_some(pos)
            });
            if let Some(pos) = commit_position {
                self.want_bits.retain(|(want, bits)| {
                    let hit = bits.get(pos);
                    if hit {
                        reached.push(*want);
                    }
                    !hit
                });
            }
        }
        for want in reached {
            self.mark_reaches(want);
        }
        let min_time = self.oldest_have.unwrap_or(i64::MIN);
        while self.wants_left.is_some_and(|n| n > 0) {
            match self.pending.peek() {
                Some(&(time, _)) if time >= min_time => {}
                _ => return Ok(false),
            }
            let Some((_, id)) = self.pending.pop() else {
                return Ok(false);
            };
            self.expanded += 1;
            crate::pack::check_interrupt(self.interrupt, self.expanded)?;
            if self.graph.get(&id).is_some_and(|n| n.reaches) {
                // Its descendants are marked already; its ancestry cannot add anything.
                continue;
            }
            let parents = self.commits.get(id)?.parents.clone();
            for p in parents {
                self.discover(p, Some(id))?;
            }
        }
        Ok(true)
    }

    /// Add `id` to the graph as a parent of `child`, queueing it to be expanded when it is new.
    fn discover(&mut self, id: ObjectId, child: Option<ObjectId>) -> Result<(), Error> {
        let reaches = match self.graph.get_mut(&id) {
            Some(node) => {
                node.children.extend(child);
                node.reaches
            }
            None => {
                let time = self.commits.get(id)?.time;
                self.graph.insert(
                    id,
                    Node {
                        children: child.into_iter().collect(),
                        reaches: false,
                        want: false,
                    },
                );
                if self.they_have.contains(&id) {
                    self.mark_reaches(id);
                } else {
                    self.pending.push((time, id));
                }
                return Ok(());
            }
        };
        if let (true, Some(child)) = (reaches, child) {
            self.mark_reaches(child);
        }
        Ok(())
    }

    /// Mark `id` and its discovered descendants as reaching the client's commits: each commit
    /// is marked once per negotiation.
    fn mark_reaches(&mut self, id: ObjectId) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            if let Some(node) = self.graph.get_mut(&id) {
                if !node.reaches {
                    node.reaches = true;
                    if node.want {
                        self.wants_left = self.wants_left.map(|n| n.saturating_sub(1));
                    }
                    stack.extend(node.children.iter().copied());
                }
            }
        }
    }
}
