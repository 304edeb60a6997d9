//! Mirroring from a real upstream (`git http-backend` behind a test server): creation, hits,
//! syncs, want-miss, pruning, HEAD changes, singleflight, failures. Protocol v2 and v0.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::upstream::{Mode, Upstream};
use common::*;

/// A proxy in front of `up`, syncing when older than `stale_after`. The upstream timeouts
/// stay at their generous defaults: the test upstream sends nothing until `git http-backend`
/// has finished, which on a loaded machine can take seconds.
fn proxy(up: &Upstream, stale_after: Duration) -> Server {
    Server::in_front_of(up, move |c| {
        c.sync_stale_after = stale_after.into();
    })
}

fn status_of(server: &Server, up: &Upstream, name: &str) -> (u16, Option<String>) {
    let r = request(
        server.addr,
        "GET",
        &format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment()),
        &[],
        b"",
    );
    (r.status, r.header("x-git-proxy-status"))
}

/// Upstream commits on `branch` of the bare repository `dir`, through a scratch clone.
fn push_commits(dir: &Path, branch: &str, n: usize) -> String {
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(work.path(), &["clone", "-q", "--branch", branch, &src, "w"]);
    let w = work.path().join("w");
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for i in 0..n {
        std::fs::write(w.join(format!("pushed-{unique}-{i}")), format!("{i}\n")).unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", &format!("pushed {i}")]);
    }
    git(&w, &["push", "-q", "origin", &format!("HEAD:{branch}")]);
    git(&w, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// How many times the proxy connected to the upstream (each fetch starts with one ref
/// advertisement request).
fn upstream_fetches(up: &Upstream) -> usize {
    up.log()
        .iter()
        .filter(|l| l.path.ends_with("/info/refs"))
        .count()
}

#[test]
fn first_clone_creates_the_mirror_and_the_second_is_a_hit() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("group/sub/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "group/sub/basic");
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(
            work.path(),
            &args(&["clone", "-q", "--mirror", &url, "c"], &proto(v)),
        );
        assert_fsck(&work.path().join("c"));
        assert_eq!(refs(&work.path().join("c")), refs(&upstream_dir), "v{v}");
    }
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("group/sub/basic.git");
    assert!(
        mirror.join("objects").is_dir(),
        "nested groups keep every segment"
    );
    assert_eq!(refs(&mirror), refs(&upstream_dir));
    assert_eq!(
        git(&mirror, &["symbolic-ref", "HEAD"]),
        git(&upstream_dir, &["symbolic-ref", "HEAD"])
    );
    // Only the first clone reached the upstream.
    assert_eq!(
        upstream_fetches(&up),
        1,
        "{:?}",
        up.log().iter().map(|l| &l.path).collect::<Vec<_>>()
    );
    assert_eq!(
        status_of(&server, &up, "group/sub/basic"),
        (200, Some("hit".into()))
    );
    assert_eq!(upstream_fetches(&up), 1);
}

#[test]
fn pushes_reach_clients_after_sync_stale_after() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_millis(200));
    let url = server.url_for(&up.segment(), "o/basic");
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &args(&["clone", "-q", &url, "c"], &proto(v)));
        let c = work.path().join("c");
        let pushed = push_commits(&upstream_dir, "main", 2);
        std::thread::sleep(Duration::from_millis(300));
        git(&c, &args(&["fetch", "-q", "origin"], &proto(v)));
        assert_eq!(
            git(&c, &["rev-parse", "origin/main"]).trim(),
            pushed,
            "v{v}"
        );
        assert_fsck(&c.join(".git"));
    }
}

#[test]
fn a_want_miss_syncs_then_serves() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    // Never stale: only the want-miss can bring the new commit.
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "o/basic");
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    for v in PROTOCOLS {
        let sha = push_commits(&upstream_dir, "feature/b", 1);
        let work = tempfile::tempdir().unwrap();
        let repo = work.path();
        git(repo, &["init", "-q"]);
        git(repo, &["remote", "add", "origin", &url]);
        // actions/checkout's exact fetch.
        let out = actions_checkout_fetch(repo, v, &sha, "refs/remotes/origin/feature/b", &[]);
        assert!(
            out.status.success(),
            "v{v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        assert_eq!(git(repo, &["rev-parse", "HEAD"]).trim(), sha, "v{v}");
        assert_fsck(&repo.join(".git"));
    }
    // A SHA the upstream does not have either: synced, still missing, refused.
    // With --depth the answer cannot start early: the refusal is an ERR packet.
    let (_work, out) = fetch_into_new_repo(
        &url,
        "1234567890123456789012345678901234567890",
        &["--depth=1"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "remote error: upload-pack: not our ref 1234567890123456789012345678901234567890"
        ),
        "{stderr}"
    );
}

