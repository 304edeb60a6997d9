//! Prewarming (`PREWARM_REFS`): after a sync moves a prewarmed branch, the pack of
//! `actions/checkout`'s `--depth=1` fetch is in the pack cache before the first CI job asks,
//! so that job is a cache hit. The upstream is `git http-backend`; the proxy is the binary, so
//! that its `/metrics` are its own.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::upstream::Upstream;
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tempfile::TempDir;

const ADMIN: &str = "admin-t0ken";
const SECRET: &str = "hook-s3cret";

/// The binary in front of `up`, syncing only when told (`SYNC_STALE_AFTER` is an hour unless
/// `env` says otherwise), with the webhook and admin endpoints on.
fn proxy(up: &Upstream, env: &[(&str, &str)]) -> (TempDir, Running) {
    let mirror = tempfile::tempdir().unwrap();
    let allowed = up.allowed();
    let mut all = vec![
        ("ALLOWED_UPSTREAMS", allowed.as_str()),
        ("SYNC_STALE_AFTER", "1h"),
        ("ADMIN_TOKEN", ADMIN),
        ("WEBHOOK_SECRET", SECRET),
    ];
    all.extend_from_slice(env);
    let running = Running::start(mirror.path(), &all);
    (mirror, running)
}

fn addr(running: &Running) -> std::net::SocketAddr {
    running.addr.parse().unwrap()
}

