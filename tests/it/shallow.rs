//! Shallow clones and fetches through the server, checked against stock git (`file://`, the
//! same repository, the same commands): the shallow boundary, the refs and the objects must be
//! the same, and every result must pass `git fsck --strict`. Protocol v2 and v0.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

/// A served copy of `basic` plus the same repository reachable with `file://` (stock
/// upload-pack), so that every operation can be run against both and compared.
struct Pair {
    _server: Server,
    _dir: tempfile::TempDir,
    served: PathBuf,
    url: String,
    direct: String,
    work: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let server = Server::start();
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("basic.git");
        build_fixture("basic", &served);
        let url = server.link("basic", &served);
        let direct = format!("file://{}", served.display());
        Pair {
            _server: server,
            _dir: dir,
            served,
            url,
            direct,
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn ours(&self) -> PathBuf {
        self.work.path().join("ours")
    }

    fn theirs(&self) -> PathBuf {
        self.work.path().join("theirs")
    }

    /// Run `git <args>` in both clones (or, for `clone`, into both), with `{url}` replaced by
    /// the clone's source.
    fn both(&self, version: &str, args_: &[&str]) {
        let p = proto(version);
        for (dir, url) in [(self.ours(), &self.url), (self.theirs(), &self.direct)] {
            let a: Vec<String> = args_
                .iter()
                .map(|a| {
                    a.replace("{url}", url)
                        .replace("{dest}", dir.to_str().unwrap())
                })
                .collect();
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let cwd = if args_[0] == "clone" {
                self.work.path().to_path_buf()
            } else {
                dir.clone()
            };
            git(&cwd, &args(&a, &p));
        }
    }

    /// Both clones have the same shallow boundary, refs and objects, and pass fsck.
    fn same(&self, what: &str) {
        let (ours, theirs) = (git_dir(&self.ours()), git_dir(&self.theirs()));
        assert_fsck(&ours);
        assert_eq!(
            shallow_file(&ours),
            shallow_file(&theirs),
            "{what}: shallow boundary"
        );
        assert_eq!(
            refs(&ours).replace(&self.url, "URL"),
            refs(&theirs).replace(&self.direct, "URL"),
            "{what}: refs"
        );
        assert_eq!(objects(&ours), objects(&theirs), "{what}: objects");
    }
}

fn git_dir(clone: &Path) -> PathBuf {
    let dot_git = clone.join(".git");
    if dot_git.is_dir() {
        dot_git
    } else {
        clone.to_path_buf()
    }
}

fn shallow_file(git_dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(git_dir.join("shallow"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// Every object in the repository, sorted.
pub fn objects(git_dir: &Path) -> String {
    git(
        git_dir,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype)",
        ],
    )
}

#[test]
fn depth_one_clone() {
    for v in PROTOCOLS {
        let pair = Pair::new();
        pair.both(v, &["clone", "-q", "--depth=1", "{url}", "{dest}"]);
        pair.same(&format!("v{v} --depth=1"));
        assert_eq!(
            shallow_file(&git_dir(&pair.ours())).len(),
            1,
            "only main's tip is shallow"
        );
        let b = pair.work.path().join("bare");
        git(
            pair.work.path(),
            &args(
                &[
                    "clone",
                    "-q",
                    "--bare",
                    "--depth=1",
                    "--no-single-branch",
                    &pair.url,
                    b.to_str().unwrap(),
                ],
                &proto(v),
            ),
        );
        assert_fsck(&b);
    }
}

#[test]
fn deepen_then_unshallow() {
    for v in PROTOCOLS {
        let pair = Pair::new();
        pair.both(
            v,
            &[
                "clone",
                "-q",
                "--depth=3",
                "--no-single-branch",
                "{url}",
                "{dest}",
            ],
        );
        pair.same(&format!("v{v} --depth=3 all branches"));
        pair.both(v, &["fetch", "-q", "--deepen=2"]);
        pair.same(&format!("v{v} --deepen=2"));
        pair.both(v, &["fetch", "-q", "--depth=10"]);
        pair.same(&format!("v{v} --depth=10"));
        pair.both(v, &["fetch", "-q", "--unshallow"]);
        pair.same(&format!("v{v} --unshallow"));
        assert!(shallow_file(&git_dir(&pair.ours())).is_empty());
    }
}

#[test]
fn shallow_since_and_exclude() {
    for v in PROTOCOLS {
        let pair = Pair::new();
        // The fixture's commits are an hour apart from 2023-11-14 22:13 UTC on.
        pair.both(
            v,
            &[
                "clone",
                "-q",
                "--shallow-since=1700060000",
                "{url}",
                "{dest}",
            ],
        );
        pair.same(&format!("v{v} --shallow-since"));
        let pair = Pair::new();
        pair.both(
            v,
            &[
                "clone",
                "-q",
                "--shallow-exclude=v1.0",
                "--branch",
                "feature/a",
                "{url}",
                "{dest}",
            ],
        );
        pair.same(&format!("v{v} --shallow-exclude=v1.0"));
        pair.both(
            v,
            &["fetch", "-q", "--shallow-exclude=light-1", "origin", "main"],
        );
        pair.same(&format!("v{v} fetch --shallow-exclude"));
    }
}

#[test]
fn shallow_requests_that_cannot_be_served_are_explained() {
    let pair = Pair::new();
    for v in PROTOCOLS {
        let out = git_output(
            pair.work.path(),
            &args(
                &[
                    "clone",
                    "--shallow-exclude=no-such-ref",
                    &pair.url,
                    &format!("x{v}"),
                ],
                &proto(v),
            ),
            &[],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("deepen-not is not a ref"), "v{v}: {stderr}");
        let out = git_output(
            pair.work.path(),
            &args(
                &[
                    "clone",
                    "--shallow-since=4000000000",
                    &pair.url,
                    &format!("y{v}"),
                ],
                &proto(v),
            ),
            &[],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("no commits selected for shallow requests"),
            "v{v}: {stderr}"
        );
    }
}

#[test]
fn fetch_into_a_shallow_clone_after_upstream_commits() {
    for v in PROTOCOLS {
        let pair = Pair::new();
        pair.both(v, &["clone", "-q", "--depth=2", "{url}", "{dest}"]);
        // New upstream history on main (through a scratch clone and a push).
        let scratch = pair.work.path().join("scratch");
        git(
            pair.work.path(),
            &["clone", "-q", &pair.direct, scratch.to_str().unwrap()],
        );
        for i in 0..3 {
            std::fs::write(scratch.join(format!("new{i}")), "x").unwrap();
            git(&scratch, &["add", "-A"]);
            git(&scratch, &["commit", "-q", "-m", &format!("new {i}")]);
        }
        git(&scratch, &["push", "-q", "origin", "HEAD:main"]);
        pair.both(v, &["fetch", "-q", "origin"]);
        pair.same(&format!("v{v} fetch into shallow"));
        pair.both(v, &["pull", "-q", "--ff-only", "origin", "main"]);
        assert_eq!(
            git(&pair.ours(), &["rev-parse", "HEAD"]),
            git(&pair.served, &["rev-parse", "main"])
        );
    }
}

#[test]
fn actions_checkout_fetches_a_sha_at_depth_one() {
    let pair = Pair::new();
    let sha = git(&pair.served, &["rev-parse", "feature/b"]);
    let sha = sha.trim();
    for v in ["2", "0"] {
        let work = tempfile::tempdir().unwrap();
        let repo = work.path();
        git(repo, &["init", "-q"]);
        git(repo, &["remote", "add", "origin", &pair.url]);
        git(repo, &["config", "--local", "gc.auto", "0"]);
        let trace = repo.join("trace");
        let out = actions_checkout_fetch(
            repo,
            v,
            sha,
            "refs/remotes/origin/feature/b",
            &[("GIT_TRACE_PACKET", trace.to_str().unwrap())],
        );
        assert!(
            out.status.success(),
            "v{v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if v == "2" {
            let trace = std::fs::read_to_string(&trace).unwrap();
            assert!(
                !trace.contains("command=ls-refs"),
                "actions/checkout's fetch skips ls-refs"
            );
        }
        git(
            repo,
            &[
                "checkout",
                "-q",
                "--force",
                "-B",
                "feature/b",
                "refs/remotes/origin/feature/b",
            ],
        );
        assert_fsck(&repo.join(".git"));
        assert_eq!(git(repo, &["rev-parse", "HEAD"]).trim(), sha);
        assert_eq!(shallow_file(&repo.join(".git")), vec![sha.to_owned()]);
    }
}
