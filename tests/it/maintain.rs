//! In-process maintenance: packs consolidated into one, with the layout the module promises,
//! nothing reachable lost, unreachable objects kept within the grace period, and clones served
//! while it runs.

use crate::common;

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

/// The mirror's bitmap file, if it has one.
fn bitmap_of(dir: &Path) -> Option<std::path::PathBuf> {
    smart_git_proxy::repo::bitmap_file(dir)
}

/// Whether maintenance gave the mirror at `dir` a bitmap and a commit-graph.
fn has_bitmap_and_graph(dir: &Path) -> bool {
    bitmap_of(dir).is_some() && dir.join("objects/info/commit-graph").is_file()
}

/// Name and inode of each pack of the mirror at `dir`.
fn pack_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    maintain::packs(dir)
        .unwrap()
        .into_iter()
        .map(|p| {
            let ino = std::fs::metadata(&p).unwrap().ino();
            (p, ino)
        })
        .collect()
}

/// `git rev-list --test-bitmap` of `rev`: git checks the bitmap against its own walk.
fn assert_git_accepts_bitmap(dir: &Path, rev: &str) {
    let out = git_output(dir, &["rev-list", "--test-bitmap", rev], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    git(dir, &["commit-graph", "verify"]);
}

/// A clone of `url` into a new directory, checked with `git fsck --strict`; its refs.
fn checked_clone(url: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    let out = git_output(work.path(), &["clone", "-q", "--mirror", url, "c"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = work.path().join("c");
    assert_fsck(&c);
    refs(&c)
}

/// The mirror a first clone creates gets its bitmap and commit-graph in the background,
/// without `smart-git-proxy maintain`; its pack (the one the creation fetched) stays.
#[test]
fn a_new_mirror_gets_its_bitmap_and_commit_graph() {
    use common::upstream::Upstream;
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/large", "large");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| c.allowed_upstreams = allowed);
    let url = server.url_for(&up.segment(), "o/large");
    let mirror = server.mirror.path().join(up.segment()).join("o/large.git");
    assert_eq!(checked_clone(&url), refs(&upstream_dir));
    wait_until("the bitmap and commit-graph after creation", || {
        has_bitmap_and_graph(&mirror)
    });
    let packs = maintain::packs(&mirror).unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    assert_eq!(
        bitmap_of(&mirror).unwrap(),
        packs[0].with_extension("bitmap")
    );
    assert_git_accepts_bitmap(&mirror, "main");
    assert_fsck(&mirror);
    // Served from it.
    assert_eq!(checked_clone(&url), refs(&upstream_dir));
}

/// `MAINTENANCE_PACK_THRESHOLD=0` turns background maintenance off, that after creation too.
#[test]
fn no_maintenance_after_creation_with_threshold_zero() {
    use common::upstream::Upstream;
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.maintenance_pack_threshold = 0;
    });
    let url = server.url_for(&up.segment(), "o/basic");
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    assert_eq!(checked_clone(&url), refs(&upstream_dir));
    // Time for a maintenance that should not come (it would take milliseconds here).
    std::thread::sleep(Duration::from_secs(2));
    assert!(bitmap_of(&mirror).is_none());
    assert!(!mirror.join("objects/info/commit-graph").exists());
    assert!(!mirror.join("objects/info/commit-graphs").exists());
}

/// Clones that run while the maintenance after creation writes the bitmap and graph get
/// complete, correct repositories, and so do those after it.
#[test]
fn clones_during_the_maintenance_after_creation_succeed() {
    use common::upstream::Upstream;
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/large", "large");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
    });
    let url = server.url_for(&up.segment(), "o/large");
    let mirror = server.mirror.path().join(up.segment()).join("o/large.git");
    let expected = refs(&upstream_dir);
    // Together: one creates the mirror, the others wait for it, and all are served while the
    // maintenance the creation scheduled runs.
    let clones: Vec<_> = (0..4)
        .map(|_| {
            let (url, mirror) = (url.clone(), mirror.clone());
            std::thread::spawn(move || {
                let work = tempfile::tempdir().unwrap();
                git(work.path(), &["clone", "-q", "--mirror", &url, "c"]);
                let after = has_bitmap_and_graph(&mirror);
                let c = work.path().join("c");
                assert_fsck(&c);
                (refs(&c), after)
            })
        })
        .collect();
    let mut spanned = 0;
    for clone in clones {
        let (refs, after) = clone.join().unwrap();
        assert_eq!(refs, expected);
        spanned += usize::from(after);
    }
    // Those that ended after the bitmap and graph were in place began before the mirror
    // existed: they were in flight throughout the maintenance.
    eprintln!("{spanned} of 4 clones were in flight throughout the maintenance");
    wait_until("the bitmap and commit-graph after creation", || {
        has_bitmap_and_graph(&mirror)
    });
    assert_eq!(checked_clone(&url), expected);
    assert_fsck(&mirror);
}

