//! Idle mirrors cost almost no memory: beyond `SNAPSHOT_MEMORY`, the snapshots of the mirrors
//! requested least recently are dropped, and such a mirror is served again, from a snapshot
//! built anew, on its next request. Start-up builds only the snapshots that fit.

use crate::common;

use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use common::*;
use smart_git_proxy::repo::Snapshot;

#[test]
fn a_mirror_whose_snapshot_was_dropped_is_built_again_and_served() {
    let Proxied { server, up } = Scenario::new()
        .fixture("o/a", "basic")
        .fixture("o/b", "basic")
        .config(|c| {
            c.sync_stale_after = Duration::from_secs(1).into();
            c.snapshot_memory = ByteSize::b(1);
        })
        .start();
    let upstream_a = up.repo_dir("o/a");
    let (url_a, url_b) = (
        server.url_for(&up.segment(), "o/a"),
        server.url_for(&up.segment(), "o/b"),
    );
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--mirror", &url_a, "first"]);
    // A maintained mirror: its bitmap answers the v0 want check below.
    let mirror_a = server.mirror.path().join(up.segment()).join("o/a.git");
    assert!(maintain_now(&mirror_a).bitmap_commits > 0);
    git(work.path(), &["ls-remote", &url_a]);
    git(work.path(), &["ls-remote", &url_b]);

    // Both idle longer than SYNC_STALE_AFTER; b is requested again, a is not. The least
    // recently requested goes first: a, then perhaps b (when the machine is slow enough for
    // b's request to be older than SYNC_STALE_AFTER by now).
    std::thread::sleep(Duration::from_millis(1500));
    git(work.path(), &["ls-remote", &url_b]);
    let usage = server.state.mirrors().trim_snapshots();
    assert!(usage.snapshots <= 1, "{usage:?}");
    assert!(!server.state.mirrors().holds_snapshot(&mirror_a));
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_snapshots ")
            && metrics.contains("smart_git_proxy_snapshot_bytes "),
        "{metrics}"
    );

    for v in PROTOCOLS {
        let p = proto(v);
        let dir = format!("c{v}");
        git(
            work.path(),
            &args(&["clone", "-q", "--mirror", &url_a, &dir], &p),
        );
        let c = work.path().join(&dir);
        assert_fsck(&c);
        assert_eq!(refs(&c), refs(&upstream_a), "v{v}");
        // A want that is no ref's tip: checked against what the refs reach.
        let deep = git(&upstream_a, &["rev-parse", "main~3"]);
        let init = work.path().join(format!("w{v}"));
        git(work.path(), &["init", "-q", &format!("w{v}")]);
        git(&init, &args(&["fetch", "-q", &url_a, deep.trim()], &p));
        assert_fsck(&init.join(".git"));
    }
    assert!(server.state.mirrors().holds_snapshot(&mirror_a));
}

#[test]
fn a_snapshot_requested_within_sync_stale_after_is_kept() {
    let server = Server::start_with(|c| {
        c.sync_stale_after = Duration::from_secs(3600).into();
        c.snapshot_memory = ByteSize::b(1);
    });
    let url = server.serve_fixture("basic");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["ls-remote", &url]);
    let usage = server.state.mirrors().trim_snapshots();
    assert_eq!(usage.snapshots, 1, "{usage:?}");
    assert!(usage.bytes > 1);
    assert!(server
        .state
        .mirrors()
        .holds_snapshot(&server.repo_dir("basic")));
}

/// `count` copies of fixture `basic` as mirrors under `root`.
fn mirrors(root: &Path, count: usize) {
    for i in 0..count {
        let dir = root.join(HOST).join(format!("o/r{i}.git"));
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let src = fixture("basic");
        git(
            root,
            &[
                "clone",
                "-q",
                "--mirror",
                &src.display().to_string(),
                &dir.display().to_string(),
            ],
        );
    }
}

#[test]
fn start_up_builds_the_snapshots_that_fit() {
    let root = tempfile::tempdir().unwrap();
    mirrors(root.path(), 3);
    let one = Snapshot::open(&root.path().join(HOST).join("o/r0.git"), None)
        .unwrap()
        .heap_bytes() as u64;
    // r2 was served last, r1 before it, r0 never.
    for (i, served) in [(1, 1_700_000_000_000u64), (2, 1_800_000_000_000)] {
        let record = format!("{{\"last_serve_ms\":{served}}}");
        std::fs::write(
            root.path()
                .join(HOST)
                .join(format!("o/r{i}.git/smart-git-proxy-state")),
            record,
        )
        .unwrap();
    }
    let server = Server::start_in(root, move |c| c.snapshot_memory = ByteSize::b(one * 5 / 2));
    assert_eq!(server.state.mirrors().load_all(), 2);
    assert_eq!(server.state.mirrors().trim_snapshots().snapshots, 2);
    let held = |i: usize| {
        let dir = server.mirror.path().join(HOST).join(format!("o/r{i}.git"));
        server.state.mirrors().holds_snapshot(&dir)
    };
    assert!(held(2) && held(1) && !held(0));
    // The third is built on its first request.
    let work = tempfile::tempdir().unwrap();
    for i in 0..3 {
        git(
            work.path(),
            &[
                "clone",
                "-q",
                "--mirror",
                &server.url(&format!("o/r{i}")),
                &format!("c{i}"),
            ],
        );
        assert_fsck(&work.path().join(format!("c{i}")));
    }

    let root = server.stop();
    let server = Server::start_in(root, |c| c.snapshot_memory = ByteSize::b(1));
    assert_eq!(server.state.mirrors().load_all(), 0);
    let ls = git(work.path(), &["ls-remote", &server.url("o/r1")]);
    assert!(ls.contains("refs/heads/main"), "{ls}");
}