#[test]
fn deleted_branches_and_default_branch_changes_reach_the_mirror() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_millis(100));
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    git(&upstream_dir, &["branch", "-D", "feature/a"]);
    git(
        &upstream_dir,
        &["symbolic-ref", "HEAD", "refs/heads/feature/b"],
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("sync".into()))
    );
    assert_eq!(refs(&mirror), refs(&upstream_dir));
    assert_eq!(
        git(&mirror, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/feature/b"
    );
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.url_for(&up.segment(), "o/basic"),
            "c",
        ],
    );
    assert_eq!(
        git(&work.path().join("c"), &["branch", "--show-current"]).trim(),
        "feature/b"
    );
}

#[test]
fn concurrent_first_clones_share_one_upstream_clone() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/large", "large");
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "o/large");
    let work = tempfile::tempdir().unwrap();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            let dest = work.path().join(format!("c{i}"));
            std::thread::spawn(move || {
                let out = git_output(
                    Path::new("/"),
                    &["clone", "-q", "--bare", &url, dest.to_str().unwrap()],
                    &[],
                );
                assert!(
                    out.status.success(),
                    "clone {i}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                dest
            })
        })
        .collect();
    for h in handles {
        let dest = h.join().unwrap();
        assert_fsck(&dest);
        assert_eq!(
            refs(&dest),
            git(
                &upstream_dir,
                &[
                    "for-each-ref",
                    "--format=%(objectname) %(refname)",
                    "refs/heads/",
                    "refs/tags/"
                ]
            )
        );
    }
    assert_eq!(upstream_fetches(&up), 1, "exactly one upstream clone");
}

#[test]
fn upstream_failures_serve_stale_mirrors_and_explain_cold_ones() {
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_millis(100));
    let url = server.url_for(&up.segment(), "o/basic");
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    std::thread::sleep(Duration::from_millis(200));
    up.set_mode(Mode::Fail);
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("stale".into()))
    );
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", &url, "c"]);
    assert_fsck(&work.path().join("c/.git"));

    // No mirror yet: a clear error git prints.
    up.add_fixture("o/cold", "basic");
    let out = git_output(
        work.path(),
        &["clone", &server.url_for(&up.segment(), "o/cold"), "cold"],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot mirror"), "{stderr}");

    // A stalled upstream is given up on after the stall timeout: a short one, on a proxy that
    // only ever meets the stalled upstream.
    let impatient = Server::in_front_of(&up, move |c| {
        c.upstream_stall_timeout = Duration::from_secs(1).into();
    });
    up.set_mode(Mode::Stall);
    up.add_fixture("o/stalled", "basic");
    let r = request(
        impatient.addr,
        "GET",
        &format!(
            "/{}/o/stalled/info/refs?service=git-upload-pack",
            up.segment()
        ),
        &[],
        b"",
    );
    assert_eq!(r.status, 502);
    assert!(r.text().contains("the upstream timed out"), "{}", r.text());
}

#[test]
fn an_upstream_cut_mid_clone_leaves_no_mirror_and_the_next_request_succeeds() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/large", "large");
    let server = proxy(&up, Duration::from_secs(3600));
    up.set_mode(Mode::CutPacksAfter(200_000));
    let (code, _) = status_of(&server, &up, "o/large");
    assert_eq!(code, 502);
    let host_dir = server.mirror.path().join(up.segment()).join("o");
    let left: Vec<_> = std::fs::read_dir(&host_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    up.set_mode(Mode::Normal);
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--bare",
            &server.url_for(&up.segment(), "o/large"),
            "c",
        ],
    );
    assert_fsck(&work.path().join("c"));
    assert_eq!(
        git(&work.path().join("c"), &["rev-parse", "main"]),
        git(&upstream_dir, &["rev-parse", "main"])
    );
}

