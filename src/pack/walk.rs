//! Commit traversal: the commits reachable from some tips and not from hidden commits, with
//! shallow grafts (commits whose parents are not followed) and an optional age cut-off.
//!
//! This is git's `limit_list()`: a queue ordered by commit time, "uninteresting" painted down
//! from the hidden commits, and the walk ends once only uninteresting commits are queued. gix's
//! `rev_walk` cannot stop at grafts that are not the repository's own shallow boundary, which
//! shallow clients need.

use std::collections::BinaryHeap;
use std::sync::atomic::AtomicBool;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::commit::ref_iter::Token;
use gix::objs::{CommitRefIter, Kind};
use gix::ObjectId;
use gix_pack::data::entry::Location;
use gix_pack::Find;
use smallvec::SmallVec;

use super::{Db, Error};

/// A commit as the walk knows it.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Parents, empty for a root commit or a graft.
    pub parents: SmallVec<[ObjectId; 2]>,
    /// Committer time, seconds since the epoch.
    pub time: i64,
    /// Root tree.
    pub tree: ObjectId,
    /// Where the commit is packed, if it is and the walk asked for it ([`Commits::locating`]).
    pub location: Option<Location>,
}

/// Loads and remembers commits, applying grafts.
pub struct Commits<'a> {
    db: &'a Db,
    /// The repository's commit-graph, consulted before the object database.
    graph: Option<std::sync::Arc<gix::commitgraph::Graph>>,
    /// Whether commits read from the graph need their pack location (which costs as much as
    /// reading the commit: gix inflates the entry to learn its packed size).
    locate: bool,
    grafts: HashSet<ObjectId>,
    cache: HashMap<ObjectId, Commit>,
    buf: Vec<u8>,
}

impl<'a> Commits<'a> {
    /// Read commits from `db` (through its commit-graph where that has them), treating every
    /// commit in `grafts` as parentless.
    pub fn new(db: &'a Db, grafts: HashSet<ObjectId>) -> Self {
        Commits {
            graph: super::graph::open(db),
            ..Self::without_graph(db)
        }
        .with_grafts(grafts)
    }

    /// Read commits from the objects only: for writing a commit-graph, and for measuring what
    /// the graph saves.
    pub fn without_graph(db: &'a Db) -> Self {
        Commits {
            db,
            graph: None,
            locate: false,
            grafts: HashSet::default(),
            cache: HashMap::default(),
            buf: Vec::new(),
        }
    }

    fn with_grafts(mut self, grafts: HashSet<ObjectId>) -> Self {
        self.grafts = grafts;
        self
    }

    /// Give every commit its pack location, as pack generation needs; walks that only decide
    /// reachability (negotiation, shallow boundaries) go without and then read the commit-graph
    /// alone.
    pub fn locating(mut self) -> Self {
        self.locate = true;
        self
    }

    /// The commit `id`, loaded on first use. A missing object or one that is not a commit is
    /// an error.
    pub fn get(&mut self, id: ObjectId) -> Result<&Commit, Error> {
        if !self.cache.contains_key(&id) {
            let commit = self.load(id)?;
            self.cache.insert(id, commit);
        }
        Ok(&self.cache[&id])
    }

    /// Follow `id` through annotated tags; the commit it ends at, or `None` for a tree or blob.
    pub fn peel_to_commit(&mut self, id: ObjectId) -> Result<Option<ObjectId>, Error> {
        // What the commit-graph lists is a commit: nothing to inflate.
        if self.cache.contains_key(&id)
            || self
                .graph
                .as_ref()
                .is_some_and(|graph| graph.commit_by_id(id).is_some())
        {
            return Ok(Some(id));
        }
        let mut id = id;
        loop {
            let (data, location) = super::find(self.db, &mut self.buf, id, "reading object")?;
            match data.kind {
                Kind::Tag => id = super::tag_target(id, data.data)?,
                // Read now, and kept: the caller walks it next.
                Kind::Commit => {
                    let commit = parse(id, data.data, location)?;
                    if !self.cache.contains_key(&id) {
                        let commit = self.grafted(id, commit);
                        self.cache.insert(id, commit);
                    }
                    return Ok(Some(id));
                }
                Kind::Tree | Kind::Blob => return Ok(None),
            }
        }
    }

