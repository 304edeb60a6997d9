//! In-process maintenance: packs consolidated into one, with the layout the module promises,
//! nothing reachable lost, unreachable objects kept within the grace period, and clones served
//! while it runs; its lock follows a mirror moved away. Commit-graphs git writes are read, and
//! a corrupt one never makes a request panic nor serves a broken repository.

use crate::common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::*;
use smart_git_proxy::mirror::maintain;
use smart_git_proxy::pack::graph;

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
    let s = Scenario::new()
        .fixture("o/basic", "basic")
        .config(|c| {
            c.sync_stale_after = Duration::ZERO.into();
            c.maintenance_pack_threshold = 3;
        })
        .start();
    let upstream_dir = s.upstream_dir("o/basic");
    let url = s.url("o/basic");
    let mirror = s.mirror_dir("o/basic");
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
    // Synced just now, as far as the server knows (the mirror's record): no sync check, no
    // snapshot refresh.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    std::fs::write(
        dir.join("smart-git-proxy-state"),
        format!(r#"{{"last_success_ms":{now_ms}}}"#),
    )
    .unwrap();
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
    let s = Scenario::new().fixture("o/large", "large").start();
    let upstream_dir = s.upstream_dir("o/large");
    let url = s.url("o/large");
    let mirror = s.mirror_dir("o/large");
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

/// A `git clone --bare --progress` of `url` over protocol `version`: its progress, and the
/// name of the one pack it received (a pack is named after its trailer).
fn clone_pack(url: &str, version: &str) -> (String, std::ffi::OsString) {
    let work = tempfile::tempdir().unwrap();
    clone_pack_in(url, version, work.path())
}