#[test]
fn leftover_temporaries_are_removed_at_start_and_seeded_mirrors_adopted() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let mirror_root = tempfile::tempdir().unwrap();
    let host = mirror_root.path().join(up.segment()).join("o");
    std::fs::create_dir_all(host.join(".smart-git-proxy-tmp-basic.git-1-0/objects")).unwrap();
    // An operator's `git clone --mirror`.
    git(
        &host,
        &[
            "clone",
            "-q",
            "--mirror",
            &format!("file://{}", upstream_dir.display()),
            "basic.git",
        ],
    );
    let state = smart_git_proxy::http::AppState::new(
        smart_git_proxy::config::Config::new(mirror_root.path())
            .resolve()
            .unwrap(),
    );
    assert_eq!(state.mirrors().remove_temporaries().unwrap(), 1);
    assert!(!host.join(".smart-git-proxy-tmp-basic.git-1-0").exists());
    drop(state);
    let root = mirror_root.path().to_path_buf();
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.mirror_dir = root;
        c.allowed_upstreams = allowed;
        c.sync_stale_after = Duration::from_secs(3600).into();
    });
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("sync".into()))
    );
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.url_for(&up.segment(), "o/basic"),
            "c",
        ],
    );
    assert_fsck(&work.path().join("c/.git"));
}

#[test]
fn git_lfs_requests_pass_through_to_the_upstream() {
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    let batch =
        br#"{"operation":"download","transfers":["basic"],"objects":[{"oid":"abc","size":3}]}"#;
    let r = request(
        server.addr,
        "POST",
        &format!("/{}/o/basic.git/info/lfs/objects/batch?x=1", up.segment()),
        &[
            ("Accept", "application/vnd.git-lfs+json"),
            ("Content-Type", "application/vnd.git-lfs+json"),
            ("Authorization", "Bearer lfs-token"),
        ],
        batch,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/vnd.git-lfs+json")
    );
    assert_eq!(r.body, [b"lfs-echo POST ".as_slice(), batch].concat());
    let seen = up
        .log()
        .into_iter()
        .find(|l| l.path.contains("/info/lfs/"))
        .expect("reached the upstream");
    assert_eq!(seen.path, "/o/basic.git/info/lfs/objects/batch");
    assert_eq!(seen.query, "x=1");
    assert_eq!(seen.body, batch);
    assert_eq!(
        seen.headers.get("authorization").unwrap(),
        "Bearer lfs-token"
    );
    assert_eq!(
        seen.headers.get("accept").unwrap(),
        "application/vnd.git-lfs+json"
    );
    // Statuses pass through too.
    up.set_lfs_status(404);
    let r = request(
        server.addr,
        "GET",
        &format!("/{}/o/basic.git/info/lfs/locks", up.segment()),
        &[],
        b"",
    );
    assert_eq!(r.status, 404);
    assert!(
        !server
            .mirror
            .path()
            .join(up.segment())
            .join("o/basic.git")
            .exists(),
        "LFS alone creates no mirror"
    );
}

#[test]
fn a_mirror_that_keeps_gaining_packs_stays_servable() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    // Maintenance off, as an operator may choose: the packs pile up.
    let server = Server::in_front_of(&up, move |c| {
        c.sync_stale_after = Duration::from_millis(1).into();
        c.maintenance_pack_threshold = 0;
    });
    let url = server.url_for(&up.segment(), "o/basic");
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    // Every sync adds a pack: go well past gix's 32 initial pack slots.
    for i in 0..40 {
        let tree = git(&upstream_dir, &["rev-parse", "main^{tree}"]);
        let commit = git(
            &upstream_dir,
            &[
                "commit-tree",
                tree.trim(),
                "-p",
                "main",
                "-m",
                &format!("sync {i}"),
            ],
        );
        git(
            &upstream_dir,
            &["update-ref", "refs/heads/main", commit.trim()],
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            status_of(&server, &up, "o/basic"),
            (200, Some("sync".into())),
            "sync {i}"
        );
    }
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    let packs = std::fs::read_dir(mirror.join("objects/pack"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
        .count();
    assert!(packs > 40, "{packs} packs");
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &args(&["clone", "-q", &url, "c"], &proto(v)));
        assert_fsck(&work.path().join("c/.git"));
        assert_eq!(
            git(&work.path().join("c"), &["rev-parse", "HEAD"]),
            git(&upstream_dir, &["rev-parse", "main"])
        );
    }
}