/// The value of the sample `name` (with its labels) in `/metrics`; 0 when absent.
fn metric(running: &Running, name: &str) -> f64 {
    let scrape = request(addr(running), "GET", "/metrics", &[], b"").text();
    scrape
        .lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn prewarms(running: &Running, result: &str) -> f64 {
    metric(
        running,
        &format!("smart_git_proxy_prewarm_total{{result=\"{result}\"}}"),
    )
}

fn lookups(running: &Running, result: &str) -> f64 {
    metric(
        running,
        &format!("smart_git_proxy_pack_cache_lookups_total{{result=\"{result}\"}}"),
    )
}

fn url(running: &Running, up: &Upstream, name: &str) -> String {
    format!("http://{}/{}/{name}", running.addr, up.segment())
}

/// `actions/checkout`'s fetch of `sha` (protocol `version`, plus `extra` arguments) into a new
/// repository whose `origin` is `url`; the result must pass `git fsck --strict`.
fn checkout(url: &str, version: &str, sha: &str, extra: &[&str]) -> TempDir {
    checkout_with(url, version, sha, extra, &[])
}

fn checkout_with(
    url: &str,
    version: &str,
    sha: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> TempDir {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q"]);
    git(work.path(), &["remote", "add", "origin", url]);
    let proto = format!("protocol.version={version}");
    let refspec = format!("+{sha}:refs/remotes/origin/main");
    let mut args = vec![
        "-c",
        &proto,
        "fetch",
        "--no-tags",
        "--prune",
        "--no-recurse-submodules",
        "--depth=1",
    ];
    args.extend_from_slice(extra);
    args.extend(["origin", refspec.as_str()]);
    let out = git_output(work.path(), &args, env);
    assert!(
        out.status.success(),
        "checkout fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = git(work.path(), &["rev-parse", "refs/remotes/origin/main"]);
    assert_eq!(got.trim(), sha);
    assert_fsck(&work.path().join(".git"));
    work
}

fn warm_up(running: &Running, up: &Upstream, name: &str) {
    let bearer = format!("Bearer {ADMIN}");
    let r = request(
        addr(running),
        "POST",
        &format!("/api/v1/mirrors/{}/{name}/sync", up.segment()),
        &[("Authorization", &bearer)],
        b"",
    );
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
}

fn push_webhook(running: &Running, up: &Upstream, name: &str) {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "repository": { "full_name": name, "clone_url": format!("http://{}/{name}.git", up.segment()) },
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let r = request(
        addr(running),
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("Content-Type", "application/json"),
            ("X-Hub-Signature-256", &signature),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
}

/// A new branch `name` at `main` in the bare repository `dir`.
fn branch(dir: &Path, name: &str) {
    git(dir, &["branch", name, "main"]);
}

#[test]
fn the_first_checkout_after_a_pushed_webhook_is_a_cache_hit() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let (_mirror, running) = proxy(&up, &[]);
    let url = url(&running, &up, "o/basic");
    // Every result is exported from the start.
    for result in smart_git_proxy::prewarm::RESULTS {
        let scrape = request(addr(&running), "GET", "/metrics", &[], b"").text();
        let line = format!("smart_git_proxy_prewarm_total{{result=\"{result}\"}} 0");
        assert!(scrape.contains(&line), "{line} in:\n{scrape}");
    }
    git(
        tempfile::tempdir().unwrap().path(),
        &["ls-remote", "-q", &url],
    );
    let pushed = push_commit(&upstream_dir, "main");
    push_webhook(&running, &up, "o/basic");
    wait_until("the prewarm", || prewarms(&running, "generated") == 1.0);
    assert_eq!(
        (lookups(&running, "hit"), lookups(&running, "miss")),
        (0.0, 0.0)
    );

    let trace = tempfile::NamedTempFile::new().unwrap();
    let trace_path = trace.path().to_str().unwrap();
    checkout_with(&url, "2", &pushed, &[], &[("GIT_TRACE_PACKET", trace_path)]);
    assert_eq!(lookups(&running, "hit"), 1.0, "the first job is a hit");
    // What this git sent is the request prewarming stands for (the agent aside).
    let sent: Vec<String> = std::fs::read_to_string(trace.path())
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("fetch> ").map(|(_, line)| line.to_owned()))
        .filter(|l| !l.starts_with("agent="))
        .collect();
    let expected: Vec<String> = smart_git_proxy::prewarm::CHECKOUT_REQUEST
        .iter()
        .filter(|l| !l.starts_with("agent="))
        .map(|l| l.replace("{sha}", &pushed))
        .collect();
    assert_eq!(sent, expected);
    assert_eq!(lookups(&running, "miss"), 0.0);
    // With progress shown (actions/checkout's default), the same pack.
    checkout(&url, "2", &pushed, &["--progress"]);
    assert_eq!(lookups(&running, "hit"), 2.0);
    assert_eq!(lookups(&running, "miss"), 0.0);
    assert_eq!(prewarms(&running, "failed"), 0.0);
    // A checkout with a filter asks for another pack.
    checkout(&url, "2", &pushed, &["--filter=blob:none"]);
    assert_eq!(
        (lookups(&running, "hit"), lookups(&running, "miss")),
        (2.0, 1.0)
    );
}

#[test]
fn a_stale_sync_prewarms_and_a_protocol_v0_checkout_shares_the_pack() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let (_mirror, running) = proxy(&up, &[("SYNC_STALE_AFTER", "0s")]);
    let url = url(&running, &up, "o/basic");
    let scratch = tempfile::tempdir().unwrap();
    git(scratch.path(), &["ls-remote", "-q", &url]);
    let pushed = push_commit(&upstream_dir, "main");
    // The next info/refs finds the mirror stale and syncs it.
    git(scratch.path(), &["ls-remote", "-q", &url]);
    wait_until("the prewarm", || prewarms(&running, "generated") == 1.0);
    checkout(&url, "2", &pushed, &[]);
    assert_eq!(
        (lookups(&running, "hit"), lookups(&running, "miss")),
        (1.0, 0.0)
    );
    // A v0 client's depth-1 fetch resolves to the same pack.
    checkout(&url, "0", &pushed, &[]);
    assert_eq!(
        (lookups(&running, "hit"), lookups(&running, "miss")),
        (2.0, 0.0)
    );
}

#[test]
fn prewarm_refs_globs_choose_the_branches() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    branch(&upstream_dir, "release/1");
    branch(&upstream_dir, "release/old/hotfix");
    let (_mirror, running) = proxy(&up, &[("PREWARM_REFS", "release/*, refs/tags/v*")]);
    let url = url(&running, &up, "o/basic");
    warm_up(&running, &up, "o/basic");
    // main (HEAD's branch, not listed) and a branch the glob's `*` does not reach: nothing.
    push_commit(&upstream_dir, "main");
    let deep = push_commit(&upstream_dir, "release/old/hotfix");
    warm_up(&running, &up, "o/basic");
    let release = push_commit(&upstream_dir, "release/1");
    git(&upstream_dir, &["tag", "v9", &deep]);
    warm_up(&running, &up, "o/basic");
    wait_until("the prewarms", || prewarms(&running, "generated") == 2.0);
    checkout(&url, "2", &release, &[]);
    checkout(&url, "2", &deep, &[]);
    assert_eq!(
        (lookups(&running, "hit"), lookups(&running, "miss")),
        (2.0, 0.0),
        "release/1 and the commit of tag v9 were prewarmed"
    );
    assert_eq!(prewarms(&running, "generated"), 2.0, "main was not");
}