/// [`clone_pack`] into `work/c`, which stays.
fn clone_pack_in(url: &str, version: &str, work: &Path) -> (String, std::ffi::OsString) {
    let v = format!("protocol.version={version}");
    let out = git_output(
        work,
        &["-c", &v, "clone", "--bare", "--progress", url, "c"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let c = work.join("c");
    assert_fsck(&c);
    let packs = maintain::packs(&c).unwrap();
    assert_eq!(packs.len(), 1, "{packs:?}");
    (stderr, packs[0].file_name().unwrap().to_owned())
}

/// A mirror created from a repository with heads and tags only: every object of its one pack
/// is one a clone needs, so the maintenance after creation records the whole pack as the clone
/// region, and a clone is that file as it lies on disk, trailer included (the client's pack
/// has the mirror's pack's name).
#[test]
fn a_clone_of_a_new_mirror_is_its_pack_as_it_lies_on_disk() {
    let s = Scenario::new()
        .fixture("o/large", "large")
        .config(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0))
        .start();
    let url = s.url("o/large");
    let mirror = s.mirror_dir("o/large");
    assert_eq!(checked_clone(&url), refs(&s.upstream_dir("o/large")));
    wait_until("the clone region after creation", || {
        smart_git_proxy::pack::reuse::layout_path(&mirror).is_file()
    });
    let pack = maintain::packs(&mirror).unwrap();
    assert_eq!(pack.len(), 1, "{pack:?}");
    let objects = git(&mirror, &["count-objects", "-v"]);
    let objects = objects
        .lines()
        .find_map(|l| l.strip_prefix("in-pack: "))
        .unwrap()
        .to_owned();
    let reused = format!("pack-reused {objects}");
    // The snapshot follows the layout once maintenance has refreshed it.
    wait_until("a clone that reuses the whole pack", || {
        clone_pack(&url, "2").0.contains(&reused)
    });
    for version in ["2", "0"] {
        let (stderr, name) = clone_pack(&url, version);
        assert!(stderr.contains(&reused), "protocol {version}: {stderr}");
        assert_eq!(name, pack[0].file_name().unwrap(), "protocol {version}");
    }
}

/// A mirror whose pack also holds objects only other refs reach (`refs/pull/*`) gets no clone
/// region from the maintenance after creation: clones are planned, and complete.
#[test]
fn a_new_mirror_with_pull_refs_plans_its_clones() {
    let s = Scenario::new()
        .fixture("o/basic", "basic")
        .config(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0))
        .start();
    let upstream = s.upstream_dir("o/basic");
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", upstream.display());
    git(work.path(), &["clone", "-q", &src, "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join("pull"), "only a pull request has this\n").unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["commit", "-q", "-m", "pull request"]);
    git(&w, &["push", "-q", "origin", "HEAD:refs/pull/1/head"]);
    let url = s.url("o/basic");
    let mirror = s.mirror_dir("o/basic");
    assert_eq!(checked_clone(&url), refs(&upstream));
    wait_until("the bitmap and commit-graph after creation", || {
        has_bitmap_and_graph(&mirror)
    });
    assert!(!smart_git_proxy::pack::reuse::layout_path(&mirror).exists());
    let (stderr, name) = clone_pack(&url, "2");
    assert!(stderr.contains("pack-reused 0"), "{stderr}");
    assert_ne!(
        name,
        maintain::packs(&mirror).unwrap()[0].file_name().unwrap()
    );
}

/// The stored delta base of `id` in the one pack of the repository at `git_dir`, if `id` is
/// stored as a delta there.
fn stored_base(git_dir: &Path, id: &str) -> Option<String> {
    let pack = maintain::packs(git_dir).unwrap();
    assert_eq!(pack.len(), 1, "{pack:?}");
    let idx = pack[0].with_extension("idx");
    let listing = git(git_dir, &["verify-pack", "-v", idx.to_str().unwrap()]);
    let fields: Vec<&str> = listing
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} is not in the pack"))
        .split_whitespace()
        .collect();
    fields.get(6).map(|base| base.to_string())
}

/// A scenario whose upstream has three versions of a file, `lines` cut at `v1`, `v2` and `v3`
/// lines with `changed` (if any) replaced in v3: v1, then v3, on main, v2 only on a pull
/// request; the upstream repacked from scratch (`repack -a -d -f`). Their ids.
fn three_versions(s: &Proxied, cuts: [usize; 3], changed: usize) -> [String; 3] {
    let upstream = s.upstream_dir("o/basic");
    let lines: Vec<String> = (0..cuts.into_iter().max().unwrap())
        .map(|i| {
            format!(
                "line {i}: {} {}",
                i * 7919 % 1009,
                "text ".repeat(1 + i % 5)
            )
        })
        .collect();
    let version = |n: usize, changed: Option<usize>| {
        let mut lines = lines[..n].to_vec();
        if let Some(at) = changed {
            lines[at] = "a line changed in the middle".into();
        }
        lines.join("\n") + "\n"
    };
    let versions = [
        version(cuts[0], None),
        version(cuts[1], None),
        version(cuts[2], Some(changed)),
    ];
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", upstream.display());
    git(work.path(), &["clone", "-q", &src, "w"]);
    let w = work.path().join("w");
    let commit = |content: &str, push: &str| {
        std::fs::write(w.join("chain.txt"), content).unwrap();
        git(&w, &["add", "chain.txt"]);
        git(&w, &["commit", "-q", "-m", "chain"]);
        git(&w, &["push", "-q", "origin", push]);
    };
    commit(&versions[0], "HEAD:refs/heads/main");
    commit(&versions[1], "HEAD:refs/pull/9/head");
    git(&w, &["reset", "-q", "--hard", "HEAD~1"]);
    commit(&versions[2], "+HEAD:refs/heads/main");
    git(&upstream, &["repack", "-q", "-a", "-d", "-f"]);
    versions.map(|content| {
        std::fs::write(work.path().join("blob"), content).unwrap();
        git(work.path(), &["hash-object", "blob"]).trim().to_owned()
    })
}

/// Create the mirror of `s` with a clone, then clone it until `v1` comes as a delta (the
/// bitmap the maintenance after creation writes is in use), and return its base in clones
/// over protocols 2 and 0.
fn base_in_clones(s: &Proxied, v1: &str) -> [Option<String>; 2] {
    let url = s.url("o/basic");
    assert_eq!(checked_clone(&url), refs(&s.upstream_dir("o/basic")));
    let base_in_clone = |version: &str| {
        let work = tempfile::tempdir().unwrap();
        clone_pack_in(&url, version, work.path());
        stored_base(&work.path().join("c"), v1)
    };
    wait_until("v1 sent as a delta", || base_in_clone("2").is_some());
    [base_in_clone("2"), base_in_clone("0")]
}

fn pull_scenario() -> Proxied {
    Scenario::new()
        .fixture("o/basic", "basic")
        .config(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0))
        .start()
}