#[test]
fn a_want_ref_for_a_new_branch_syncs_then_serves() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    git(&upstream_dir, &["branch", "brand-new", "feature/a"]);
    let line = |l: &str| format!("{:04x}{l}\n", l.len() + 5);
    let body = format!(
        "{}0001{}{}{}0000",
        line("command=fetch"),
        line("want-ref refs/heads/brand-new"),
        line("no-progress"),
        line("done")
    );
    let r = request(
        server.addr,
        "POST",
        &format!("/{}/o/basic/git-upload-pack", up.segment()),
        &[("Git-Protocol", "version=2")],
        body.as_bytes(),
    );
    let text = r.text();
    let expected = format!(
        "{} refs/heads/brand-new\n",
        git(&upstream_dir, &["rev-parse", "brand-new"]).trim()
    );
    assert!(text.contains(&expected), "{text}");
    assert_eq!(r.header("x-git-proxy-status").as_deref(), Some("sync"));
}

#[test]
fn an_empty_upstream_repository_is_mirrored() {
    let up = Upstream::start();
    up.add_fixture("o/empty", "empty");
    let server = proxy(&up, Duration::from_secs(3600));
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let out = git_output(
            work.path(),
            &args(
                &["clone", &server.url_for(&up.segment(), "o/empty"), "c"],
                &proto(v),
            ),
            &[],
        );
        assert!(
            out.status.success(),
            "v{v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("empty repository"));
    }
}

#[test]
fn a_want_miss_shows_progress_while_the_mirror_syncs() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "o/basic");
    assert_eq!(
        status_of(&server, &up, "o/basic").1.as_deref(),
        Some("clone")
    );
    for v in PROTOCOLS {
        let sha = push_commits(&upstream_dir, "main", 1);
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q"]);
        let out = git_output(
            work.path(),
            &args(&["fetch", "--progress", &url, &sha], &proto(v)),
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "v{v}: {stderr}");
        assert!(
            stderr.contains("remote: mirroring") && stderr.contains("o/basic: done in"),
            "v{v}: {stderr}"
        );
        assert_eq!(git(work.path(), &["rev-parse", "FETCH_HEAD"]).trim(), sha);
        assert_fsck(&work.path().join(".git"));
    }
    // Still missing after the sync: the reason arrives on band 3.
    let (_work, out) = fetch_into_new_repo(
        &url,
        "1234567890123456789012345678901234567890",
        &["--progress"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("remote: mirroring"),
        "the answer started early: {stderr}"
    );
    assert!(
        stderr.contains("upload-pack: not our ref 1234567890123456789012345678901234567890"),
        "{stderr}"
    );
}

/// The upload-pack POSTs the upstream received since log entry `from`: their v2 commands.
fn upstream_commands(up: &Upstream, from: usize) -> Vec<String> {
    up.log()[from..]
        .iter()
        .filter(|l| l.method == "POST")
        .map(|l| {
            let body = String::from_utf8_lossy(&l.body);
            if body.contains("command=ls-refs") {
                "ls-refs".to_owned()
            } else if body.contains("command=fetch") {
                format!("fetch({} wants)", body.matches("want ").count())
            } else {
                "other".to_owned()
            }
        })
        .collect()
}

