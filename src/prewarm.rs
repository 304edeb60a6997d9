//! Prewarming: when a sync moves a branch that CI is about to check out, the pack that
//! `actions/checkout` will ask for is generated into the pack cache in the background, so that
//! the first job after a push is a cache hit instead of the one that pays for the pack.
//!
//! The request stood in for is [`CHECKOUT_REQUEST`]: what git 2.47 sends for `git -c
//! protocol.version=2 fetch --no-tags --prune --no-recurse-submodules --depth=1 origin
//! +SHA:refs/remotes/origin/BRANCH` in an empty repository. It is parsed and resolved by
//! upload-pack itself ([`upload_pack::prefill_v2`]), so the entry is stored under exactly the
//! key that request looks up. Requests that resolve differently (a filter, `include-tag`, haves,
//! no `thin-pack`, another depth) have other keys; `docs/internals.md` (Prewarming) lists them.
//!
//! Bounds: at most one prewarm per mirror at a time (a sync meanwhile replaces the one queued
//! behind it), each holding one of the server's pack slots (`MAX_CONCURRENT_PACKS`), at most
//! [`MAX_REFS`] refs per sync; none when the cache is off or takes no new pack (low disk). Each
//! outcome is counted in `smart_git_proxy_prewarm_total{result}`.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::bstr::{BStr, BString, ByteSlice};
use gix::ObjectId;
use tokio::sync::Semaphore;

use crate::mirror::{Lease, Synced};
use crate::pack::cache::PackCache;
use crate::protocol::{pktline, v2};
use crate::repo::Snapshot;
use crate::upload_pack;

/// The pkt-lines of the fetch git 2.47 sends for `actions/checkout`'s `--depth=1` fetch of one
/// commit into an empty repository (recorded with `GIT_TRACE_PACKET`), `{sha}` standing for
/// the commit; `0001` is the delimiter, `0000` the flush. With `--progress` (checkout's
/// `show-progress`, on by default) git leaves out `no-progress`, which does not change the pack.
pub const CHECKOUT_REQUEST: &[&str] = &[
    "command=fetch",
    "agent=git/2.47.3",
    "object-format=sha1",
    "0001",
    "thin-pack",
    "no-progress",
    "ofs-delta",
    "deepen 1",
    "want {sha}",
    "done",
    "0000",
];

/// Refs prewarmed per sync at most; a push of many matching branches at once prewarms the
/// first ones (by name) and counts the others as `limit`.
pub const MAX_REFS: usize = 8;

/// Every value of the metric's `result` label.
pub const RESULTS: &[&str] = &[
    "generated",
    "cached",
    "superseded",
    "cache-off",
    "no-room",
    "limit",
    "failed",
];

/// The refs whose moves are prewarmed (`PREWARM_REFS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refs {
    /// The branch `HEAD` points to.
    head: bool,
    /// Globs of full ref names (`*` stops at `/`, `**` does not).
    globs: Vec<BString>,
}

/// A `PREWARM_REFS` entry that cannot name refs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PREWARM_REFS entry '{0}' is not a ref name glob (no spaces, control characters, '~', '^', ':' or '\\')")]
pub struct Error(String);

impl Refs {
    /// Parse a comma-separated list: `HEAD` (the branch `HEAD` points to), or globs of ref
    /// names; a glob without `refs/` is a branch name (`release/*` is `refs/heads/release/*`).
    /// An empty list prewarms nothing.
    pub fn parse(list: &str) -> Result<Refs, Error> {
        let mut refs = Refs::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let forbidden = |c: char| c.is_control() || c.is_whitespace() || "~^:\\".contains(c);
            if entry.contains(forbidden) {
                return Err(Error(entry.into()));
            }
            if entry == "HEAD" {
                refs.head = true;
            } else if entry.starts_with("refs/") {
                refs.globs.push(entry.into());
            } else {
                refs.globs.push(format!("refs/heads/{entry}").into());
            }
        }
        Ok(refs)
    }

    /// Whether no ref is prewarmed.
    pub fn is_empty(&self) -> bool {
        !self.head && self.globs.is_empty()
    }

    fn matches(&self, name: &BStr, head: Option<&BStr>) -> bool {
        (self.head && head == Some(name))
            || self.globs.iter().any(|glob| {
                gix::glob::wildmatch(
                    glob.as_bstr(),
                    name,
                    gix::glob::wildmatch::Mode::NO_MATCH_SLASH_LITERAL,
                )
            })
    }

    /// The commits of the matching refs that `after` has and `before` had elsewhere (or not
    /// at all), without repeats, in ref-name order; at most [`MAX_REFS`], and how many more
    /// there were. An annotated tag stands for the commit it points to.
    pub fn moved(&self, before: &Snapshot, after: &Snapshot) -> (Vec<ObjectId>, usize) {
        let refs = &after.refs().refs;
        let head = refs
            .first()
            .filter(|r| r.name == "HEAD")
            .and_then(|r| r.symref_target.as_ref())
            .map(|t| t.as_bstr());
        let mut out: Vec<ObjectId> = Vec::new();
        let mut more = 0;
        let candidates = refs.iter().filter(|r| r.name != "HEAD");
        for r in candidates.filter(|r| self.matches(r.name.as_bstr(), head)) {
            if before.find_ref(&r.name).map(|b| b.target) == Some(r.target) {
                continue;
            }
            let commit = r.peeled.unwrap_or(r.target);
            if out.contains(&commit) {
                continue;
            }
            if out.len() == MAX_REFS {
                more += 1;
            } else {
                out.push(commit);
            }
        }
        (out, more)
    }
}