/// A file's version that a clone sends, stored as a delta against a version only a pull
/// request reaches, is sent as a delta against the next version down its chain that the
/// clone sends (where git's delta search would find it a base), not whole.
#[test]
fn a_delta_against_a_pull_request_version_gets_a_sent_base() {
    let s = pull_scenario();
    // v2 is v1 and more, v3 is v2 and more with a line of v1 changed: git stores v3 whole,
    // v2 against v3 and v1 against v2.
    let [v1, v2, v3] = three_versions(&s, [200, 230, 260], 100);
    let upstream = s.upstream_dir("o/basic");
    assert_eq!(
        stored_base(&upstream, &v1),
        Some(v2.clone()),
        "v1 against v2"
    );
    assert_eq!(
        stored_base(&upstream, &v2),
        Some(v3.clone()),
        "v2 against v3"
    );
    let v3 = Some(v3);
    assert_eq!(base_in_clones(&s, &v1), [v3.clone(), v3]);
}

/// The same when the version down the chain is not sent either: another version stored
/// against the same unsent base, which the clone sends earlier, becomes the base.
#[test]
fn a_delta_against_a_pull_request_version_gets_a_sent_sibling() {
    let s = pull_scenario();
    // v2, the pull request's, is the longest: git stores it whole, and v1 and v3 (written
    // before v1) against it.
    let [v1, v2, v3] = three_versions(&s, [200, 260, 230], 100);
    let upstream = s.upstream_dir("o/basic");
    assert_eq!(
        stored_base(&upstream, &v1),
        Some(v2.clone()),
        "v1 against v2"
    );
    assert_eq!(stored_base(&upstream, &v3), Some(v2), "v3 against v2");
    let v3 = Some(v3);
    assert_eq!(base_in_clones(&s, &v1), [v3.clone(), v3]);
}

/// `MAINTENANCE_PACK_THRESHOLD=0` turns background maintenance off, that after creation too.
#[test]
fn no_maintenance_after_creation_with_threshold_zero() {
    let s = Scenario::new()
        .fixture("o/basic", "basic")
        .config(|c| c.maintenance_pack_threshold = 0)
        .start();
    let upstream_dir = s.upstream_dir("o/basic");
    let url = s.url("o/basic");
    let mirror = s.mirror_dir("o/basic");
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
    let s = Scenario::new()
        .fixture("o/large", "large")
        .config(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0))
        .start();
    let upstream_dir = s.upstream_dir("o/large");
    let url = s.url("o/large");
    let mirror = s.mirror_dir("o/large");
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
    use maintain::{Policy, Work};
    let s = Scenario::new()
        .fixture("o/large", "large")
        .config(|c| c.maintenance_pack_threshold = 0)
        .start();
    let url = s.url("o/large");
    let mirror = s.mirror_dir("o/large");
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
    use maintain::{Policy, Work};
    let s = Scenario::new()
        .fixture("o/basic", "basic")
        .config(|c| {
            c.sync_stale_after = Duration::ZERO.into();
            c.maintenance_bitmap_lag = 2;
        })
        .start();
    let upstream_dir = s.upstream_dir("o/basic");
    let url = s.url("o/basic");
    let mirror = s.mirror_dir("o/basic");
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

// Commit-graphs: the ones git writes are read; a corrupt one is never trusted.