/// A v2 `ls-refs` of `prefix` straight to the proxy (a POST: it never syncs), as `oid name` lines.
fn ls_refs(server: &Server, up: &Upstream, name: &str, prefix: &str) -> Vec<String> {
    let body = pkt(&[
        "command=ls-refs",
        "0001",
        &format!("ref-prefix {prefix}"),
        "0000",
    ]);
    let r = request(
        server.addr,
        "POST",
        &format!("/{}/{name}/git-upload-pack", up.segment()),
        &[("Git-Protocol", "version=2")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    pkt_payloads(&r.body)
        .iter()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
        .collect()
}

#[test]
fn a_sync_with_nothing_new_is_one_ref_listing_and_a_push_fetches_only_what_moved() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/many", "many-refs");
    let server = proxy(&up, Duration::ZERO);
    let url = server.url_for(&up.segment(), "o/many");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--mirror", &url, "c"]);
    let mirror = server.mirror.path().join(up.segment()).join("o/many.git");
    let packed_refs = std::fs::metadata(mirror.join("packed-refs"))
        .unwrap()
        .modified()
        .unwrap();

    // Nothing changed upstream: one request (a ref listing), no fetch, no ref written.
    let from = up.log().len();
    assert_eq!(
        status_of(&server, &up, "o/many"),
        (200, Some("sync".into()))
    );
    assert_eq!(upstream_commands(&up, from), ["ls-refs"]);
    assert_eq!(up.log().len() - from, 1, "a single round trip");
    assert_eq!(
        std::fs::metadata(mirror.join("packed-refs"))
            .unwrap()
            .modified()
            .unwrap(),
        packed_refs,
        "no ref transaction"
    );

    // One branch moved: only it is fetched (the second listing asks for it alone).
    let pushed = push_commits(&upstream_dir, "main", 1);
    let from = up.log().len();
    assert_eq!(
        status_of(&server, &up, "o/many"),
        (200, Some("sync".into()))
    );
    assert_eq!(
        upstream_commands(&up, from),
        ["ls-refs", "ls-refs", "fetch(1 wants)"]
    );
    let log = up.log();
    let second_listing = &log[from..]
        .iter()
        .filter(|l| l.method == "POST")
        .nth(1)
        .unwrap()
        .body;
    let prefixes = String::from_utf8_lossy(second_listing)
        .matches("ref-prefix ")
        .count();
    assert_eq!(prefixes, 1, "{}", String::from_utf8_lossy(second_listing));
    assert_eq!(git(&mirror, &["rev-parse", "main"]).trim(), pushed);
    assert_eq!(refs(&mirror), refs(&upstream_dir));
    assert_fsck(&mirror);
}

#[test]
fn a_sync_swaps_the_snapshot_that_the_next_request_reads() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "o/basic");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--bare", &url, "c"]);
    let before = git(&upstream_dir, &["rev-parse", "main"]).trim().to_owned();
    let pushed = push_commits(&upstream_dir, "main", 1);
    // Fresh mirror: requests read the snapshot, which still has the old branch.
    let main = |server: &Server| ls_refs(server, &up, "o/basic", "refs/heads/main");
    assert_eq!(main(&server), [format!("{before} refs/heads/main")]);
    // A want-miss syncs; the very next request, which does not sync, sees the new snapshot.
    let (_repo, out) = fetch_into_new_repo(&url, &pushed, &["--depth=1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(main(&server), [format!("{pushed} refs/heads/main")]);
}

#[test]
fn the_last_sync_time_survives_a_restart() {
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::from_secs(3600));
    let url = server.url_for(&up.segment(), "o/basic");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--bare", &url, "c"]);
    let mirror_dir = server.stop();
    let allowed = up.allowed();
    let server = Server::start_in(mirror_dir, move |c| {
        c.allowed_upstreams = allowed;
        c.sync_stale_after = Duration::from_secs(3600).into();
    });
    let from = up.log().len();
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("hit".into()))
    );
    let url = server.url_for(&up.segment(), "o/basic");
    git(work.path(), &["clone", "-q", "--bare", &url, "c2"]);
    assert_eq!(
        up.log().len(),
        from,
        "no upstream request after the restart"
    );
}

#[test]
fn an_upstream_that_speaks_only_v0_is_synced_with_a_handshake() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    up.set_mode(Mode::V0Only);
    let server = proxy(&up, Duration::ZERO);
    let url = server.url_for(&up.segment(), "o/basic");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--mirror", &url, "c"]);
    let pushed = push_commits(&upstream_dir, "main", 1);
    let from = up.log().len();
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("sync".into()))
    );
    assert!(
        up.log()[from..]
            .iter()
            .any(|l| l.path.ends_with("/info/refs")),
        "the one-request listing failed over to gix's handshake"
    );
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    assert_eq!(git(&mirror, &["rev-parse", "main"]).trim(), pushed);
    assert_eq!(refs(&mirror), refs(&upstream_dir));
}

#[test]
fn leftovers_of_an_interrupted_sync_are_removed_at_start_and_before_each_sync() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, Duration::ZERO);
    let url = server.url_for(&up.segment(), "o/basic");
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--bare", &url, "c"]);
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    // What `kill -9` in the middle of a sync leaves: a temporary pack and a ref lock.
    let plant = |path: &Path, old: bool| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = std::fs::File::create(path).unwrap();
        f.set_len(1 << 20).unwrap();
        if old {
            f.set_modified(hour_ago).unwrap();
        }
    };
    let tmp_pack = mirror.join("objects/pack/.tmpAbC123");
    let stale_lock = mirror.join("packed-refs.lock");
    let live_lock = mirror.join("refs/heads/someone-elses.lock");
    plant(&tmp_pack, false);
    plant(&stale_lock, true);
    plant(&live_lock, false);
    let pushed = push_commits(&upstream_dir, "main", 1);
    assert_eq!(
        status_of(&server, &up, "o/basic"),
        (200, Some("sync".into()))
    );
    assert_eq!(git(&mirror, &["rev-parse", "main"]).trim(), pushed);
    assert!(!tmp_pack.exists() && !stale_lock.exists());
    assert!(
        live_lock.exists(),
        "a fresh lock may belong to a running git: it stays"
    );
    assert_fsck(&mirror);

    // At start, at any depth.
    let mirror_dir = server.stop();
    let deep = mirror_dir
        .path()
        .join(up.segment())
        .join(
            (0..20)
                .map(|i| format!("g{i}"))
                .collect::<Vec<_>>()
                .join("/"),
        )
        .join("deep.git");
    std::fs::create_dir_all(deep.join("objects/pack")).unwrap();
    plant(&deep.join("objects/pack/.tmpXyZ"), false);
    plant(&tmp_pack, false);
    let state = smart_git_proxy::http::AppState::new(
        smart_git_proxy::config::Config::new(mirror_dir.path())
            .resolve()
            .unwrap(),
    );
    assert_eq!(state.mirrors().remove_temporaries().unwrap(), 2);
    assert!(!tmp_pack.exists() && !deep.join("objects/pack/.tmpXyZ").exists());
}

