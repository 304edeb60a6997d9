//! In-process maintenance: packs consolidated into one, with the layout the module promises,
//! nothing reachable lost, unreachable objects kept within the grace period, and clones served
//! while it runs.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::*;
use smart_git_proxy::mirror::maintain;

/// A writable copy of fixture `name` at `dest` with `extra` more packs: each a commit fetched
/// from a scratch clone, as syncs add them.
fn many_packs(name: &str, dest: &Path, extra: usize) {
    build_fixture(name, dest);
    // Every push keeps its pack, as a fetch does.
    git(dest, &["config", "receive.unpackLimit", "1"]);
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dest.display());
    git(work.path(), &["clone", "-q", &src, "w"]);
    let w = work.path().join("w");
    for i in 0..extra {
        std::fs::write(w.join(format!("added-{i}")), format!("{i}\n")).unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", &format!("added {i}")]);
        git(
            &w,
            &["push", "-q", "origin", &format!("HEAD:refs/pull/{i}/head")],
        );
    }
}

fn consolidate(dir: &Path, grace: Duration) -> maintain::Outcome {
    maintain::consolidate(dir, grace, None, &AtomicBool::new(false)).expect("maintenance")
}

/// `git verify-pack -v` of the single pack: ids in pack order, each with its delta base.
fn pack_order(dir: &Path) -> Vec<(String, Option<String>)> {
    let packs = maintain::packs(dir).unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let out = git(
        dir,
        &[
            "verify-pack",
            "-v",
            packs[0].with_extension("idx").to_str().unwrap(),
        ],
    );
    let mut entries: Vec<(u64, String, Option<String>)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 || f[0].len() != 40 {
                return None;
            }
            Some((
                f[4].parse().ok()?,
                f[0].to_owned(),
                f.get(6).map(|b| (*b).to_owned()),
            ))
        })
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|(_, id, base)| (id, base))
        .collect()
}

#[test]
fn consolidation_keeps_every_object_and_lays_out_regions() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    many_packs("basic", &dir, 3);
    let refs_before = refs(&dir);
    let before = maintain::packs(&dir).unwrap().len();
    assert!(before >= 4, "{before} packs");
    let outcome = consolidate(&dir, Duration::from_secs(3600));
    eprintln!("{outcome:?}");
    assert_eq!(outcome.packs_before, before);
    assert!(
        outcome.regions[0] > 0 && outcome.regions[1] >= 3,
        "{outcome:?}"
    );
    assert_eq!(refs(&dir), refs_before);
    assert_fsck(&dir);
    // No loose objects are left.
    let count = git(&dir, &["count-objects", "-v"]);
    assert!(
        count.contains("\ncount: 0\n") || count.starts_with("count: 0\n"),
        "{count}"
    );

    // The first region (what clones need) is a complete pack by itself: no delta there has its
    // base further on.
    let order = pack_order(&dir);
    assert_eq!(order.len(), outcome.regions.iter().sum::<usize>());
    let position: std::collections::HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let first = outcome.regions[0];
    for (i, (id, base)) in order.iter().enumerate() {
        if let Some(base) = base {
            let region = |p: usize| usize::from(p >= first);
            assert!(
                region(position[base.as_str()]) <= region(i),
                "{id} at {i} has its base {base} in a later region"
            );
        }
    }
    // Everything reachable from heads and tags is in the first region.
    let clone_objects = git(&dir, &["rev-list", "--objects", "--branches", "--tags"]);
    for line in clone_objects.lines() {
        let id = &line[..40];
        assert!(
            position[id] < first,
            "{id} is reachable from a branch or tag"
        );
    }

    // Consolidating a consolidated mirror changes nothing it serves.
    let again = consolidate(&dir, Duration::from_secs(3600));
    assert_eq!(again.packs_before, 1);
    assert_eq!(refs(&dir), refs_before);
    assert_fsck(&dir);
}

