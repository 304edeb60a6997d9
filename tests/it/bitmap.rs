//! Reachability bitmaps: the ones maintenance writes pass git's own verifier
//! (`git rev-list --test-bitmap`) and are used by git; ours and git's (`git repack -a -d -b`)
//! are read; the planner's answers from them equal `git rev-list --objects`; objects newer than
//! the bitmap are covered by a walk on top; and clones, fetches and want checks of a maintained
//! mirror are served from them.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::*;
use gix::ObjectId;
use smart_git_proxy::mirror::maintain;
use smart_git_proxy::pack::{self, bitmap, Selection};
use smart_git_proxy::repo;

fn id(dir: &Path, rev: &str) -> ObjectId {
    ObjectId::from_hex(git(dir, &["rev-parse", rev]).trim().as_bytes()).unwrap()
}

/// A writable copy of fixture `name`, consolidated by maintenance (which writes the bitmap).
fn maintained(name: &str) -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(format!("{name}.git"));
    build_fixture(name, &dir);
    let outcome = maintain_now(&dir);
    assert!(outcome.bitmap_commits > 0, "{outcome:?}");
    (work, dir)
}

fn bitmap_path(dir: &Path) -> PathBuf {
    let packs = maintain::packs(dir).unwrap();
    let found: Vec<PathBuf> = packs
        .iter()
        .map(|p| p.with_extension("bitmap"))
        .filter(|b| b.is_file())
        .collect();
    assert_eq!(found.len(), 1, "one bitmap: {packs:?}");
    found[0].clone()
}

