//! Eviction under `MIRROR_MAX_SIZE` with the real binary: the least recently used mirror goes,
//! with its pack-cache entries, and comes back on the next request; a mirror being served is
//! kept until its client is done; the order survives a restart.

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::upstream::Upstream;
use common::*;

const TOKEN: &str = "evict-test-token";

/// The proxy binary over `mirror_dir` in front of `up`, with `env` on top.
fn start(mirror_dir: &Path, up: &Upstream, env: &[(&str, &str)]) -> Running {
    let allowed = up.allowed();
    let mut all = vec![
        ("ALLOWED_UPSTREAMS", allowed.as_str()),
        ("SYNC_STALE_AFTER", "1h"),
        ("ADMIN_TOKEN", TOKEN),
    ];
    all.extend_from_slice(env);
    Running::start(mirror_dir, &all)
}

/// SIGTERM, and wait for the exit (the server writes its records on the way out).
fn stop(mut running: Running) {
    running.terminate();
    let status = running.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

fn clone(running: &Running, up: &Upstream, name: &str) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{}/{}/{name}", running.addr, up.segment());
    git(work.path(), &["clone", "-q", "--bare", &url, "c.git"]);
    assert_fsck(&work.path().join("c.git"));
    work
}

/// Every mirror the inventory lists.
fn inventory(running: &Running) -> Vec<serde_json::Value> {
    let addr = running.addr.parse().unwrap();
    let auth = format!("Bearer {TOKEN}");
    let r = request(
        addr,
        "GET",
        "/api/v1/mirrors?limit=1000",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let page: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    page["mirrors"].as_array().unwrap().clone()
}

/// A mirror's bytes on disk with its pack-cache entries, as the inventory reports them.
fn footprint(running: &Running, repo: &str) -> u64 {
    let list = inventory(running);
    let m = list
        .iter()
        .find(|m| m["repo"] == repo)
        .unwrap_or_else(|| panic!("{repo} in {list:?}"));
    m["bytes"].as_u64().unwrap() + m["pack_cache_bytes"].as_u64().unwrap()
}

fn pack_cache_files(mirror_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(mirror_dir.join(".pack-cache"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".pack"))
                .collect()
        })
        .unwrap_or_default()
}