    /// `commit` as the grafts make it.
    fn grafted(&self, id: ObjectId, mut commit: Commit) -> Commit {
        if self.grafts.contains(&id) {
            commit.parents.clear();
        }
        commit
    }

    fn load(&mut self, id: ObjectId) -> Result<Commit, Error> {
        let commit = match self.read_graph(id)? {
            Some(commit) => commit,
            None => self.read_object(id)?,
        };
        Ok(self.grafted(id, commit))
    }

    /// The commit as the commit-graph has it, with its pack location looked up in the index.
    fn read_graph(&mut self, id: ObjectId) -> Result<Option<Commit>, Error> {
        let Some(graph) = &self.graph else {
            return Ok(None);
        };
        let Some(found) = graph.commit_by_id(id) else {
            return Ok(None);
        };
        let mut parents = SmallVec::new();
        for parent in found.iter_parents() {
            let position = parent.map_err(|e| Error::Read {
                context: "reading the commit-graph at",
                id,
                source: e.into(),
            })?;
            parents.push(graph.id_at(position).to_owned());
        }
        let time = i64::try_from(found.committer_timestamp()).unwrap_or(i64::MAX);
        let tree = found.root_tree_id().to_owned();
        if !self.locate {
            return Ok(Some(Commit {
                parents,
                time,
                tree,
                location: None,
            }));
        }
        // A loose commit (or one the graph lists but the mirror lost) is read the slow way,
        // which also reports it missing.
        let location = self
            .db
            .location_by_oid(&id, &mut self.buf)
            .map_err(|e| Error::Read {
                context: "locating commit",
                id,
                source: e.into(),
            })?;
        Ok(location.map(|location| Commit {
            parents,
            time,
            tree,
            location: Some(location),
        }))
    }

    fn read_object(&mut self, id: ObjectId) -> Result<Commit, Error> {
        let (data, location) = super::find_kind(self.db, &mut self.buf, id, Kind::Commit)?;
        parse(id, data.data, location)
    }
}

/// Commit `id` from its object's `data`, packed at `location`.
fn parse(id: ObjectId, data: &[u8], location: Option<Location>) -> Result<Commit, Error> {
    let mut commit = Commit {
        parents: SmallVec::new(),
        time: 0,
        tree: id.kind().null(),
        location,
    };
    for token in CommitRefIter::from_bytes(data, id.kind()) {
        let token = token.map_err(|e| Error::Read {
            context: "decoding commit",
            id,
            source: e.into(),
        })?;
        match token {
            Token::Tree { id } => commit.tree = id,
            Token::Parent { id } => commit.parents.push(id),
            Token::Committer { signature } => {
                commit.time = signature.seconds();
                break;
            }
            _ => {}
        }
    }
    Ok(commit)
}

/// What [`walk()`] found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Interesting commits, newest first (as popped from the date queue).
    pub commits: Vec<ObjectId>,
    /// Uninteresting parents of interesting commits: what the client is known to have right
    /// below what it is sent.
    pub boundary: Vec<ObjectId>,
}

const SEEN: u8 = 1;
const UNINTERESTING: u8 = 2;
const PROCESSED: u8 = 4;

/// How many uninteresting commits older than the last interesting one the walk still takes
/// (git's `SLOP`).
const SLOP: usize = 5;