fn rev_list(dir: &Path, revs: &[String], extra: &[&str]) -> BTreeSet<String> {
    let mut a = vec!["rev-list", "--objects"];
    a.extend_from_slice(extra);
    a.extend(revs.iter().map(String::as_str));
    git(dir, &a)
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// The bitmap planner's answer for `wants --not haves` equals git's object list (and so the
/// walking planner's), and comes from the bitmap rather than the fallback.
fn check(dir: &Path, index: &Arc<bitmap::Index>, wants: &[&str], haves: &[&str]) {
    let want_ids: Vec<ObjectId> = wants.iter().map(|w| id(dir, w)).collect();
    let have_ids: Vec<ObjectId> = haves.iter().map(|h| id(dir, h)).collect();
    let repo = repo::open(dir).unwrap();
    let db = pack::db(&repo);
    let sel = Selection {
        wants: &want_ids,
        common: &have_ids,
        bitmap: Some(index),
        ..Default::default()
    };
    let plan = bitmap::plan(&db, index, &sel, &AtomicBool::new(false))
        .unwrap()
        .unwrap_or_else(|| panic!("{wants:?} --not {haves:?}: the bitmap answers"));
    let ours: BTreeSet<String> = plan.counts.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(ours.len(), plan.counts.len(), "no object twice");
    assert_eq!(plan.stats.total(), plan.counts.len(), "every object typed");
    let mut revs: Vec<String> = want_ids.iter().map(ToString::to_string).collect();
    revs.extend(have_ids.iter().map(|h| format!("^{h}")));
    let theirs = rev_list(dir, &revs, &[]);
    assert_eq!(
        ours,
        theirs,
        "{wants:?} --not {haves:?}: only ours {:?}, only git's {:?}",
        ours.difference(&theirs).take(5).collect::<Vec<_>>(),
        theirs.difference(&ours).take(5).collect::<Vec<_>>()
    );
    // The walking planner agrees.
    let walked = pack::plan(
        &db,
        &Selection {
            bitmap: None,
            ..sel
        },
        &AtomicBool::new(false),
    )
    .unwrap();
    let walked: BTreeSet<String> = walked.counts.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(ours, walked, "{wants:?} --not {haves:?}: bitmap vs walk");
}

fn planner_cases(dir: &Path, index: &Arc<bitmap::Index>, large: bool) {
    if large {
        check(dir, index, &["main", "side"], &[]);
        check(dir, index, &["main"], &["main~100"]);
        check(dir, index, &["side"], &["main~10", "v2"]);
        check(dir, index, &["main~37"], &["main~250"]);
        return;
    }
    let tips: Vec<String> = git(dir, &["for-each-ref", "--format=%(objectname)"])
        .lines()
        .map(str::to_owned)
        .collect();
    let tips: Vec<&str> = tips.iter().map(String::as_str).collect();
    check(dir, index, &tips, &[]);
    check(dir, index, &["main"], &["main~5"]);
    check(dir, index, &["main"], &["feature/a"]);
    check(dir, index, &["feature/a", "feature/b"], &["v1.0"]);
    check(dir, index, &["main", "orphan"], &["feature/b"]);
    check(dir, index, &["v2.0-signed-off"], &["main~3"]);
    check(dir, index, &["main:README.md"], &[]);
    check(dir, index, &["main"], &["main"]);
    check(dir, index, &["main"], &["main~2^{tree}"]);
}

/// `git rev-list --test-bitmap` for `rev` passes.
fn assert_test_bitmap(dir: &Path, rev: &str) {
    let out = git_output(dir, &["rev-list", "--test-bitmap", rev], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("OK!"),
        "--test-bitmap {rev}: {stderr}"
    );
}

#[test]
fn git_verifies_and_uses_the_bitmaps_maintenance_writes() {
    for name in ["basic", "large"] {
        let (_work, dir) = maintained(name);
        let index = bitmap::Index::open(&bitmap_path(&dir)).expect("our bitmap reads");
        let heads = git(
            &dir,
            &["for-each-ref", "--format=%(objectname)", "refs/heads"],
        );
        for tip in heads.lines() {
            assert_test_bitmap(&dir, tip);
        }
        // A commit of the spread along main's first-parent history.
        let len: usize = git(&dir, &["rev-list", "--first-parent", "--count", "main"])
            .trim()
            .parse()
            .unwrap();
        if len > 2 * bitmap::SPREAD {
            let chain = git(
                &dir,
                &[
                    "rev-list",
                    "--first-parent",
                    &format!("--max-count={}", bitmap::SPREAD),
                    &format!("main~{}", bitmap::SPREAD),
                ],
            );
            let spread = chain
                .lines()
                .find(|c| {
                    index
                        .commit_bits(&ObjectId::from_hex(c.as_bytes()).unwrap())
                        .is_some()
                })
                .expect("a bitmap within the spread");
            assert_test_bitmap(&dir, spread);
            assert!(index.commits() > heads.lines().count(), "{index:?}");
        }
        // git answers from it, and the same as without.
        let all = vec!["--all".to_owned()];
        assert_eq!(
            rev_list(&dir, &all, &["--use-bitmap-index"]),
            rev_list(&dir, &all, &[]),
            "{name}"
        );
        assert_fsck(&dir);
    }
}

#[test]
fn planner_answers_from_our_bitmaps_equal_git_rev_list() {
    let (_work, basic) = maintained("basic");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&basic)).unwrap());
    planner_cases(&basic, &index, false);
    let (_work, large) = maintained("large");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&large)).unwrap());
    planner_cases(&large, &index, true);
}

/// The bitmap of `dir` opened with a cache of its own, of `bytes`.
fn open_with_cache(dir: &Path, bytes: usize) -> (Arc<bitmap::Cache>, Arc<bitmap::Index>) {
    let cache = Arc::new(bitmap::Cache::new(bytes));
    let file = bitmap::File::open_in(&bitmap_path(dir), Arc::clone(&cache)).unwrap();
    let index = Arc::new(Arc::new(file).try_load().unwrap());
    (cache, index)
}

#[test]
fn answers_are_the_same_whatever_the_cache_keeps() {
    let (_work, large) = maintained("large");
    let objects = bitmap::Index::open(&bitmap_path(&large))
        .unwrap()
        .objects()
        .len();
    // Nothing kept; about two commit bitmaps kept (evicted in the middle of XOR chains); all
    // kept.
    for bytes in [1, objects / 4, 64 << 20] {
        let (cache, index) = open_with_cache(&large, bytes);
        planner_cases(&large, &index, true);
        assert!(cache.bytes() <= bytes, "{} > {bytes}", cache.bytes());
        if bytes == 1 {
            assert!(cache.is_empty());
        }
    }
    let (_work, basic) = maintained("basic");
    let (_, index) = open_with_cache(&basic, 1);
    planner_cases(&basic, &index, false);
}