/// The chunks of a commit-graph file: id and byte range.
fn chunks(graph: &[u8]) -> Vec<([u8; 4], std::ops::Range<usize>)> {
    let n = usize::from(graph[6]);
    let entry = |i: usize| {
        let at = 8 + i * 12;
        let id: [u8; 4] = graph[at..at + 4].try_into().unwrap();
        let offset = u64::from_be_bytes(graph[at + 4..at + 12].try_into().unwrap());
        (id, usize::try_from(offset).unwrap())
    };
    (0..n)
        .map(|i| {
            let (id, start) = entry(i);
            (id, start..entry(i + 1).1)
        })
        .collect()
}

fn chunk(graph: &[u8], id: &[u8; 4]) -> std::ops::Range<usize> {
    chunks(graph)
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("chunk {}", String::from_utf8_lossy(id)))
}

/// Each commit's `CDAT` entry (tree, parent 1, parent 2, generation and time) rewritten by
/// `edit(position, entry)`.
fn edit_cdat(graph: &mut [u8], mut edit: impl FnMut(u32, &mut [u8])) {
    let cdat = chunk(graph, b"CDAT");
    for (i, entry) in graph[cdat].chunks_exact_mut(36).enumerate() {
        edit(u32::try_from(i).unwrap(), entry);
    }
}

/// A way to damage a commit-graph's bytes.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

/// Ways to damage a commit-graph, each named.
fn corruptions() -> Vec<(&'static str, Corruption)> {
    vec![
        ("empty", Box::new(|g: &mut Vec<u8>| g.clear())),
        (
            "truncated to half",
            Box::new(|g: &mut Vec<u8>| g.truncate(g.len() / 2)),
        ),
        (
            "truncated in the chunk table",
            Box::new(|g: &mut Vec<u8>| g.truncate(20)),
        ),
        (
            "fanout not monotonic",
            Box::new(|g: &mut Vec<u8>| {
                let fan = chunk(g, b"OIDF");
                g[fan.start..fan.start + 4].copy_from_slice(&u32::MAX.to_be_bytes());
            }),
        ),
        (
            "fanout counts more commits than listed",
            Box::new(|g: &mut Vec<u8>| {
                let fan = chunk(g, b"OIDF");
                let end = fan.end;
                g[end - 4..end].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
            }),
        ),
        (
            "parents out of range",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[20..24].copy_from_slice(&0x6fff_fff0u32.to_be_bytes())
                })
            }),
        ),
        (
            "every commit its own parent",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |i, e| e[20..24].copy_from_slice(&i.to_be_bytes()))
            }),
        ),
        (
            "every commit a root",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[20..24].copy_from_slice(&0x7000_0000u32.to_be_bytes());
                    e[24..28].copy_from_slice(&0x7000_0000u32.to_be_bytes());
                })
            }),
        ),
        (
            "second parent in a missing extra-edge list",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[24..28].copy_from_slice(&0x8000_0005u32.to_be_bytes())
                })
            }),
        ),
        (
            "trees that do not exist",
            Box::new(|g: &mut Vec<u8>| edit_cdat(g, |_, e| e[..20].fill(0xab))),
        ),
        (
            "times and generations garbage",
            Box::new(|g: &mut Vec<u8>| edit_cdat(g, |_, e| e[28..36].fill(0xff))),
        ),
        (
            "ids not sorted",
            Box::new(|g: &mut Vec<u8>| {
                let oidl = chunk(g, b"OIDL");
                g[oidl].reverse();
            }),
        ),
    ]
}