#[test]
fn with_the_cache_off_prewarms_are_skipped_and_counted() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let (mirror, running) = proxy(&up, &[("PACK_CACHE_MAX_SIZE", "0")]);
    let url = url(&running, &up, "o/basic");
    warm_up(&running, &up, "o/basic");
    let pushed = push_commit(&upstream_dir, "main");
    push_webhook(&running, &up, "o/basic");
    wait_until("the skipped prewarm", || {
        prewarms(&running, "cache-off") == 1.0
    });
    checkout(&url, "2", &pushed, &[]);
    assert_eq!(prewarms(&running, "generated"), 0.0);
    assert!(!mirror.path().join(".pack-cache").exists());
}

#[test]
fn a_want_miss_sync_prewarms_what_the_next_jobs_fetch() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let (_mirror, running) = proxy(&up, &[]);
    let url = url(&running, &up, "o/basic");
    warm_up(&running, &up, "o/basic");
    let pushed = push_commit(&upstream_dir, "main");
    // The mirror does not have the commit: the first job's fetch syncs it (a want-miss), and
    // its pack is generated once, by the job or by the prewarm, whichever asks first (the job
    // may even find the prewarm's pack finished).
    checkout(&url, "2", &pushed, &[]);
    wait_until("the prewarm", || {
        prewarms(&running, "generated") + prewarms(&running, "cached") == 1.0
    });
    checkout(&url, "2", &pushed, &[]);
    assert_eq!(
        lookups(&running, "miss") + prewarms(&running, "generated"),
        1.0,
        "one generation of the pack"
    );
    assert!(lookups(&running, "hit") >= 1.0, "the second job is a hit");
}

