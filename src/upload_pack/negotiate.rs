//! Server-side negotiation state: which haves are common, and when we have enough of them to
//! stop ("ready"). Mirrors git's `upload-pack.c` (`got_oid`, `ok_to_give_up`).

use gix::hashtable::{HashMap, HashSet};
use gix::objs::{FindHeader, Kind};
use gix::ObjectId;

use super::Error;
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
pub struct Negotiator<'r> {
    repo: &'r gix::Repository,
    commits: Commits<'r>,
    wants: &'r [ObjectId],
    /// Objects the client has: acknowledged haves and the parents of commit haves.
    they_have: HashSet<ObjectId>,
    /// Acknowledged haves, in order: the uninteresting side of the pack.
    common: Vec<ObjectId>,
    /// The committer time of the oldest commit have; no need to look below it.
    oldest_have: Option<i64>,
    /// `ok_to_give_up` for the current `they_have`, invalidated when it grows.
    ready: Option<bool>,
    /// Commits known to reach nothing the client has (for the current `they_have`), and
    /// commits known to reach something it has: many wants over the same history then cost
    /// about one traversal, not one each.
    no_reach: HashSet<ObjectId>,
    reaches: HashSet<ObjectId>,
}

impl<'r> Negotiator<'r> {
    /// Start negotiating for `wants` on `repo`, reading commits through `db`.
    pub fn new(repo: &'r gix::Repository, db: &'r Db, wants: &'r [ObjectId]) -> Self {
        Negotiator {
            repo,
            commits: Commits::new(db, HashSet::default()),
            wants,
            they_have: HashSet::default(),
            common: Vec::new(),
            oldest_have: None,
            ready: None,
            no_reach: HashSet::default(),
            reaches: HashSet::default(),
        }
    }

    /// The haves acknowledged so far.
    pub fn common(&self) -> &[ObjectId] {
        &self.common
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
            let (parents, time) = self.commit(id)?;
            if self.oldest_have.is_none_or(|t| time < t) {
                // Older commits are now worth exploring: forget what was ruled out.
                self.oldest_have = Some(time);
                self.ready = None;
                self.no_reach.clear();
            }
            for p in parents {
                if self.they_have.insert(p) {
                    self.ready = None;
                    self.no_reach.clear();
                }
            }
        }
        if !self.they_have.insert(id) {
            return Ok(Have::Common { new: false });
        }
        self.ready = None;
        self.no_reach.clear();
        self.common.push(id);
        Ok(Have::Common { new: true })
    }

    /// Whether every want reaches something the client has, so that a pack can be made now.
    pub fn ok_to_give_up(&mut self) -> Result<bool, Error> {
        if self.common.is_empty() {
            return Ok(false);
        }
        if let Some(ready) = self.ready {
            return Ok(ready);
        }
        let mut ready = true;
        let mut checked = HashSet::default();
        for want in self.wants {
            if checked.insert(*want) && !self.reaches_common(*want)? {
                ready = false;
                break;
            }
        }
        self.ready = Some(ready);
        Ok(ready)
    }

    /// Whether `want` (peeled) is a commit with an ancestor the client has. Non-commits count
    /// as reachable: ancestry cannot tell, and git does not wait for them either.
    fn reaches_common(&mut self, want: ObjectId) -> Result<bool, Error> {
        let Some(start) = self.commits.peel_to_commit(want)? else {
            return Ok(true);
        };
        let min_time = self.oldest_have.unwrap_or(i64::MIN);
        // Each visited commit with the child it was reached from, to mark the found path.
        let mut seen: HashMap<ObjectId, Option<ObjectId>> = HashMap::default();
        let mut stack = vec![start];
        seen.insert(start, None);
        while let Some(id) = stack.pop() {
            if self.they_have.contains(&id) || self.reaches.contains(&id) {
                let mut at = Some(id);
                while let Some(c) = at {
                    self.reaches.insert(c);
                    at = seen.get(&c).copied().flatten();
                }
                return Ok(true);
            }
            if self.no_reach.contains(&id) {
                continue;
            }
            let (parents, time) = self.commit(id)?;
            if time < min_time {
                continue;
            }
            for p in parents {
                if !seen.contains_key(&p) {
                    seen.insert(p, Some(id));
                    stack.push(p);
                }
            }
        }
        // Nothing below any of these reaches the client's commits either.
        self.no_reach.extend(seen.into_keys());
        Ok(false)
    }

    /// Parents and committer time of a commit.
    fn commit(&mut self, id: ObjectId) -> Result<(Vec<ObjectId>, i64), Error> {
        let commit = self.commits.get(id)?;
        Ok((commit.parents.to_vec(), commit.time))
    }
}