/// Clone, shallow clone and deepen, and fetch with a common history from `url` (protocol
/// v2): each either succeeds with a repository `git fsck --strict` accepts, or fails.
fn exercise(url: &str, what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |step: &str, dir: &Path, out: std::process::Output| {
        if out.status.success() {
            let fsck = git_output(dir, &["fsck", "--strict", "--no-progress"], &[]);
            if !fsck.status.success() {
                failures.push(format!(
                    "{what}: {step}: served a broken repository: {}",
                    String::from_utf8_lossy(&fsck.stderr).trim()
                ));
            }
        } else {
            failures.push(format!(
                "{what}: {step}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        out.status.success()
    };
    let v2 = ["-c", "protocol.version=2"];
    let work = tempfile::tempdir().unwrap();
    let out = git_output(
        work.path(),
        &args(&["clone", "--mirror", url, "m"], &[]),
        &[],
    );
    check("clone --mirror", &work.path().join("m"), out);
    let out = git_output(
        work.path(),
        &[v2[0], v2[1], "clone", "--bare", "--depth=2", url, "s"],
        &[],
    );
    let s = work.path().join("s");
    if check("clone --depth=2", &s, out) {
        let out = git_output(&s, &[v2[0], v2[1], "fetch", "--deepen=30", "origin"], &[]);
        check("fetch --deepen=30", &s, out);
        // Negotiation over the history the shallow clone has.
        let out = git_output(&s, &[v2[0], v2[1], "fetch", "--unshallow", "origin"], &[]);
        check("fetch --unshallow", &s, out);
    }
    failures
}

/// Whether walks in the repository at `dir` read its commit-graph.
fn graph_is_used(dir: &Path) -> bool {
    let repo = gix::open(dir).unwrap();
    graph::open(&smart_git_proxy::pack::db(&repo)).is_some()
}

#[test]
fn graphs_git_writes_verify() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    build_fixture("basic", &dir);
    git(&dir, &["commit-graph", "write", "--reachable"]);
    assert!(graph_is_used(&dir));
    // A split chain, as `git maintenance` or `fetch.writeCommitGraph` leave it.
    let _ = std::fs::remove_file(dir.join("objects/info/commit-graph"));
    git(&dir, &["commit-graph", "write", "--reachable", "--split"]);
    assert!(dir
        .join("objects/info/commit-graphs/commit-graph-chain")
        .is_file());
    assert!(graph_is_used(&dir));
}

#[test]
fn a_corrupt_commit_graph_never_panics_and_never_serves_a_broken_repository() {
    let panics = library_panics();
    let mut failures = Vec::new();
    for (what, corrupt) in corruptions() {
        let server = Server::start_with(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0));
        let dir = server.repo_dir("graph");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        build_fixture("basic", &dir);
        let outcome = maintain_now(&dir);
        assert!(outcome.commit_graph.is_some_and(|n| n > 0), "{outcome:?}");
        assert!(graph_is_used(&dir), "our own graph verifies");
        let path = dir.join("objects/info/commit-graph");
        let mut graph = std::fs::read(&path).unwrap();
        corrupt(&mut graph);
        std::fs::write(&path, &graph).unwrap();

        failures.extend(exercise(&server.url("graph"), what));
        assert_eq!(library_panics(), panics, "{what}: a panic");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A maintenance lock taken while eviction held it and moved the mirror away is a lock on the
/// file of the removed mirror: the waiter must lock the file the path names now, or it would
/// run beside a sync of a mirror created anew at the same path.
#[test]
fn a_lock_taken_after_the_mirror_moved_is_the_new_mirrors() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r.git");
    std::fs::create_dir_all(&dir).unwrap();
    let held = maintain::lock(&dir).unwrap();
    let waiter = {
        let dir = dir.clone();
        std::thread::spawn(move || maintain::lock(&dir).unwrap())
    };
    // The waiter is blocked on the lock file: /proc/locks lists it with "->" and its inode.
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("smart-git-proxy-maintenance.lock"))
            .unwrap()
            .ino()
    };
    wait_until("the waiter to block on the lock", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains("->") && l.contains(&format!(":{inode} ")))
    });
    // Evicted: moved aside and deleted; then created anew at the same path.
    let aside = root.path().join(".evicted-r");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::remove_dir_all(&aside).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    drop(held);
    let _lock = waiter.join().unwrap();
    assert!(
        maintain::try_lock(&dir).unwrap().is_none(),
        "the waiter holds the lock of the mirror at the path"
    );
}