#[test]
fn unreachable_objects_are_kept_within_the_grace_period_only() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    build_fixture("basic", &dir);
    // A dangling commit, as a force-push upstream leaves one.
    let tree = git(&dir, &["rev-parse", "main^{tree}"]);
    let dangling = git_output(&dir, &["commit-tree", tree.trim(), "-m", "dangling"], &[]);
    let dangling = String::from_utf8_lossy(&dangling.stdout).trim().to_owned();
    assert_eq!(dangling.len(), 40);
    let kept = consolidate(&dir, Duration::from_secs(3600));
    assert_eq!((kept.regions[2], kept.dropped), (1, 0), "{kept:?}");
    assert_eq!(git(&dir, &["cat-file", "-t", &dangling]).trim(), "commit");
    let dropped = consolidate(&dir, Duration::ZERO);
    assert_eq!((dropped.regions[2], dropped.dropped), (0, 1), "{dropped:?}");
    assert!(!git_output(&dir, &["cat-file", "-e", &dangling], &[])
        .status
        .success());
    assert_fsck(&dir);
}

#[test]
fn clones_during_maintenance_succeed() {
    let server = Server::start_with(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0));
    let dir = server.repo_dir("busy");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    many_packs("large", &dir, 3);
    let url = server.url("busy");
    let clones: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100 * i));
                let work = tempfile::tempdir().unwrap();
                git(work.path(), &["clone", "-q", "--mirror", &url, "c"]);
                assert_fsck(&work.path().join("c"));
                refs(&work.path().join("c"))
            })
        })
        .collect();
    consolidate(&dir, Duration::from_secs(3600));
    for clone in clones {
        assert_eq!(clone.join().unwrap(), refs(&dir));
    }
    // And after it, from the consolidated pack.
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--mirror", &url, "c"]);
    assert_fsck(&work.path().join("c"));
}