/// A mirror with one pack whose bitmap and commit-graph are missing gets new ones, and its
/// pack stays the very same file; one that has them needs nothing.
#[test]
fn a_bitmap_refresh_does_not_rewrite_the_pack() {
    use common::upstream::Upstream;
    use maintain::{Policy, Work};
    let up = Upstream::start();
    up.add_fixture("o/large", "large");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.maintenance_pack_threshold = 0;
    });
    let url = server.url_for(&up.segment(), "o/large");
    let mirror = server.mirror.path().join(up.segment()).join("o/large.git");
    checked_clone(&url);
    let before = pack_files(&mirror);
    assert_eq!(before.len(), 1);
    assert!(bitmap_of(&mirror).is_none());
    let policy = Policy {
        packs: 16,
        bitmap_lag: 1000,
    };
    let run = || {
        maintain::run(
            &mirror,
            Duration::from_secs(3600),
            policy,
            None,
            &AtomicBool::new(false),
        )
        .expect("maintenance")
    };
    let outcome = run();
    assert_eq!(outcome.work, Work::Bitmap, "{outcome:?}");
    assert!(outcome.bitmap_commits > 0, "{outcome:?}");
    assert!(outcome.commit_graph.is_some_and(|n| n > 0), "{outcome:?}");
    assert_eq!(pack_files(&mirror), before, "the pack is the same file");
    assert!(has_bitmap_and_graph(&mirror));
    assert_git_accepts_bitmap(&mirror, "main");
    assert_fsck(&mirror);
    assert_eq!(run().work, Work::Nothing);

    // Without its commit-graph: only that is written again.
    std::fs::remove_file(mirror.join("objects/info/commit-graph")).unwrap();
    let bitmap = std::fs::read(bitmap_of(&mirror).unwrap()).unwrap();
    let outcome = run();
    assert_eq!(outcome.work, Work::Graph, "{outcome:?}");
    assert_eq!(pack_files(&mirror), before);
    assert_eq!(std::fs::read(bitmap_of(&mirror).unwrap()).unwrap(), bitmap);
    git(&mirror, &["commit-graph", "verify"]);

    // The server serves from the new bitmap (its snapshot picks up the replaced file).
    checked_clone(&url);
}

/// Syncs that bring more commits than `MAINTENANCE_BITMAP_LAG` past the bitmap schedule a
/// refresh (a consolidation, since each sync adds a pack) long before the pack threshold; the
/// bitmap then covers the new commits.
#[test]
fn commits_past_the_bitmap_lag_refresh_the_bitmap() {
    use common::upstream::Upstream;
    use maintain::{Policy, Work};
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.sync_stale_after = Duration::ZERO.into();
        c.maintenance_bitmap_lag = 2;
    });
    let url = server.url_for(&up.segment(), "o/basic");
    let mirror = server.mirror.path().join(up.segment()).join("o/basic.git");
    checked_clone(&url);
    wait_until("the bitmap after creation", || {
        has_bitmap_and_graph(&mirror)
    });
    let first = bitmap_of(&mirror).unwrap();
    // Within the lag: nothing to do.
    let sync = || {
        let (_c, out) = fetch_into_new_repo(&url, "main", &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let policy = Policy {
        packs: 16,
        bitmap_lag: 2,
    };
    let due = || {
        let repo = smart_git_proxy::repo::open(&mirror).unwrap();
        let refs = smart_git_proxy::repo::list_refs(&repo).unwrap();
        maintain::due(&mirror, &refs, policy, &AtomicBool::new(false)).unwrap()
    };
    push_commit(&upstream_dir, "main");
    push_commit(&upstream_dir, "main");
    sync();
    assert_eq!(maintain::packs(&mirror).unwrap().len(), 2);
    assert_eq!(due(), Work::Nothing, "2 commits past the bitmap");
    // A third passes the lag: consolidated, with a bitmap for the new pack.
    let tip = push_commit(&upstream_dir, "main");
    sync();
    wait_until("the refresh past the lag", || {
        maintain::packs(&mirror).unwrap().len() == 1
            && bitmap_of(&mirror).is_some_and(|b| b != first)
            && due() == Work::Nothing
    });
    assert_git_accepts_bitmap(&mirror, &tip);
    assert_fsck(&mirror);
    assert_eq!(checked_clone(&url), refs(&upstream_dir));
}