#[test]
fn a_bitmap_no_longer_used_leaves_the_cache() {
    let (_work, dir) = maintained("large");
    let (cache, index) = open_with_cache(&dir, 64 << 20);
    let repo = repo::open(&dir).unwrap();
    let db = pack::db(&repo);
    let main = [id(&dir, "main")];
    let sel = Selection {
        wants: &main,
        bitmap: Some(&index),
        ..Default::default()
    };
    bitmap::plan(&db, &index, &sel, &AtomicBool::new(false))
        .unwrap()
        .expect("the bitmap answers");
    // The pack order, the type bitmaps and at least main's bitmap.
    assert!(cache.len() >= 3, "{cache:?}");
    let cached = cache.bytes();
    assert!(cached > index.objects().len() * 8, "{cache:?}");
    // A second load of the same file takes what the first decoded.
    let again = index.file().try_load().unwrap();
    assert_eq!(cache.bytes(), cached);
    drop(again);
    drop(index);
    assert!(cache.is_empty(), "{cache:?}");
}

#[test]
fn bitmaps_git_wrote_are_read() {
    for name in ["basic", "large"] {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join(format!("{name}.git"));
        build_fixture(name, &dir);
        // The optional sections git may add: the name-hash cache and the lookup table.
        git(
            &dir,
            &[
                "-c",
                "pack.writeBitmapHashCache=true",
                "-c",
                "pack.writeBitmapLookupTable=true",
                "repack",
                "-a",
                "-d",
                "-b",
                "-q",
            ],
        );
        let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).expect("git's bitmap reads"));
        assert!(index.commits() > 0);
        planner_cases(&dir, &index, name == "large");
    }
}

/// A commit on `branch` of the repository at `dir`, made from a scratch clone and pushed as a
/// pack of its own, as a sync would add it.
fn push_commit(dir: &Path, branch: &str, file: &str) {
    git(dir, &["config", "receive.unpackLimit", "1"]);
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(work.path(), &["clone", "-q", "-b", branch, &src, "w"]);
    let w = work.path().join("w");
    std::fs::write(w.join(file), format!("{file}\n")).unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["commit", "-q", "-m", file]);
    git(&w, &["push", "-q", "origin", &format!("HEAD:{branch}")]);
}

#[test]
fn objects_newer_than_the_bitmap_are_walked_on_top() {
    let (_work, dir) = maintained("basic");
    let old_main = id(&dir, "main").to_string();
    push_commit(&dir, "main", "new-1");
    push_commit(&dir, "main", "new-2");
    push_commit(&dir, "feature/b", "new-b");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    check(&dir, &index, &["main"], &[]);
    check(&dir, &index, &["main"], &[&old_main]);
    check(
        &dir,
        &index,
        &["main", "feature/b"],
        &["main~1", "feature/a"],
    );
    check(&dir, &index, &["feature/b"], &["main"]);
}

#[test]
fn requests_the_bitmap_cannot_answer_fall_back_to_the_walk() {
    let (_work, dir) = maintained("basic");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    let repo = repo::open(&dir).unwrap();
    let db = pack::db(&repo);
    let main = [id(&dir, "main")];
    let tree = [id(&dir, "main^{tree}")];
    let shallow = [id(&dir, "main~2")];
    let no = AtomicBool::new(false);
    for sel in [
        Selection {
            wants: &tree,
            ..Default::default()
        },
        Selection {
            wants: &main,
            shallow: &shallow,
            ..Default::default()
        },
    ] {
        assert!(bitmap::plan(&db, &index, &sel, &no).unwrap().is_none());
        // Through the seam, the walk answers.
        let plan = pack::plan(
            &db,
            &Selection {
                bitmap: Some(&index),
                ..sel
            },
            &no,
        )
        .unwrap();
        assert!(!plan.counts.is_empty());
    }
}