fn metric(running: &Running, name: &str) -> Option<f64> {
    let r = request(running.addr.parse().unwrap(), "GET", "/metrics", &[], b"");
    r.text().lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Wait (at most a minute) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mirrors `a`, `b` (and `c`) of the same fixture, measured by a first run: the bytes one
/// mirror takes with its pack-cache entries, at most.
fn measure(up: &Upstream) -> u64 {
    let mirror = tempfile::tempdir().unwrap();
    let running = start(mirror.path(), up, &[]);
    clone(&running, up, "a");
    let size = footprint(&running, &format!("{}/a", up.segment()));
    stop(running);
    size
}

#[test]
fn the_least_recently_used_mirror_is_evicted_with_its_pack_cache_entries() {
    let up = Upstream::start();
    for name in ["a", "b", "c"] {
        up.add_fixture(name, "basic");
    }
    let one = measure(&up);
    let mirror = tempfile::tempdir().unwrap();
    let dir = |name: &str| mirror.path().join(up.segment()).join(format!("{name}.git"));
    // Two mirrors fit, three do not; after one is gone the rest is under 90 % of the limit.
    let limit = format!("{}B", one * 5 / 2);
    let running = start(mirror.path(), &up, &[("MIRROR_MAX_SIZE", &limit)]);
    clone(&running, &up, "a");
    let a_packs = pack_cache_files(mirror.path());
    assert!(!a_packs.is_empty(), "a's clone went through the pack cache");
    clone(&running, &up, "b");
    // `a` is served again: `b` is now the least recently used... until `b` is served too.
    clone(&running, &up, "a");
    clone(&running, &up, "b");
    assert_eq!(
        metric(&running, "smart_git_proxy_mirror_evictions_total"),
        Some(0.0)
    );

    clone(&running, &up, "c");
    wait_until("a mirror is evicted", || !dir("a").exists());
    assert!(dir("b").exists() && dir("c").exists());
    let left = pack_cache_files(mirror.path());
    assert!(
        left.is_disjoint(&a_packs),
        "a's pack-cache entries are gone: {left:?}"
    );
    assert!(!left.is_empty(), "b's and c's entries stay");
    assert_eq!(
        metric(&running, "smart_git_proxy_mirror_evictions_total"),
        Some(1.0)
    );
    wait_until("the gauges follow", || {
        metric(&running, "smart_git_proxy_mirrors") == Some(2.0)
    });
    let names: Vec<String> = inventory(&running)
        .iter()
        .map(|m| m["repo"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [format!("{}/b", up.segment()), format!("{}/c", up.segment())]
    );
    // Nothing is left aside.
    let aside: Vec<_> = std::fs::read_dir(mirror.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".evicted-"))
        .collect();
    assert!(aside.is_empty(), "{aside:?}");

    // The next request mirrors it again, and `b`, now the least recently used, makes room.
    clone(&running, &up, "a");
    wait_until("b is evicted", || !dir("b").exists());
    assert!(dir("a").exists() && dir("c").exists());
    stop(running);
}

#[test]
fn the_access_order_survives_a_restart() {
    let up = Upstream::start();
    for name in ["a", "b"] {
        up.add_fixture(name, "basic");
    }
    let one = measure(&up);
    let mirror = tempfile::tempdir().unwrap();
    let dir = |name: &str| mirror.path().join(up.segment()).join(format!("{name}.git"));
    let running = start(mirror.path(), &up, &[]);
    clone(&running, &up, "a");
    clone(&running, &up, "b");
    // Served after `b` was created, within the minute in which serves are not written at once:
    // the shutdown writes it.
    clone(&running, &up, "a");
    stop(running);

    // Both no longer fit: the least recently used goes at start. By creation (or sync) order
    // it would be `a`; by use it is `b`.
    let limit = format!("{}B", one * 2 - one / 10);
    let running = start(mirror.path(), &up, &[("MIRROR_MAX_SIZE", &limit)]);
    wait_until("a mirror is evicted", || {
        !dir("a").exists() || !dir("b").exists()
    });
    assert!(dir("a").exists(), "the one used last stays");
    assert!(!dir("b").exists());
    stop(running);
}

/// The answer to a v2 fetch of `want`, read through a socket with a small receive buffer, so
/// that the server cannot send it all at once.
struct SlowClient {
    stream: std::net::TcpStream,
    raw: Vec<u8>,
}

impl SlowClient {
    fn fetch(addr: &str, path: &str, want: &str) -> SlowClient {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.connect(addr.parse().unwrap()).await.unwrap()
        });
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        let body = pkt(&[
            "command=fetch",
            "0001",
            "ofs-delta",
            "no-progress",
            &format!("want {want}"),
            "done",
            "0000",
        ]);
        let mut client = SlowClient {
            stream,
            raw: Vec::new(),
        };
        write!(
            client.stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        client.stream.write_all(&body).unwrap();
        client
    }

    /// Read `n` bytes of the answer.
    fn read(&mut self, n: usize) {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        self.raw.extend_from_slice(&buf);
    }

    /// Read the rest; the pack it carried.
    fn finish(mut self) -> Vec<u8> {
        self.stream.read_to_end(&mut self.raw).unwrap();
        let split = self.raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert!(self.raw.starts_with(b"HTTP/1.1 200"));
        let body = dechunk(&self.raw[split + 4..]);
        let payloads = pkt_payloads(&body);
        let start = payloads.iter().position(|p| *p == b"packfile\n").unwrap();
        payloads[start + 1..]
            .iter()
            .flat_map(|p| {
                assert_eq!(p[0], 1, "{}", String::from_utf8_lossy(p));
                p[1..].to_vec()
            })
            .collect()
    }
}

#[test]
fn a_mirror_being_served_is_not_evicted_from_under_its_client() {
    let up = Upstream::start();
    let big = up.add_fixture("big", "large");
    up.add_fixture("small", "basic");
    let mirror = tempfile::tempdir().unwrap();
    let dir = |name: &str| mirror.path().join(up.segment()).join(format!("{name}.git"));
    // Every mirror is over the limit: each goes as soon as nobody reads it. Packs are made from
    // the mirror itself, not the pack cache.
    let running = start(
        mirror.path(),
        &up,
        &[("MIRROR_MAX_SIZE", "1B"), ("PACK_CACHE_MAX_SIZE", "0")],
    );
    let tip = git(&big, &["rev-parse", "main"]).trim().to_owned();
    let path = format!("/{}/big/git-upload-pack", up.segment());
    let mut client = SlowClient::fetch(&running.addr, &path, &tip);
    // The answer started: the mirror exists (the request created it if need be) and is read.
    client.read(64 * 1024);
    assert!(dir("big").exists());

    // Another clone wakes eviction; once it has taken that mirror, a pass has run while the
    // slow client was still reading.
    clone(&running, &up, "small");
    wait_until("the unused mirror is evicted", || !dir("small").exists());
    assert!(dir("big").exists(), "the mirror being read is kept");

    let pack = client.finish();
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q", "--bare", "r.git"]);
    let repo = work.path().join("r.git");
    let mut index = Command::new("git")
        .args(["index-pack", "--stdin", "--strict"])
        .current_dir(&repo)
        .envs(git_env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    index.stdin.take().unwrap().write_all(&pack).unwrap();
    assert!(index.wait().unwrap().success(), "the whole pack arrived");
    git(&repo, &["update-ref", "refs/heads/main", &tip]);
    assert_fsck(&repo);

    // Released: now it goes.
    wait_until("the released mirror is evicted", || !dir("big").exists());
    stop(running);
}
