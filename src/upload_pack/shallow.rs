//! Shallow fetches: the new shallow boundary for `deepen`, `deepen-since`, `deepen-not` and
//! `deepen-relative`, and what changes for the pack. Follows git's `upload-pack.c` (`deepen`,
//! `deepen_by_rev_list`, `send_unshallow`) and `shallow.c` (`get_shallow_commits*`).

use std::sync::atomic::AtomicBool;

use gix::bstr::{BStr, ByteSlice};
use gix::hashtable::{HashMap, HashSet};
use gix::objs::{FindHeader, Kind};
use gix::ObjectId;

use super::Error;
use crate::pack::walk::{self, Commits};
use crate::pack::Db;
use crate::protocol::advert::Refs;
use crate::protocol::{Deepen, INFINITE_DEPTH};

/// The shallow part of an answer and of the pack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shallow {
    /// `shallow <oid>` lines: commits that become the client's boundary.
    pub shallow: Vec<ObjectId>,
    /// `unshallow <oid>` lines: client boundary commits whose history is now sent.
    pub unshallow: Vec<ObjectId>,
    /// Commits whose parents the pack walk must not cross: the new boundary and every shallow
    /// commit the client named.
    pub grafts: Vec<ObjectId>,
    /// Parents of unshallowed commits: wanted in addition to the client's wants.
    pub extra_wants: Vec<ObjectId>,
    /// Unshallowed commits: the client has them.
    pub extra_haves: Vec<ObjectId>,
}

/// Compute the shallow boundary for `deepen` with `wants` (already validated) on a repository
/// whose refs are `refs`.
pub fn compute(
    db: &Db,
    refs: &Refs,
    wants: &[ObjectId],
    deepen: &Deepen,
    interrupt: &AtomicBool,
) -> Result<Shallow, Error> {
    let mut commits = Commits::new(db, HashSet::default());

    // The client's boundary; objects we do not have are ignored, as git does.
    let mut client = Vec::new();
    let mut client_set = HashSet::default();
    for (i, id) in deepen.shallows.iter().enumerate() {
        crate::pack::check_interrupt(interrupt, i + 1)?;
        match db
            .try_header(id)
            .map_err(Error::git("reading a shallow commit"))?
        {
            None => continue,
            Some(h) if h.kind != Kind::Commit => {
                return Err(Error::Protocol(format!("invalid shallow object {id}")));
            }
            Some(_) => {
                if client_set.insert(*id) {
                    client.push(*id);
                }
            }
        }
    }
    if !deepen.deepens() {
        return Ok(Shallow {
            grafts: client,
            ..Default::default()
        });
    }

    let want_commits = peel_all(&mut commits, wants)?;
    let (candidates, not_shallow) = match deepen.depth {
        Some(depth) if depth >= INFINITE_DEPTH => (Vec::new(), client_set.clone()),
        Some(depth) if deepen.relative => {
            by_depth(&mut commits, &client, depth.saturating_add(1), interrupt)?
        }
        Some(depth) => by_depth(&mut commits, &want_commits, depth, interrupt)?,
        None => {
            let mut hidden = Vec::new();
            for name in &deepen.not {
                let id = expand_ref(refs, name.as_ref())?;
                hidden.extend(peel_all(&mut commits, &[id])?);
            }
            by_rev_list(
                &mut commits,
                &want_commits,
                &hidden,
                deepen.since,
                interrupt,
            )?
        }
    };

    let mut out = Shallow::default();
    for id in candidates {
        if !client_set.contains(&id) && !not_shallow.contains(&id) {
            out.shallow.push(id);
        }
    }
    for id in &client {
        if not_shallow.contains(id) {
            out.unshallow.push(*id);
            out.extra_haves.push(*id);
            out.extra_wants
                .extend(commits.get(*id)?.parents.iter().copied());
        }
    }
    out.grafts = out.shallow.iter().chain(client.iter()).copied().collect();
    Ok(out)
}

fn peel_all(commits: &mut Commits<'_>, ids: &[ObjectId]) -> Result<Vec<ObjectId>, Error> {
    let mut out = Vec::new();
    for id in ids {
        if let Some(c) = commits.peel_to_commit(*id)? {
            out.push(c);
        }
    }
    Ok(out)
}