/// Walk from `tips`, hiding everything reachable from `hidden`; commits older than `min_time`
/// count as hidden too (`deepen-since`). Commits are loaded through `commits`, which applies
/// grafts.
pub fn walk(
    commits: &mut Commits<'_>,
    tips: &[ObjectId],
    hidden: &[ObjectId],
    min_time: Option<i64>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let mut w = Walker {
        commits,
        flags: HashMap::default(),
        queue: BinaryHeap::new(),
        seq: 0,
        interesting_queued: 0,
    };
    for id in hidden {
        w.push(*id, UNINTERESTING)?;
    }
    for id in tips {
        w.push(*id, 0)?;
    }
    let mut result = Vec::new();
    let mut popped = 0usize;
    // Committer dates can lie (clock skew): like git's `still_interesting()`, the walk goes on
    // past the last interesting commit while queued commits are newer than it, and then for
    // `SLOP` more, so that a skewed uninteresting commit still paints what lies below it.
    let mut last_interesting = i64::MAX;
    let mut slop = SLOP;
    loop {
        if w.interesting_queued == 0 {
            match w.queue.peek() {
                None => break,
                // Queued commits newer than the last interesting one: not closing in yet.
                Some(top) if top.time >= last_interesting => slop = SLOP,
                Some(_) => {
                    slop -= 1;
                    if slop == 0 {
                        break;
                    }
                }
            }
        }
        let Some(Entry { id, time, .. }) = w.queue.pop() else {
            break;
        };
        popped += 1;
        super::check_interrupt(interrupt, popped)?;
        let mut flags = w.flags[&id];
        if flags & UNINTERESTING == 0 {
            w.interesting_queued -= 1;
            if let Some(min) = min_time {
                if w.commits.get(id)?.time < min {
                    flags |= UNINTERESTING;
                }
            }
        }
        w.flags.insert(id, flags | PROCESSED);
        let parents = w.commits.get(id)?.parents.clone();
        if flags & UNINTERESTING != 0 {
            for p in parents {
                w.mark_uninteresting(p)?;
            }
        } else {
            last_interesting = time;
            result.push(id);
            for p in parents {
                w.push(p, 0)?;
            }
        }
    }
    let mut out = Outcome::default();
    let mut boundary = HashSet::default();
    for id in result {
        if w.flags[&id] & UNINTERESTING != 0 {
            continue;
        }
        out.commits.push(id);
        for p in &w.commits.get(id)?.parents {
            if w.flags.get(p).is_some_and(|f| f & UNINTERESTING != 0) && boundary.insert(*p) {
                out.boundary.push(*p);
            }
        }
    }
    Ok(out)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    time: i64,
    /// Newer insertions sort lower, so that equal times pop in insertion order.
    seq: std::cmp::Reverse<u64>,
    id: ObjectId,
}

struct Walker<'w, 'a> {
    commits: &'w mut Commits<'a>,
    flags: HashMap<ObjectId, u8>,
    queue: BinaryHeap<Entry>,
    seq: u64,
    /// Queued commits not (yet) known to be uninteresting; the walk ends at zero.
    interesting_queued: usize,
}

impl Walker<'_, '_> {
    /// Queue `id` if it was never queued; `flags` may carry `UNINTERESTING`.
    fn push(&mut self, id: ObjectId, flags: u8) -> Result<(), Error> {
        if self.flags.contains_key(&id) {
            if flags & UNINTERESTING != 0 {
                self.mark_uninteresting(id)?;
            }
            return Ok(());
        }
        let time = self.commits.get(id)?.time;
        self.flags.insert(id, SEEN | flags);
        if flags & UNINTERESTING == 0 {
            self.interesting_queued += 1;
        }
        self.seq += 1;
        self.queue.push(Entry {
            time,
            seq: std::cmp::Reverse(self.seq),
            id,
        });
        Ok(())
    }

    /// Paint `id` and, through commits already processed, their ancestry uninteresting;
    /// unseen commits are queued as uninteresting to continue the painting when popped.
    fn mark_uninteresting(&mut self, id: ObjectId) -> Result<(), Error> {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            match self.flags.get(&id).copied() {
                None => self.push(id, UNINTERESTING)?,
                Some(f) if f & UNINTERESTING != 0 => {}
                Some(f) => {
                    self.flags.insert(id, f | UNINTERESTING);
                    if f & PROCESSED == 0 {
                        // Still queued as interesting.
                        self.interesting_queued -= 1;
                    } else {
                        stack.extend(self.commits.get(id)?.parents.iter().copied());
                    }
                }
            }
        }
        Ok(())
    }
}
