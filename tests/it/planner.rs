//! The object planner against `git rev-list --objects` on the same fixtures.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use gix::ObjectId;
use smart_git_proxy::pack::{self, Selection};
use smart_git_proxy::repo;

fn id(repo_dir: &Path, rev: &str) -> ObjectId {
    ObjectId::from_hex(git(repo_dir, &["rev-parse", rev]).trim().as_bytes()).unwrap()
}

fn planned(repo_dir: &Path, sel: &Selection<'_>) -> BTreeSet<String> {
    let repo = repo::open(repo_dir).unwrap();
    let db = pack::db(&repo);
    let plan = pack::plan(&db, sel, &AtomicBool::new(false)).unwrap();
    let set: BTreeSet<String> = plan.counts.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(set.len(), plan.counts.len(), "no object is planned twice");
    assert_eq!(plan.stats.total(), plan.counts.len());
    set
}

fn rev_list(repo_dir: &Path, revs: &[&str]) -> BTreeSet<String> {
    let mut a = vec!["rev-list", "--objects"];
    a.extend_from_slice(revs);
    git(repo_dir, &a)
        .lines()
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// Compare the plan for `wants --not haves` with git's object list for the same revisions.
fn check(repo_dir: &Path, wants: &[&str], haves: &[&str]) {
    let want_ids: Vec<ObjectId> = wants.iter().map(|w| id(repo_dir, w)).collect();
    let have_ids: Vec<ObjectId> = haves.iter().map(|h| id(repo_dir, h)).collect();
    let ours = planned(
        repo_dir,
        &Selection {
            wants: &want_ids,
            common: &have_ids,
            tags: &[],
            ..Default::default()
        },
    );
    let mut revs: Vec<String> = want_ids.iter().map(ToString::to_string).collect();
    revs.extend(have_ids.iter().map(|h| format!("^{h}")));
    let revs: Vec<&str> = revs.iter().map(String::as_str).collect();
    let theirs = rev_list(repo_dir, &revs);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{wants:?} --not {haves:?}: only ours {:?}, only git's {:?}",
        ours.difference(&theirs).take(5).collect::<Vec<_>>(),
        theirs.difference(&ours).take(5).collect::<Vec<_>>()
    );
    assert_eq!(ours, theirs, "{wants:?} --not {haves:?}");
}

#[test]
fn object_sets_match_git_rev_list() {
    let basic = fixture("basic");
    let all_tips: Vec<String> = git(&basic, &["for-each-ref", "--format=%(objectname)"])
        .lines()
        .map(str::to_owned)
        .collect();
    let all_tips: Vec<&str> = all_tips.iter().map(String::as_str).collect();
    check(&basic, &all_tips, &[]);
    check(&basic, &["main"], &["main~5"]);
    check(&basic, &["main"], &["feature/a"]);
    check(&basic, &["feature/a", "feature/b"], &["v1.0"]);
    check(&basic, &["main", "orphan"], &["feature/b"]);
    check(&basic, &["v2.0-signed-off"], &["main~3"]);
    check(&basic, &["main^{tree}"], &[]);
    check(&basic, &["main:README.md"], &[]);
    check(&basic, &["main"], &["main"]);
    check(&basic, &["main"], &["main~2^{tree}"]);

    let large = fixture("large");
    check(&large, &["main", "side"], &[]);
    check(&large, &["main"], &["main~100"]);
    check(&large, &["side"], &["main~10", "v2"]);
}

/// Walks that read commits from a commit-graph (git's, complete or older than the newest
/// commits) plan what walks over the objects plan.
#[test]
fn object_sets_match_with_a_commit_graph() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    build_fixture("basic", &dir);
    git(&dir, &["commit-graph", "write", "--reachable"]);
    assert!(dir.join("objects/info/commit-graph").is_file());
    check(&dir, &["main", "feature/a", "feature/b", "orphan"], &[]);
    check(&dir, &["main"], &["main~5"]);
    check(&dir, &["main", "orphan"], &["feature/b"]);

    // New commits on top of the graph: the walk goes from the objects into the graph.
    let scratch = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(scratch.path(), &["clone", "-q", &src, "w"]);
    let w = scratch.path().join("w");
    for i in 0..3 {
        std::fs::write(w.join(format!("new-{i}")), "x").unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", &format!("new {i}")]);
    }
    git(&w, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
    check(&dir, &["main"], &[]);
    check(&dir, &["main"], &["main~4"]);
    check(&dir, &["main", "feature/a"], &["main~1"]);
}