/// In-process: prewarms of one mirror run one at a time, and a sync while one runs replaces
/// the prewarm queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prewarm_per_mirror_at_a_time_and_the_newest_queued() {
    use smart_git_proxy::prewarm::{Prewarmer, Refs, Settings};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("h/r.git");
    build_fixture("basic", &dir);
    let snapshot_at = |rev: &str| {
        let target = git(&dir, &["rev-parse", rev]).trim().to_owned();
        git(&dir, &["update-ref", "refs/heads/main", &target]);
        Arc::new(smart_git_proxy::repo::Snapshot::open(&dir, None).unwrap())
    };
    let tip = git(&dir, &["rev-parse", "main"]).trim().to_owned();
    let (s1, s2, s3, s4) = (
        snapshot_at(&format!("{tip}~3")),
        snapshot_at(&format!("{tip}~2")),
        snapshot_at(&format!("{tip}~1")),
        snapshot_at(&tip),
    );
    let cache =
        smart_git_proxy::pack::cache::PackCache::open(root.path().join(".cache"), 1 << 30).unwrap();
    // No pack slot yet: the first prewarm waits for one.
    let slots = Arc::new(tokio::sync::Semaphore::new(0));
    let prewarmer = Prewarmer::new(Settings {
        refs: Refs::parse("HEAD").unwrap(),
        cache: Some(cache.clone()),
        options: Default::default(),
        pack_slots: Arc::clone(&slots),
    });
    let upstream = smart_git_proxy::upstream::Options {
        connect_timeout: std::time::Duration::from_secs(1),
        stall_timeout: std::time::Duration::from_secs(1),
        tls: smart_git_proxy::upstream::tls::ClientTls::system(),
    };
    let mirrors = smart_git_proxy::mirror::Mirrors::new(smart_git_proxy::mirror::Settings {
        root: root.path().to_path_buf(),
        stale_after: std::time::Duration::from_secs(1),
        max_syncs: 1,
        max_syncs_per_host: 1,
        sync_wait: std::time::Duration::from_secs(1),
        want_miss_interval: std::time::Duration::from_secs(1),
        failure_ttl: std::time::Duration::from_secs(1),
        maintenance_packs: 0,
        maintenance_bitmap_lag: 0,
        maintenance_grace: std::time::Duration::from_secs(1),
        client: smart_git_proxy::upstream::ListingClient::new(&upstream, &[]).unwrap(),
        upstream,
        access_ttl: std::time::Duration::from_secs(1),
        snapshot_memory: 1 << 30,
        via_parent: false,
    });
    let synced = |before: &Arc<_>, after: &Arc<_>| smart_git_proxy::mirror::Synced {
        name: "h/r".into(),
        dir: dir.clone(),
        before: Arc::clone(before),
        after: Arc::clone(after),
        lease: mirrors.lease(&dir),
    };
    let superseded = || prewarm_count("superseded");
    let before = superseded();
    prewarmer.synced(synced(&s1, &s2)); // runs (waits for a slot)
    prewarmer.synced(synced(&s2, &s3)); // queued
    prewarmer.synced(synced(&s3, &s4)); // replaces the queued one
    assert_eq!(superseded(), before + 1.0);
    assert_eq!(cache.entries(), 0);
    slots.add_permits(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // The pack cache is this test's own; the count of generated prewarms is the process's,
    // which other tests' servers add to.
    while cache.entries() < 2 {
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(cache.entries(), 2, "{tip}~2 and {tip}, not {tip}~1");
}

/// The in-process recorder's count of prewarms with `result`.
fn prewarm_count(result: &str) -> f64 {
    smart_git_proxy::metrics::handle();
    let scrape = smart_git_proxy::metrics::render();
    let name = format!("smart_git_proxy_prewarm_total{{result=\"{result}\"}}");
    scrape
        .lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[test]
fn an_empty_prewarm_refs_prewarms_nothing_and_a_bad_one_is_refused() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let (_mirror, running) = proxy(&up, &[("PREWARM_REFS", "")]);
    warm_up(&running, &up, "o/basic");
    push_commit(&upstream_dir, "main");
    push_webhook(&running, &up, "o/basic");
    wait_until("the webhook's sync", || {
        metric(
            &running,
            "smart_git_proxy_mirror_updates_total{status=\"sync\"}",
        ) == 1.0
    });
    for result in smart_git_proxy::prewarm::RESULTS {
        assert_eq!(prewarms(&running, result), 0.0, "{result}");
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("MIRROR_DIR", tempfile::tempdir().unwrap().path())
        .env("PREWARM_REFS", "main, release~1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("PREWARM_REFS entry 'release~1'"),
        "{stderr}"
    );
}

/// A push of many matching branches prewarms the first `MAX_REFS` commits by ref name; the
/// branches that did not move, and repeated commits, count for nothing.
#[test]
fn at_most_max_refs_commits_per_sync() {
    use smart_git_proxy::prewarm::{Refs, MAX_REFS};
    use smart_git_proxy::repo::Snapshot;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r.git");
    build_fixture("basic", &dir);
    git(&dir, &["branch", "release/still", "main~12"]);
    let before = Snapshot::open(&dir, None).unwrap();
    for i in 0..MAX_REFS + 2 {
        git(
            &dir,
            &["branch", &format!("release/{i:02}"), &format!("main~{i}")],
        );
    }
    git(&dir, &["branch", "release/same", "main"]);
    let after = Snapshot::open(&dir, None).unwrap();
    let (commits, more) = Refs::parse("release/*").unwrap().moved(&before, &after);
    let expected: Vec<gix::ObjectId> = (0..MAX_REFS)
        .map(|i| {
            git(&dir, &["rev-parse", &format!("main~{i}")])
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!((commits, more), (expected, 2));
}