/// The fetch of [`CHECKOUT_REQUEST`] for `commit`, parsed as a client's would be.
pub fn checkout_request(commit: &ObjectId) -> Result<v2::Fetch, crate::protocol::Error> {
    let mut body = Vec::new();
    for line in CHECKOUT_REQUEST {
        match *line {
            "0000" => pktline::flush(&mut body),
            "0001" => pktline::delim(&mut body),
            line => pktline::text(&mut body, &line.replace("{sha}", &commit.to_string())),
        }
    }
    match v2::parse(&body)? {
        Some(v2::Request {
            command: v2::Command::Fetch(fetch),
            ..
        }) => Ok(fetch),
        _ => Err(crate::protocol::Error::Protocol(
            "the checkout request is not a fetch".into(),
        )),
    }
}

/// Settings of the prewarmer.
pub struct Settings {
    /// `PREWARM_REFS`
    pub refs: Refs,
    /// The pack cache, `None` when it is off.
    pub cache: Option<PackCache>,
    /// How packs are made (the same as for clients: the compression level is part of the key).
    pub options: upload_pack::Options,
    /// The server's pack-generation slots, shared with clients.
    pub pack_slots: Arc<Semaphore>,
}

/// Runs prewarms in the background. Cheap to clone.
#[derive(Clone)]
pub struct Prewarmer {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    /// Mirrors with a prewarm under way, and the prewarm queued behind it.
    busy: parking_lot::Mutex<HashMap<PathBuf, Option<Job>>>,
}

/// One mirror's prewarm: the commits to prewarm in its snapshot.
struct Job {
    name: String,
    snapshot: Arc<Snapshot>,
    commits: Vec<ObjectId>,
    _lease: Lease,
}

impl Prewarmer {
    /// A prewarmer; give [`Prewarmer::synced`] to [`crate::mirror::Mirrors::on_sync`].
    pub fn new(settings: Settings) -> Prewarmer {
        // Every result is exported from the start, so that a rate over one is 0, not empty.
        for result in RESULTS {
            crate::metrics::prewarm(result, 0);
        }
        Prewarmer {
            inner: Arc::new(Inner {
                settings,
                busy: Default::default(),
            }),
        }
    }

    /// A sync changed a mirror: prewarm the refs it moved, in the background. Call on the
    /// runtime.
    pub fn synced(&self, synced: Synced) {
        let settings = &self.inner.settings;
        if settings.refs.is_empty() {
            return;
        }
        let (commits, more) = settings.refs.moved(&synced.before, &synced.after);
        count("limit", more);
        if commits.is_empty() {
            return;
        }
        let Some(cache) = &settings.cache else {
            return count("cache-off", commits.len());
        };
        if !cache.has_room() {
            return count("no-room", commits.len());
        }
        let job = Job {
            name: synced.name,
            snapshot: synced.after,
            commits,
            _lease: synced.lease,
        };
        match self.inner.busy.lock().entry(synced.dir.clone()) {
            Entry::Occupied(mut queued) => {
                if let Some(old) = queued.get_mut().replace(job) {
                    count("superseded", old.commits.len());
                }
            }
            Entry::Vacant(idle) => {
                idle.insert(None);
                tokio::spawn(run(Arc::clone(&self.inner), synced.dir, job));
            }
        }
    }
}