/// Syncs that fetch schedule maintenance once the mirror has more packs than the threshold;
/// the mirror stays served throughout and ends with few packs.
#[test]
fn syncs_schedule_maintenance_in_the_background() {
    use common::upstream::Upstream;
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.sync_stale_after = Duration::ZERO.into();
        c.maintenance_pack_threshold = 3;
    });
    let url = server.url_for(&up.segment(), "o/basic");
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", upstream_dir.display());
    git(work.path(), &["clone", "-q", &src, "w"]);
    let w = work.path().join("w");
    let mut most = 0;
    for i in 0..8 {
        std::fs::write(w.join(format!("synced-{i}")), format!("{i}\n")).unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", &format!("synced {i}")]);
        git(&w, &["push", "-q", "origin", "HEAD:main"]);
        // Each sync fetches the new commit as a pack of its own.
        let (_c, out) = fetch_into_new_repo(&url, "main", &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        most = most.max(maintain::packs(&mirror).unwrap().len());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while maintain::packs(&mirror).unwrap().len() > 3 {
        assert!(std::time::Instant::now() < deadline, "no maintenance ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("at most {most} packs during the syncs");
    let clone = tempfile::tempdir().unwrap();
    git(clone.path(), &["clone", "-q", "--mirror", &url, "c"]);
    assert_fsck(&clone.path().join("c"));
    assert_eq!(
        git(&clone.path().join("c"), &["rev-parse", "main"]),
        git(&upstream_dir, &["rev-parse", "main"])
    );
}

/// A clone of a maintained mirror is the first region of its pack, sent as it is: the same
/// bytes every time, a pack git accepts, and `pack-reused` in git's progress.
#[test]
fn clones_of_a_maintained_mirror_reuse_the_pack() {
    let server = Server::start_with(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0));
    let dir = server.repo_dir("kept");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    many_packs("large", &dir, 2);
    let outcome = consolidate(&dir, Duration::from_secs(3600));
    let url = server.url("kept");
    let mut stderrs = Vec::new();
    let mut packs = Vec::new();
    for _ in 0..2 {
        let work = tempfile::tempdir().unwrap();
        let out = git_output(
            work.path(),
            &[
                "-c",
                "protocol.version=2",
                "clone",
                "--bare",
                "--progress",
                &url,
                "c",
            ],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = work.path().join("c");
        assert_fsck(&c);
        assert_eq!(
            git(&c, &["for-each-ref", "refs/heads", "refs/tags"]),
            git(&dir, &["for-each-ref", "refs/heads", "refs/tags"])
        );
        stderrs.push(String::from_utf8_lossy(&out.stderr).into_owned());
        let pack = maintain::packs(&c).unwrap();
        packs.push(std::fs::read(&pack[0]).unwrap());
    }
    let reused = format!("pack-reused {}", outcome.regions[0]);
    assert!(stderrs[0].contains(&reused), "{}", stderrs[0]);
    assert_eq!(packs[0], packs[1], "byte-identical across clones");
    // A fetch that is not a clone (here: of the other refs too) is planned as usual.
    let work = tempfile::tempdir().unwrap();
    let out = git_output(
        work.path(),
        &["clone", "--mirror", "--progress", &url, "c"],
        &[],
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pack-reused 0"));
    assert_fsck(&work.path().join("c"));

    // Shallow clones and deepening walk through the commit-graph maintenance wrote.
    assert!(outcome.commit_graph.is_some_and(|n| n > 0), "{outcome:?}");
    for version in ["2", "0"] {
        let work = tempfile::tempdir().unwrap();
        let v = format!("protocol.version={version}");
        git(
            work.path(),
            &["-c", &v, "clone", "-q", "--bare", "--depth=3", &url, "s"],
        );
        let s = work.path().join("s");
        git(&s, &["-c", &v, "fetch", "-q", "--deepen=40", "origin"]);
        assert_fsck(&s);
        assert_eq!(
            git(&s, &["rev-list", "--count", "main"]).trim(),
            git(
                &dir,
                &[
                    "rev-list",
                    "--count",
                    "--max-count=43",
                    "--first-parent",
                    "main"
                ]
            )
            .trim(),
            "protocol {version}"
        );
    }
}

/// Maintenance by another process replaces the pack a server's snapshot would reuse: the next
/// clone is planned instead, and succeeds.
#[test]
fn a_clone_after_outside_maintenance_falls_back_to_planning() {
    // No sync check picks the change up: the snapshot keeps naming the replaced pack.
    let server = Server::start_with(|c| {
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
        c.sync_stale_after = Duration::from_secs(3600).into();
    });
    let dir = server.repo_dir("moved");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    many_packs("basic", &dir, 1);
    consolidate(&dir, Duration::from_secs(3600));
    // Synced just now, as far as the server knows: no sync check, no snapshot refresh.
    std::fs::write(dir.join("smart-git-proxy-synced"), "").unwrap();
    let url = server.url("moved");
    let clone = || {
        let work = tempfile::tempdir().unwrap();
        let out = git_output(
            work.path(),
            &["clone", "--bare", "--progress", &url, "c"],
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_fsck(&work.path().join("c"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        !clone().contains("pack-reused 0"),
        "the first clone reuses the pack"
    );
    // Another pack arrives and is consolidated behind the server's back.
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(work.path(), &["clone", "-q", &src, "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("late"), "late\n").unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["commit", "-q", "-m", "late"]);
    git(&w, &["push", "-q", "origin", "HEAD:refs/pull/late/head"]);
    consolidate(&dir, Duration::from_secs(3600));
    assert!(clone().contains("pack-reused 0"), "planned, not reused");
}

#[test]
fn maintenance_writes_a_commit_graph_git_verifies() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    many_packs("basic", &dir, 2);
    // An octopus merge exercises the graph's extra-edge list.
    let scratch = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(scratch.path(), &["clone", "-q", &src, "w"]);
    let w = scratch.path().join("w");
    for branch in ["o1", "o2", "o3"] {
        git(&w, &["checkout", "-q", "-b", branch, "main"]);
        std::fs::write(w.join(branch), branch).unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", branch]);
    }
    git(&w, &["checkout", "-q", "main"]);
    git(&w, &["merge", "-q", "-m", "octopus", "o1", "o2", "o3"]);
    git(&w, &["push", "-q", "origin", "HEAD:refs/pull/octopus/head"]);

    let outcome = consolidate(&dir, Duration::from_secs(3600));
    let commits = git(&dir, &["rev-list", "--all"]).lines().count();
    assert_eq!(outcome.commit_graph, Some(commits), "{outcome:?}");
    assert!(dir.join("objects/info/commit-graph").is_file());
    git(&dir, &["commit-graph", "verify"]);
    assert_fsck(&dir);
    // git walks through our graph to the same history as through the objects.
    let with_graph = git(
        &dir,
        &[
            "-c",
            "core.commitGraph=true",
            "rev-list",
            "--all",
            "--parents",
            "--date-order",
        ],
    );
    let without = git(
        &dir,
        &[
            "-c",
            "core.commitGraph=false",
            "rev-list",
            "--all",
            "--parents",
            "--date-order",
        ],
    );
    assert_eq!(with_graph, without);
}