/// Issue 21 (3): the first clone of a repository whose upstream is slow shows progress while
/// the proxy creates the mirror. The refs come from the upstream's listing; the fetch is
/// answered at once, and `remote: mirroring …` lines arrive while the upstream still sends the
/// pack. Protocol v2 and v0, with `--progress` (side-band); two clones at once share the
/// creation, and both see its progress.
#[test]
fn a_first_clone_shows_progress_while_the_mirror_is_created() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("slow/basic", "basic");
    // The pack of `basic` comes in 1 KiB chunks, 150 ms apart: seconds, well beyond the time
    // the proxy waits for a creation before it answers from the upstream's listing.
    up.throttle("/slow/", 1024, Duration::from_millis(150));
    let allowed = up.allowed();
    for v in PROTOCOLS {
        // A proxy of its own per protocol: each clone is a first clone.
        let allowed = allowed.clone();
        let server = Server::start_with(move |c| c.allowed_upstreams = allowed);
        let url = server.url_for(&up.segment(), "slow/basic");
        let (started_before, sent_before) = up.throttled();
        let work = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut clones: Vec<_> = work
            .iter()
            .map(|w| clone_with_progress(w.path(), &url, v))
            .collect();
        // Both show progress before the upstream has sent the pack.
        let seen: Vec<Vec<u8>> = clones.iter_mut().map(until_progress).collect();
        assert_eq!(
            up.throttled().1,
            sent_before,
            "v{v}: the progress came after the upstream had sent the pack: {}",
            String::from_utf8_lossy(&seen.concat())
        );
        for ((clone, seen), work) in clones.into_iter().zip(seen).zip(&work) {
            let (stderr, ok) = finish(clone, seen);
            assert!(ok, "v{v}: {stderr}");
            assert!(
                stderr.contains("objects, ") && stderr.contains(" MiB"),
                "v{v}: the progress counts what arrived: {stderr}"
            );
            assert!(stderr.contains("slow/basic: done in"), "v{v}: {stderr}");
            let clone = work.path().join("c");
            assert_fsck(&clone);
            assert_eq!(refs(&clone), refs(&upstream_dir), "v{v}");
        }
        assert_eq!(
            up.throttled().0,
            started_before + 1,
            "v{v}: one creation, one pack from the upstream"
        );
    }
}

/// Issue 21 (3): a client that asked for no side-band waits for the creation as before, and
/// receives a plain pack.
#[test]
fn a_first_clone_without_side_band_waits_for_the_mirror() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("slow/basic", "basic");
    up.throttle("/slow/", 1024, Duration::from_millis(20));
    let server = proxy(&up, Duration::from_secs(3600));
    let head = git(&upstream_dir, &["rev-parse", "main"]);
    let want = format!("want {} multi_ack_detailed ofs-delta", head.trim());
    let body = pkt(&[&want, "0000", "done"]);
    let reply = request(
        server.addr,
        "POST",
        &format!("/{}/slow/basic/git-upload-pack", up.segment()),
        &[("Content-Type", "application/x-git-upload-pack-request")],
        &body,
    );
    assert_eq!(reply.status, 200);
    assert!(
        reply.body.starts_with(b"0008NAK\nPACK"),
        "{}",
        String::from_utf8_lossy(&reply.body[..reply.body.len().min(64)])
    );
    assert_eq!(up.throttled().1, 1, "the creation's pack was sent in full");
}