/// Run `job` and then, until none is left, the job queued for the same mirror meanwhile.
async fn run(inner: Arc<Inner>, dir: PathBuf, mut job: Job) {
    loop {
        let slot = Arc::clone(&inner.settings.pack_slots).acquire_owned().await;
        let commits = job.commits.len();
        let worker = Arc::clone(&inner);
        let done = match slot {
            Ok(slot) => {
                tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    prewarm(&worker.settings, &job)
                })
                .await
            }
            // Shutting down.
            Err(_) => Ok(Vec::new()),
        };
        match done {
            Ok(results) => results.into_iter().for_each(|r| count(r, 1)),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "prewarm stopped");
                count("failed", commits);
            }
        }
        let mut busy = inner.busy.lock();
        match busy.get_mut(&dir).and_then(Option::take) {
            Some(next) => job = next,
            None => {
                busy.remove(&dir);
                return;
            }
        }
    }
}

/// Put the checkout pack of each of `job`'s commits into the cache; the metric result of each.
fn prewarm(settings: &Settings, job: &Job) -> Vec<&'static str> {
    let Some(cache) = &settings.cache else {
        return vec!["cache-off"; job.commits.len()];
    };
    let repo = job.snapshot.repo();
    let db = crate::pack::db(&repo);
    let interrupt = AtomicBool::new(false);
    let limits = upload_pack::Limits::default();
    let ctx = upload_pack::Context {
        snapshot: &job.snapshot,
        repo: &repo,
        db: &db,
        interrupt: &interrupt,
        limits: &limits,
        options: settings.options,
        cache: Some((cache, &job.name)),
        pack_slot: std::cell::Cell::new(None),
        preamble_sent: false,
    };
    let mut results = Vec::with_capacity(job.commits.len());
    for commit in &job.commits {
        let started = std::time::Instant::now();
        let outcome = checkout_request(commit)
            .map_err(upload_pack::Error::Request)
            .and_then(|fetch| upload_pack::prefill_v2(&ctx, &fetch));
        let result = match outcome {
            Ok(upload_pack::Prefill::Generated { objects }) => {
                tracing::info!(repo = %job.name, %commit, objects, duration = ?started.elapsed(), "prewarmed the checkout pack");
                "generated"
            }
            Ok(upload_pack::Prefill::Present) => "cached",
            Ok(upload_pack::Prefill::NoRoom) => "no-room",
            Err(e) => {
                tracing::warn!(repo = %job.name, %commit, error = %crate::error_chain(&e), "prewarm failed");
                "failed"
            }
        };
        results.push(result);
    }
    results
}

fn count(result: &'static str, n: usize) {
    if n > 0 {
        crate::metrics::prewarm(result, n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prewarm_refs_are_head_and_globs_of_full_names() {
        let refs = Refs::parse("HEAD, release/*,refs/tags/v*,,").unwrap();
        assert!(refs.head);
        assert_eq!(refs.globs, ["refs/heads/release/*", "refs/tags/v*"]);
        let head = Some(BStr::new("refs/heads/main"));
        let matches = |name: &str| refs.matches(name.into(), head);
        assert!(matches("refs/heads/main"));
        assert!(matches("refs/heads/release/1.0"));
        assert!(!matches("refs/heads/release/1.0/hotfix"), "* stops at /");
        assert!(matches("refs/tags/v1.2"));
        assert!(!matches("refs/heads/topic"));
        assert!(!matches("refs/pull/1/head"));
        let deep = Refs::parse("refs/pull/**").unwrap();
        assert!(deep.matches("refs/pull/1/merge".into(), None));
        let merges = Refs::parse("refs/pull/*/merge").unwrap();
        assert!(merges.matches("refs/pull/12/merge".into(), None));
        assert!(!merges.matches("refs/pull/12/head".into(), None));
        assert!(Refs::parse("").unwrap().is_empty());
        assert!(Refs::parse(" , ").unwrap().is_empty());
        for bad in ["a b", "main~1", "x:y", "a\\b", "a\u{7}"] {
            assert_eq!(Refs::parse(bad), Err(Error(bad.into())), "{bad}");
        }
    }

    #[test]
    fn the_checkout_request_parses_as_git_sends_it() {
        let commit = ObjectId::from_hex(b"a620d8e555c055c52b9063ef829b9e7d5533ab87").unwrap();
        let fetch = checkout_request(&commit).unwrap();
        assert_eq!(fetch.wants, [commit]);
        assert!(fetch.done && fetch.thin_pack && fetch.ofs_delta && fetch.no_progress);
        assert!(!fetch.include_tag && fetch.haves.is_empty() && fetch.filter.is_none());
        assert_eq!(fetch.deepen.depth, Some(1));
    }
}