#[test]
fn more_than_max_walk_new_commits_fall_back_to_the_walk() {
    let (_work, dir) = maintained("basic");
    // MAX_WALK + 1 commits (no files) on top of main, on a branch of their own.
    let main = id(&dir, "main");
    let mut stream = format!("reset refs/heads/long\nfrom {main}\n\n");
    for i in 0..=bitmap::MAX_WALK {
        stream.push_str(&format!(
            "commit refs/heads/long\ncommitter T <t@example.com> {} +0000\ndata 2\nc\n\n",
            1_800_000_000 + i
        ));
    }
    let mut child = std::process::Command::new("git")
        .current_dir(&dir)
        .args(["fast-import", "--quiet"])
        .envs(git_env())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stream.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    let repo = repo::open(&dir).unwrap();
    let db = pack::db(&repo);
    let no = AtomicBool::new(false);
    let long = [id(&dir, "long")];
    let sel = Selection {
        wants: &long,
        bitmap: Some(&index),
        ..Default::default()
    };
    assert!(bitmap::plan(&db, &index, &sel, &no).unwrap().is_none());
    // One commit fewer is still answered from the bitmap.
    let shorter = [id(&dir, "long~1")];
    let sel = Selection {
        wants: &shorter,
        ..sel
    };
    let plan = bitmap::plan(&db, &index, &sel, &no)
        .unwrap()
        .expect("within the bound");
    assert_eq!(
        plan.counts.len(),
        rev_list(&dir, &[shorter[0].to_string()], &[]).len()
    );
    assert_eq!(
        pack::plan(
            &db,
            &Selection {
                wants: &long,
                ..sel
            },
            &no
        )
        .unwrap()
        .counts
        .len(),
        rev_list(&dir, &["long".to_owned()], &[]).len()
    );
}