/// git's `get_shallow_commits()`: walk `heads` depth-first, remembering the smallest depth each
/// commit was reached at; commits at `depth` are the boundary, all above are not shallow.
fn by_depth(
    commits: &mut Commits<'_>,
    heads: &[ObjectId],
    depth: u32,
    interrupt: &AtomicBool,
) -> Result<(Vec<ObjectId>, HashSet<ObjectId>), Error> {
    let mut depths: HashMap<ObjectId, u32> = HashMap::default();
    let mut result = Vec::new();
    let mut not_shallow = HashSet::default();
    let mut stack: Vec<ObjectId> = Vec::new();
    let mut heads = heads.iter();
    let mut current: Option<(ObjectId, u32)> = None;
    let mut visits = 0usize;
    loop {
        let (id, mut cur_depth) = match current.take() {
            Some(c) => c,
            None => match heads.next() {
                Some(head) => {
                    depths.insert(*head, 0);
                    (*head, 0)
                }
                None => match stack.pop() {
                    Some(id) => (id, depths[&id]),
                    None => break,
                },
            },
        };
        // A commit is visited again when reached by a shorter path: the count is of visits.
        visits += 1;
        crate::pack::check_interrupt(interrupt, visits)?;
        cur_depth += 1;
        if cur_depth >= depth {
            result.push(id);
            continue;
        }
        not_shallow.insert(id);
        let parents = commits.get(id)?.parents.clone();
        let last = parents.len().saturating_sub(1);
        for (i, p) in parents.into_iter().enumerate() {
            match depths.get(&p) {
                Some(d) if cur_depth >= *d => continue,
                _ => {
                    depths.insert(p, cur_depth);
                }
            }
            if i < last {
                stack.push(p);
            } else {
                current = Some((p, cur_depth));
            }
        }
    }
    Ok((result, not_shallow))
}

/// git's `get_shallow_commits_by_rev_list()`: the commits of `rev-list --max-age=<since>
/// <wants> --not <hidden>` are not shallow, except those with a parent outside that set, which
/// form the boundary.
fn by_rev_list(
    commits: &mut Commits<'_>,
    wants: &[ObjectId],
    hidden: &[ObjectId],
    since: Option<i64>,
    interrupt: &AtomicBool,
) -> Result<(Vec<ObjectId>, HashSet<ObjectId>), Error> {
    let walked = walk::walk(commits, wants, hidden, since, interrupt)?;
    if walked.commits.is_empty() {
        return Err(Error::Protocol(
            "no commits selected for shallow requests".into(),
        ));
    }
    let mut not_shallow: HashSet<ObjectId> = walked.commits.iter().copied().collect();
    let mut border = Vec::new();
    for id in &walked.commits {
        if commits
            .get(*id)?
            .parents
            .iter()
            .any(|p| !not_shallow.contains(p))
        {
            border.push(*id);
        }
    }
    for id in &border {
        not_shallow.remove(id);
    }
    Ok((border, not_shallow))
}

/// Resolve a `deepen-not` argument the way git's `expand_ref()` does: as given, then under
/// `refs/`, `refs/tags/`, `refs/heads/`, `refs/remotes/` and `refs/remotes/<name>/HEAD`.
fn expand_ref(refs: &Refs, name: &BStr) -> Result<ObjectId, Error> {
    let candidates = [
        name.to_owned(),
        [b"refs/".as_slice(), name].concat().into(),
        [b"refs/tags/".as_slice(), name].concat().into(),
        [b"refs/heads/".as_slice(), name].concat().into(),
        [b"refs/remotes/".as_slice(), name].concat().into(),
        [b"refs/remotes/".as_slice(), name, b"/HEAD"]
            .concat()
            .into(),
    ];
    let mut found: Vec<ObjectId> = Vec::new();
    let mut names: Vec<&BStr> = Vec::new();
    for candidate in &candidates {
        if let Some(r) = refs.refs.iter().find(|r| r.name == *candidate) {
            if !names.contains(&r.name.as_bstr()) {
                names.push(r.name.as_bstr());
                found.push(r.target);
            }
        }
    }
    match found.as_slice() {
        [id] => Ok(*id),
        [] => Err(Error::Protocol(format!(
            "git upload-pack: deepen-not is not a ref: deepen-not {name}"
        ))),
        _ => Err(Error::Protocol(format!(
            "git upload-pack: ambiguous deepen-not: deepen-not {name}"
        ))),
    }
}