/// Issue 21 (3): first clones that cannot be shown progress before the pack (`--depth`: the
/// shallow list comes first) or that filter objects still work while the mirror is created
/// from a slow upstream: they are answered from the new mirror.
#[test]
fn a_shallow_or_partial_first_clone_works_while_the_mirror_is_created() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("slow/basic", "basic");
    // Slower than the proxy waits before it answers from the upstream's listing.
    up.throttle("/slow/", 4096, Duration::from_millis(250));
    let allowed = up.allowed();
    for v in PROTOCOLS {
        for how in ["--depth=1", "--filter=blob:none"] {
            let allowed = allowed.clone();
            let server = Server::start_with(move |c| c.allowed_upstreams = allowed);
            let url = server.url_for(&up.segment(), "slow/basic");
            let work = tempfile::tempdir().unwrap();
            let out = git_output(
                work.path(),
                &args(
                    &["clone", "--progress", "--bare", how, &url, "c"],
                    &proto(v),
                ),
                &[],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "v{v} {how}: {stderr}");
            let clone = work.path().join("c");
            assert_eq!(
                git(&clone, &["rev-parse", "main"]),
                git(&upstream_dir, &["rev-parse", "main"]),
                "v{v} {how}"
            );
            assert_fsck(&clone);
        }
    }
}

/// A mirror directory as a release that kept privacy and the last successful sync in marker
/// files beside the mirror's record writes it (`src/mirror/sync.rs` and `record.rs` at
/// `ed6a061`): `smart-git-proxy-private`, whose existence makes the mirror private, and
/// `smart-git-proxy-synced`, whose modification time is the end of the last successful sync.
/// The server folds them into the record at start: the mirrors are served as they were (fresh,
/// one of them private), without a sync, and the markers are gone.
#[test]
fn the_markers_of_an_older_release_are_migrated_into_the_record_at_start() {
    use base64::Engine as _;
    let up = Upstream::start();
    up.add_fixture("public/repo", "basic");
    let private_upstream = up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let root = tempfile::tempdir().unwrap();
    let mirror = |name: &str| root.path().join(up.segment()).join(format!("{name}.git"));
    let synced_at = std::time::SystemTime::now() - Duration::from_secs(60);
    let synced_ms = synced_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for name in ["public/repo", "private/repo"] {
        let dir = mirror(name);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let upstream_dir = up.repo_dir(name);
        git(
            root.path(),
            &[
                "clone",
                "-q",
                "--mirror",
                upstream_dir.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        // The record as that release writes it: its last sync and serve, nothing else.
        std::fs::write(
            dir.join("smart-git-proxy-state"),
            format!(r#"{{"last_sync_ms":{synced_ms},"last_sync_outcome":"ok","last_serve_ms":{synced_ms}}}"#),
        )
        .unwrap();
        let synced = std::fs::File::create(dir.join("smart-git-proxy-synced")).unwrap();
        synced.set_modified(synced_at).unwrap();
    }
    std::fs::write(
        mirror("private/repo").join("smart-git-proxy-private"),
        b"the upstream lists refs only with credentials\n",
    )
    .unwrap();

    let running = Running::start(
        root.path(),
        &[
            ("ALLOWED_UPSTREAMS", &up.allowed()),
            ("AUTH_MODE", "pass-through"),
            ("SYNC_STALE_AFTER", "1h"),
        ],
    );
    let addr: std::net::SocketAddr = running.addr.parse().unwrap();
    for name in ["public/repo", "private/repo"] {
        for marker in ["smart-git-proxy-synced", "smart-git-proxy-private"] {
            assert!(!mirror(name).join(marker).exists(), "{name}: {marker}");
        }
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(mirror(name).join("smart-git-proxy-state")).unwrap(),
        )
        .unwrap();
        assert_eq!(record["last_success_ms"], synced_ms, "{name}: {record}");
        assert_eq!(record["last_serve_ms"], synced_ms, "{name}: {record}");
        let private = record["private"] == serde_json::json!(true);
        assert_eq!(private, name.starts_with("private"), "{name}: {record}");
    }

    let info_refs = |name: &str, authorization: Option<&str>| {
        let mut headers = vec![("Git-Protocol", "version=2")];
        headers.extend(authorization.map(|a| ("Authorization", a)));
        let path = format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment());
        let reply = request(addr, "GET", &path, &headers, b"");
        (reply.status, reply.header("x-git-proxy-status"))
    };
    let alice = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:secret")
    );
    assert_eq!(info_refs("public/repo", None), (200, Some("hit".into())));
    assert_eq!(info_refs("private/repo", None).0, 401, "still private");
    assert_eq!(
        info_refs("private/repo", Some(&alice)),
        (200, Some("hit".into()))
    );
    let work = tempfile::tempdir().unwrap();
    let private_url = format!("http://alice:secret@{addr}/{}/private/repo", up.segment());
    git(work.path(), &["clone", "-q", "--mirror", &private_url, "c"]);
    assert_fsck(&work.path().join("c"));
    assert_eq!(refs(&work.path().join("c")), refs(&private_upstream));
    assert_eq!(
        upstream_fetches(&up),
        0,
        "served as they were: no upstream clone or fetch"
    );
}

