//! Partial clones (`--filter`) through the server, checked against stock git serving the same
//! repository with `uploadpack.allowFilter`: the same objects arrive, lazy fetches by object id
//! work, and every result passes `git fsck --strict`. Protocol v2 and v0.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

struct Served {
    _server: Server,
    _dir: tempfile::TempDir,
    served: PathBuf,
    url: String,
    direct: String,
}

fn served() -> Served {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("basic.git");
    build_fixture("basic", &served);
    git(&served, &["config", "uploadpack.allowFilter", "true"]);
    git(
        &served,
        &["config", "uploadpack.allowAnySHA1InWant", "true"],
    );
    let url = server.link("basic", &served);
    let direct = format!("file://{}", served.display());
    Served {
        _server: server,
        _dir: dir,
        served,
        url,
        direct,
    }
}

/// Every object present in a repository.
fn present(git_dir: &Path) -> String {
    git(
        git_dir,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype)",
        ],
    )
}

/// Objects of a repository's refs that are missing locally (the promised ones).
fn missing(git_dir: &Path) -> usize {
    git(
        git_dir,
        &["rev-list", "--objects", "--all", "--missing=print"],
    )
    .lines()
    .filter(|l| l.starts_with('?'))
    .count()
}

fn clone_both(s: &Served, work: &Path, version: &str, flags: &[&str]) -> (PathBuf, PathBuf) {
    let p = proto(version);
    let (ours, theirs) = (work.join("ours"), work.join("theirs"));
    for (url, dest) in [(&s.url, &ours), (&s.direct, &theirs)] {
        let mut a = vec!["clone", "-q", "--bare"];
        a.extend_from_slice(flags);
        a.push(url);
        a.push(dest.to_str().unwrap());
        git(work, &args(&a, &p));
    }
    (ours, theirs)
}

#[test]
fn filters_send_what_stock_git_sends() {
    let s = served();
    let specs = [
        "blob:none",
        "blob:limit=1k",
        "blob:limit=0",
        "tree:0",
        "tree:1",
        "tree:2",
        "object:type=commit",
        "object:type=blob",
        "combine:blob:none+tree:2",
        "combine:tree:3+blob:limit=500",
    ];
    for v in PROTOCOLS {
        for spec in specs {
            let work = tempfile::tempdir().unwrap();
            let filter = format!("--filter={spec}");
            let (ours, theirs) = clone_both(&s, work.path(), v, &[&filter]);
            assert_eq!(present(&ours), present(&theirs), "v{v} {spec}: objects");
            assert_eq!(refs(&ours), refs(&theirs), "v{v} {spec}: refs");
            assert_fsck(&ours);
        }
    }
}

#[test]
fn blobless_clone_then_lazy_fetches_on_checkout() {
    let s = served();
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let p = proto(v);
        // The lazy fetches inherit protocol.version from the repository's configuration.
        git(
            work.path(),
            &args(
                &[
                    "clone",
                    "-q",
                    "--no-checkout",
                    "--filter=blob:none",
                    &s.url,
                    "c",
                ],
                &p,
            ),
        );
        let c = work.path().join("c");
        git(&c, &["config", "protocol.version", v]);
        let before = missing(&c.join(".git"));
        assert!(before > 0, "v{v}: blobs are left out");
        git(&c, &["checkout", "-q", "main"]);
        assert!(
            missing(&c.join(".git")) < before,
            "v{v}: checkout fetched blobs by id"
        );
        git(&c, &["log", "-p", "-3", "--", "src"]);
        assert_fsck(&c.join(".git"));
        assert_eq!(
            git(&c, &["rev-parse", "HEAD^{tree}"]),
            git(&s.served, &["rev-parse", "main^{tree}"])
        );
        // A tree-less clone: trees are fetched lazily too.
        git(
            work.path(),
            &args(&["clone", "-q", "--filter=tree:0", &s.url, "t"], &p),
        );
        let t = work.path().join("t");
        git(&t, &["config", "protocol.version", v]);
        git(&t, &["log", "-q", "--stat", "-2"]);
        assert_fsck(&t.join(".git"));
    }
}

#[test]
fn wanted_objects_are_sent_even_when_filtered() {
    let s = served();
    let blob = git(&s.served, &["rev-parse", "main:src/mod0.rs"]);
    let blob = blob.trim();
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(
            work.path(),
            &args(
                &["clone", "-q", "--bare", "--filter=blob:none", &s.url, "c"],
                &proto(v),
            ),
        );
        let c = work.path().join("c");
        assert!(
            git_output(&c, &["cat-file", "-e", blob], &[("GIT_NO_LAZY_FETCH", "1")])
                .status
                .code()
                != Some(0)
        );
        // The explicit fetch of one blob still carries the promisor filter.
        git(
            &c,
            &args(
                &["fetch", "-q", "--filter=blob:none", "origin", blob],
                &proto(v),
            ),
        );
        git(&c, &["cat-file", "-e", blob]);
        assert_fsck(&c);
    }
}

#[test]
fn unsupported_filters_are_refused_with_a_clear_message() {
    let s = served();
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let out = git_output(
            work.path(),
            &args(
                &["clone", "--filter=sparse:oid=main:.sparse", &s.url, "c"],
                &proto(v),
            ),
            &[],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("filter 'sparse:oid=main:.sparse' is not supported"),
            "v{v}: {stderr}"
        );
    }
}