#[test]
fn include_tag_adds_tags_that_point_into_the_pack() {
    let basic = fixture("basic");
    let tag_refs: Vec<(ObjectId, ObjectId)> = git(
        &basic,
        &[
            "for-each-ref",
            "--format=%(objectname) %(*objectname)",
            "refs/tags/",
        ],
    )
    .lines()
    .filter_map(|l| {
        let (tag, peeled) = l.split_once(' ')?;
        (!peeled.is_empty()).then(|| {
            (
                ObjectId::from_hex(tag.as_bytes()).unwrap(),
                ObjectId::from_hex(peeled.as_bytes()).unwrap(),
            )
        })
    })
    .collect();
    let wants = [id(&basic, "feature/a")];
    let common = [id(&basic, "main~25")];
    let set = planned(
        &basic,
        &Selection {
            wants: &wants,
            common: &common,
            tags: &tag_refs,
            ..Default::default()
        },
    );
    assert!(
        set.contains(&id(&basic, "v1.0^{commit}").to_string()),
        "v1.0's commit is in the pack"
    );
    assert!(
        set.contains(&id(&basic, "v1.0").to_string()),
        "v1.0 points into the pack"
    );
    assert!(
        !set.contains(&id(&basic, "v2.0").to_string()),
        "v2.0 does not"
    );
    // A tag of a tag comes with the whole chain when the commit is sent.
    let wants = [id(&basic, "main")];
    let set = planned(
        &basic,
        &Selection {
            wants: &wants,
            common: &[],
            tags: &tag_refs,
            ..Default::default()
        },
    );
    for tag in ["v2.0", "v2.0-signed-off", "v1.0"] {
        assert!(set.contains(&id(&basic, tag).to_string()), "{tag}");
    }
}

#[test]
fn a_missing_object_fails_the_plan_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("broken.git");
    build_fixture("basic", &served);
    // The fixture's newest commit is made of loose objects; remove its blob.
    let blob = git(&served, &["rev-parse", "main:loose.txt"]);
    let blob = blob.trim();
    std::fs::remove_file(served.join("objects").join(&blob[..2]).join(&blob[2..])).unwrap();
    let repo = repo::open(&served).unwrap();
    let db = pack::db(&repo);
    let wants = [id(&served, "main")];
    let result = pack::plan(
        &db,
        &Selection {
            wants: &wants,
            common: &[],
            tags: &[],
            ..Default::default()
        },
        &AtomicBool::new(false),
    );
    assert!(
        matches!(&result, Err(pack::Error::Missing(m)) if *m == ObjectId::from_hex(blob.as_bytes()).unwrap()),
        "{:?}",
        result.err()
    );

    // Through the server the client is told which object is missing, before any pack byte.
    let server = Server::start();
    let url = server.link("broken", &served);
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let out = git_output(
            work.path(),
            &args(&["clone", "-q", "--bare", &url, "c"], &proto(v)),
            &[],
        );
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("object {blob} is missing")),
            "v{v}: {stderr}"
        );
    }
}

#[test]
fn an_interrupted_plan_stops() {
    let large = fixture("large");
    let repo = repo::open(&large).unwrap();
    let db = pack::db(&repo);
    let wants = [id(&large, "main")];
    let result = pack::plan(
        &db,
        &Selection {
            wants: &wants,
            common: &[],
            tags: &[],
            ..Default::default()
        },
        &AtomicBool::new(true),
    );
    assert!(
        matches!(result, Err(pack::Error::Interrupted)),
        "planning must stop"
    );
}