/// Issue 21 (3): a `git fetch` into a repository that has most of the history, from a proxy
/// that has no mirror yet (a new proxy, an evicted mirror), shows the creation's progress too:
/// its negotiation rounds are answered at once (nothing is in common with a mirror that does
/// not exist yet), and its final round as a first clone's fetch.
#[test]
fn a_fetch_with_haves_shows_progress_while_the_mirror_is_created() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("slow/basic", "basic");
    up.throttle("/slow/", 1024, Duration::from_millis(150));
    let allowed = up.allowed();
    for v in PROTOCOLS {
        // The client has the history up to main; the upstream gains commits after it.
        let work = tempfile::tempdir().unwrap();
        let src = format!("file://{}", upstream_dir.display());
        git(work.path(), &["clone", "-q", "--bare", &src, "c"]);
        let new_head = push_commits(&upstream_dir, "main", 2);
        let allowed = allowed.clone();
        let server = Server::start_with(move |c| c.allowed_upstreams = allowed);
        let url = server.url_for(&up.segment(), "slow/basic");
        let sent_before = up.throttled().1;
        let mut fetch = git_with_progress(
            &work.path().join("c"),
            &["fetch", "--progress", &url, "+refs/heads/*:refs/heads/*"],
            v,
        );
        let seen = until_progress(&mut fetch);
        assert_eq!(
            up.throttled().1,
            sent_before,
            "v{v}: the upstream was still sending the pack"
        );
        let (stderr, ok) = finish(fetch, seen);
        assert!(ok, "v{v}: {stderr}");
        let clone = work.path().join("c");
        assert_eq!(git(&clone, &["rev-parse", "main"]).trim(), new_head, "v{v}");
        assert_fsck(&clone);
    }
}

/// A request that waited for another request's creation of the mirror is served the new
/// mirror as it is (`hit`): it does not list the upstream again for a sync of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_for_a_creation_is_served_the_new_mirror() {
    use smart_git_proxy::mirror::{Credentials, Freshness, Mirrors, Request, Settings, Status};
    let up = Upstream::start();
    up.add_fixture("o/r", "basic");
    // The creation's pack comes slowly: the second request arrives while it runs.
    up.throttle("/o/", 1024, Duration::from_millis(50));
    let root = tempfile::tempdir().unwrap();
    let upstream = smart_git_proxy::upstream::Options {
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(30),
        tls: smart_git_proxy::upstream::tls::ClientTls::system(),
    };
    let mirrors = std::sync::Arc::new(Mirrors::new(Settings {
        root: root.path().to_path_buf(),
        stale_after: Duration::from_secs(3600),
        max_syncs: 4,
        max_syncs_per_host: 4,
        sync_wait: Duration::from_secs(30),
        want_miss_interval: Duration::from_secs(1),
        failure_ttl: Duration::from_secs(1),
        maintenance_packs: 0,
        maintenance_bitmap_lag: 0,
        maintenance_grace: Duration::from_secs(1),
        client: smart_git_proxy::upstream::ListingClient::new(&upstream, &[]).unwrap(),
        upstream,
        access_ttl: Duration::from_secs(1),
        snapshot_memory: 1 << 30,
        via_parent: false,
    }));
    let req = Request {
        name: format!("{}/o/r", up.segment()),
        dir: root.path().join(up.segment()).join("o/r.git"),
        url: format!("http://{}/o/r.git", up.segment()),
        credentials: Credentials::None,
    };
    let first = tokio::spawn({
        let (mirrors, req) = (std::sync::Arc::clone(&mirrors), req.clone());
        async move { mirrors.ensure(&req, Freshness::IfStale).await }
    });
    while up.throttled().0 == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listings = up.count("/info/refs");
    let second = mirrors.ensure(&req, Freshness::IfStale).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Status::Clone);
    assert_eq!(second, Status::Hit);
    assert_eq!(up.count("/info/refs"), listings, "a second listing");
}