/// `basic`, maintained by the proxy or repacked by git with a bitmap.
fn bitmapped(ours: bool) -> (tempfile::TempDir, PathBuf) {
    if ours {
        return maintained("basic");
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("basic.git");
    build_fixture("basic", &dir);
    git(&dir, &["repack", "-a", "-d", "-b", "-q"]);
    (work, dir)
}

#[test]
fn a_bitmapped_mirror_is_served_from_its_bitmap() {
    for ours in [true, false] {
        serve_bitmapped(ours);
    }
}

fn serve_bitmapped(ours: bool) {
    let server = Server::start();
    let (_work, served) = bitmapped(ours);
    bitmap_path(&served);
    let url = server.link("basic", &served);
    // A commit in the repository that no ref reaches.
    let tree = git(&served, &["rev-parse", "main^{tree}"]);
    let dangling = git(&served, &["commit-tree", tree.trim(), "-m", "dangling"]);
    let dangling = dangling.trim();
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let p = proto(v);
        git(
            work.path(),
            &args(&["clone", "-q", "--mirror", &url, "c.git"], &p),
        );
        let c = work.path().join("c.git");
        assert_fsck(&c);
        assert_eq!(refs(&c), refs(&served), "v{v}");

        // A partial clone gets no blobs, then fetches those of main lazily.
        let partial = work.path().join("partial");
        git(
            work.path(),
            &args(
                &[
                    "clone",
                    "-q",
                    "--filter=blob:none",
                    "--no-checkout",
                    &url,
                    "partial",
                ],
                &p,
            ),
        );
        let missing = git(
            &partial,
            &["rev-list", "--objects", "--all", "--missing=print"],
        );
        assert!(
            missing.lines().any(|l| l.starts_with('?')),
            "v{v}: blobs left out"
        );
        git(&partial, &args(&["checkout", "-q", "main"], &p));
        assert_fsck(&partial.join(".git"));

        // An incremental fetch: the client has an older main.
        let inc = work.path().join("inc");
        git(work.path(), &["init", "-q", "--bare", "inc"]);
        let old = format!("{}:refs/heads/old", id(&served, "main~7"));
        git(&inc, &args(&["fetch", "-q", &url, &old], &p));
        git(
            &inc,
            &args(&["fetch", "-q", &url, "main:refs/heads/main"], &p),
        );
        assert_fsck(&inc);

        // v0: a non-tip want is checked against what the refs reach, from the bitmap.
        let init = work.path().join("w");
        git(work.path(), &["init", "-q", "w"]);
        let deep = git(&served, &["rev-parse", "main~3"]);
        git(&init, &args(&["fetch", "-q", &url, deep.trim()], &p));
        assert_fsck(&init.join(".git"));
        let out = git_output(&init, &args(&["fetch", &url, dangling], &p), &[]);
        if v == "0" {
            assert!(!out.status.success(), "v0 serves only what refs reach");
            assert!(String::from_utf8_lossy(&out.stderr).contains("not our ref"));
        } else {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn negotiation_tells_a_want_reaches_a_have_from_the_bitmap() {
    let (_work, dir) = maintained("large");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    let repo = repo::open(&dir).unwrap();
    let db = pack::db(&repo);
    let no = AtomicBool::new(false);
    let want = [id(&dir, "main")];
    let expanded = |bitmap: Option<&Arc<bitmap::Index>>| {
        let mut neg = smart_git_proxy::upload_pack::Negotiator::new(&repo, &db, &want, &no)
            .with_bitmap(bitmap);
        neg.have(id(&dir, "main~1500")).unwrap();
        assert!(neg.ok_to_give_up().unwrap(), "main reaches main~1500");
        neg.expanded()
    };
    assert!(expanded(None) >= 1500, "the walk goes down to the have");
    assert_eq!(expanded(Some(&index)), 0, "the bitmap needs no walk");
    // A have the want does not reach still needs the walk, which says no.
    let mut neg = smart_git_proxy::upload_pack::Negotiator::new(&repo, &db, &want, &no)
        .with_bitmap(Some(&index));
    neg.have(id(&dir, "side")).unwrap();
    let reaches = git_output(&dir, &["merge-base", "--is-ancestor", "side", "main"], &[])
        .status
        .success();
    assert_eq!(neg.ok_to_give_up().unwrap(), reaches);
}

#[test]
fn a_bitmap_that_does_not_fit_its_pack_is_ignored() {
    let (_work, dir) = maintained("basic");
    let path = bitmap_path(&dir);
    let good = std::fs::read(&path).unwrap();
    // Written for another pack (the checksum in the header differs), then cut short.
    let mut other = good.clone();
    other[12] ^= 0xff;
    let cut = good[..40].to_vec();
    for (what, bytes) in [("another pack's", other), ("truncated", cut)] {
        std::fs::write(&path, &bytes).unwrap();
        assert!(bitmap::Index::open(&path).is_err(), "{what}");
        // Served by walking.
        let server = Server::start();
        let url = server.link("basic", &dir);
        let work = tempfile::tempdir().unwrap();
        for v in PROTOCOLS {
            let c = work.path().join(format!("c{v}.git"));
            git(
                work.path(),
                &args(
                    &["clone", "-q", "--mirror", &url, c.to_str().unwrap()],
                    &proto(v),
                ),
            );
            assert_fsck(&c);
            let deep = id(&dir, "main~3").to_string();
            git(&c, &args(&["fetch", "-q", &url, &deep], &proto(v)));
        }
    }
}

#[test]
fn maintenance_again_plans_from_the_old_bitmap_and_writes_a_new_one() {
    let (_work, dir) = maintained("large");
    let old = bitmap_path(&dir);
    push_commit(&dir, "main", "new-1");
    push_commit(&dir, "side", "new-side");
    let outcome = maintain_now(&dir);
    let new = bitmap_path(&dir);
    assert_ne!(old, new);
    assert!(!old.exists(), "the old pack's bitmap went with it");
    // The first region holds exactly what the clone refs reach.
    let clone_refs: Vec<String> = git(
        &dir,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            "refs/heads",
            "refs/tags",
        ],
    )
    .lines()
    .map(str::to_owned)
    .collect();
    assert_eq!(outcome.regions[0], rev_list(&dir, &clone_refs, &[]).len());
    for rev in ["main", "side"] {
        assert_test_bitmap(&dir, rev);
    }
    // What the old bitmap covers was taken from it, and the result is the bitmap a walk of
    // everything gives.
    assert!(outcome.bitmap_reused > 0, "{outcome:?}");
    let reused = bitmap::Index::open(&new).unwrap();
    let repo = repo::open(&dir).unwrap();
    let refs = repo::list_refs(&repo).unwrap();
    let (preferred, other): (Vec<_>, Vec<_>) = refs
        .refs
        .iter()
        .partition(|r| pack::reuse::is_clone_ref(&r.name));
    let targets = |refs: &[&smart_git_proxy::protocol::Ref]| -> Vec<ObjectId> {
        refs.iter().map(|r| r.target).collect()
    };
    let (preferred, other) = (targets(&preferred), targets(&other));
    let tips = bitmap::Tips {
        preferred: &preferred,
        other: &other,
    };
    let walked = bitmap::write(
        &pack::db(&repo),
        &new.with_extension("pack"),
        tips,
        None,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(walked.reused, 0);
    let walked = bitmap::Index::open(&new).unwrap();
    assert_eq!(walked.commits(), reused.commits());
    for commit in git(&dir, &["rev-list", "--all"]).lines() {
        let commit = ObjectId::from_hex(commit.as_bytes()).unwrap();
        assert_eq!(
            walked.commit_bits(&commit),
            reused.commit_bits(&commit),
            "{commit}"
        );
    }
    for pos in 0..walked.objects().len() {
        assert_eq!(walked.kind(pos), reused.kind(pos), "object {pos}");
    }
    assert_fsck(&dir);
}

#[test]
fn filters_by_kind_and_size_are_answered_from_the_bitmap() {
    use smart_git_proxy::protocol::filter::Filter;
    let (_work, dir) = maintained("basic");
    push_commit(&dir, "main", "new-1");
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    let repo = repo::open(&dir).unwrap();
    let db = pack::db(&repo);
    let no = AtomicBool::new(false);
    let set = |plan: pack::Plan| -> BTreeSet<String> {
        plan.counts.iter().map(|c| c.id.to_string()).collect()
    };
    let cases: [(&[&str], &[&str]); 5] = [
        (&["main", "v2.0-signed-off"], &[]),
        (&["main"], &["main~5"]),
        (&["main:README.md", "blob-tag"], &[]),
        (&["feature/a", "feature/b"], &["v1.0"]),
        // A partial clone's lazy fetch: it has the commit, not the blob.
        (&["main:src/mod0.rs", "v2.0-signed-off"], &["main"]),
    ];
    for spec in [
        "",
        "blob:none",
        "blob:limit=1k",
        "object:type=commit",
        "object:type=tree",
        "combine:blob:none+object:type=tree",
    ] {
        let filter = (!spec.is_empty()).then(|| Filter::parse(spec).unwrap());
        for (wants, haves) in cases {
            let wants: Vec<ObjectId> = wants.iter().map(|w| id(&dir, w)).collect();
            let haves: Vec<ObjectId> = haves.iter().map(|h| id(&dir, h)).collect();
            let sel = Selection {
                wants: &wants,
                common: &haves,
                filter: filter.as_ref(),
                ..Default::default()
            };
            let from_bitmap = bitmap::plan(&db, &index, &sel, &no)
                .unwrap()
                .unwrap_or_else(|| panic!("{spec}: the bitmap answers"));
            assert_eq!(from_bitmap.stats.total(), from_bitmap.counts.len());
            let walked = pack::plan(&db, &sel, &no).unwrap();
            assert_eq!(
                set(from_bitmap),
                set(walked),
                "{spec} {wants:?} --not {haves:?}"
            );
        }
    }
    // tree:<depth> depends on where a tree is reached: walked.
    let filter = Filter::parse("tree:1").unwrap();
    let main = [id(&dir, "main")];
    let sel = Selection {
        wants: &main,
        filter: Some(&filter),
        ..Default::default()
    };
    assert!(bitmap::plan(&db, &index, &sel, &no).unwrap().is_none());
}

/// A bare repository at `dir` shaped like a busy project: `main` of 300 commits, 150 branches
/// and 300 `refs/pull/N/head` of 1 to 3 commits forked from it, and an annotated tag every
/// 50 commits. Committer dates follow the order the commits are made in.
fn many_pulls(dir: &Path) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    git(
        dir.parent().unwrap(),
        &[
            "init",
            "-q",
            "--bare",
            "--initial-branch=main",
            dir.to_str().unwrap(),
        ],
    );
    let mut s = String::new();
    let mut time = 1_700_000_000u64;
    let mut mark = 0;
    let mut commit = |s: &mut String, r: &str, from: Option<usize>, file: &str| {
        mark += 1;
        time += 60;
        let body = format!("{r} {mark}\n");
        s.push_str(&format!(
            "commit {r}\nmark :{mark}\ncommitter T <t@example.com> {time} +0000\ndata {}\n{body}",
            body.len()
        ));
        if let Some(from) = from {
            s.push_str(&format!("from :{from}\n"));
        }
        s.push_str(&format!(
            "M 100644 inline {file}\ndata {}\n{body}\n",
            body.len()
        ));
        mark
    };
    let mut head = 0;
    for i in 1..=300usize {
        head = commit(
            &mut s,
            "refs/heads/main",
            (head > 0).then_some(head),
            &format!("d{}/f{}", i % 7, i % 13),
        );
        if i % 50 == 0 {
            let message = format!("v{i}\n");
            s.push_str(&format!(
                "tag v{i}\nfrom :{head}\ntagger T <t@example.com> {} +0000\ndata {}\n{message}\n",
                1_700_000_000 + 60 * head,
                message.len()
            ));
        }
        if i % 2 == 0 {
            commit(
                &mut s,
                &format!("refs/heads/topic/{i}"),
                Some(head),
                &format!("topic/{i}"),
            );
        }
        let mut tip = head;
        for j in 0..1 + i % 3 {
            tip = commit(
                &mut s,
                &format!("refs/pull/{i}/head"),
                Some(tip),
                &format!("pull/{i}/{j}"),
            );
        }
    }
    s.push_str("done\n");
    let mut child = Command::new("git")
        .args([
            "--git-dir",
            dir.to_str().unwrap(),
            "fast-import",
            "--quiet",
            "--done",
        ])
        .envs(git_env())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "fast-import");
}

/// Whether the bitmap of `index` has an entry for `rev`.
fn has_bitmap(dir: &Path, index: &bitmap::Index, rev: &str) -> bool {
    index.commit_bits(&id(dir, rev)).is_some()
}

/// On a repository with many more refs than bitmaps are worth, the newest branch tips get a
/// bitmap, pull requests mostly do not, and every ref is fewer than `SPREAD` first-parent
/// steps above a bitmapped commit: requests for any of them are answered from the bitmap.
#[test]
fn the_selection_is_bounded_and_every_ref_is_near_a_bitmap() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("pulls.git");
    many_pulls(&dir);
    let outcome = maintain_now(&dir);
    let index = Arc::new(bitmap::Index::open(&bitmap_path(&dir)).unwrap());
    let refs: Vec<String> = git(&dir, &["for-each-ref", "--format=%(refname)"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(refs.len(), 1 + 150 + 300 + 6);
    assert_eq!(outcome.bitmap_commits, index.commits());
    assert!(
        index.commits() <= bitmap::MAX_TIPS + 20,
        "{} bitmaps for {} refs",
        index.commits(),
        refs.len()
    );
    // The first bitmapped commit along the first-parent history of each ref.
    let below = |r: &str| -> Option<String> {
        let chain = git(
            &dir,
            &[
                "rev-list",
                "--first-parent",
                &format!("--max-count={}", bitmap::SPREAD),
                &format!("{r}^{{commit}}"),
            ],
        );
        let chain: Vec<&str> = chain.lines().collect();
        let found = chain.iter().find(|c| has_bitmap(&dir, &index, c));
        assert!(
            chain.len() < bitmap::SPREAD || found.is_some(),
            "{r}: no bitmap within {} first-parent steps",
            bitmap::SPREAD
        );
        found.map(|c| (*c).to_owned())
    };
    for r in &refs {
        below(r);
    }
    let newest = git(
        &dir,
        &[
            "for-each-ref",
            "--sort=-committerdate",
            "--count=90",
            "--format=%(refname)",
            "refs/heads",
        ],
    );
    for r in newest.lines() {
        assert!(
            has_bitmap(&dir, &index, r),
            "{r}, among the newest branches, has a bitmap"
        );
    }
    let pulls = refs
        .iter()
        .filter(|r| r.starts_with("refs/pull/"))
        .collect::<Vec<_>>();
    let own = pulls.iter().filter(|r| has_bitmap(&dir, &index, r)).count();
    assert!(
        own * 10 < pulls.len(),
        "{own} of {} pull requests have a bitmap",
        pulls.len()
    );
    // A pull request without a bitmap of its own: git verifies the one below it, and the
    // planner answers from it.
    let pull: &str = pulls
        .iter()
        .rev()
        .find(|r| {
            !has_bitmap(&dir, &index, r)
                && git(&dir, &["rev-list", "--count", &format!("main..{r}")]).trim() == "3"
        })
        .unwrap();
    assert_test_bitmap(&dir, &below(pull).unwrap());
    check(&dir, &index, &[pull], &[]);
    check(&dir, &index, &[pull], &["main~20"]);
    check(&dir, &index, &["topic/2", "v50"], &[]);
    let all: Vec<&str> = refs.iter().map(String::as_str).collect();
    check(&dir, &index, &all, &[]);
    assert_fsck(&dir);
}
