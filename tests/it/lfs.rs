//! The Git LFS object cache (issue 22), with the real `git lfs` client (Debian's `git-lfs`)
//! cloning through `insteadOf`, against a test upstream shaped like GitHub's: a batch API on
//! the Git host and object storage on another server, behind signed URLs, that counts its
//! downloads.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::lfs::{lfs_clone, lfs_repo, Gate, Lfs};
use common::upstream::Upstream;
use common::{request, wait_until, Reply, Server};
use sha2::{Digest, Sha256};

/// Deterministic, incompressible-looking content of `len` bytes.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_cloned(out: &Output, dest: &Path, files: &[(&str, &[u8])]) {
    assert!(
        out.status.success(),
        "clone failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (file, bytes) in files {
        let got = std::fs::read(dest.join(file)).unwrap();
        assert!(got == *bytes, "{file}: wrong content ({} bytes)", got.len());
    }
    common::assert_fsck(&dest.join(".git"));
}

/// A `download` batch request for `objects` (OID, size) on upstream repository `name`.
fn batch(
    proxy: SocketAddr,
    up: &Upstream,
    name: &str,
    objects: &[(&str, usize)],
    auth: Option<&str>,
) -> Reply {
    let objects: Vec<serde_json::Value> = objects
        .iter()
        .map(|(oid, size)| serde_json::json!({"oid": oid, "size": size}))
        .collect();
    let body = serde_json::json!({
        "operation": "download", "transfers": ["basic"], "ref": {"name": "refs/heads/main"},
        "objects": objects, "hash_algo": "sha256"
    });
    let mut headers = vec![
        ("Accept", "application/vnd.git-lfs+json"),
        ("Content-Type", "application/vnd.git-lfs+json"),
    ];
    if let Some(auth) = auth {
        headers.push(("Authorization", auth));
    }
    request(
        proxy,
        "POST",
        &format!("/{}/{name}.git/info/lfs/objects/batch", up.segment()),
        &headers,
        serde_json::to_vec(&body).unwrap().as_slice(),
    )
}

/// The path (and query) of object `i`'s download link in a batch answer, checking that it
/// is a proxy link on `proxy`.
fn link(reply: &Reply, proxy: SocketAddr, i: usize) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let object = &answer["objects"][i];
    assert_eq!(object["authenticated"], true, "{object}");
    let download = &object["actions"]["download"];
    assert!(download.get("header").is_none(), "{download}");
    assert!(download["expires_in"].as_u64().is_some(), "{download}");
    let href = download["href"].as_str().unwrap();
    href.strip_prefix(&format!("http://{proxy}"))
        .unwrap_or_else(|| panic!("not a proxy link: {href}"))
        .to_owned()
}

fn get(proxy: SocketAddr, path: &str) -> Reply {
    request(proxy, "GET", path, &[], b"")
}

/// A GET whose answer is read up to its first `n` body bytes; the rest is left to read.
fn get_partly(proxy: SocketAddr, path: &str, n: usize) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = end {
            if raw.len() >= end + 4 + n {
                let head = String::from_utf8_lossy(&raw[..end]).into_owned();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return (s, raw[end + 4..].to_vec());
            }
        }
        let read = s.read(&mut buf).unwrap();
        assert!(read > 0, "answer ended early");
        raw.extend_from_slice(&buf[..read]);
    }
}

fn cache_dir(server: &Server) -> PathBuf {
    server.mirror.path().join(".lfs-cache")
}

/// OIDs of the objects in the cache directory `dir`, each checked against its content.
fn cached(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(a) = std::fs::read_dir(dir.join("objects")) else {
        return out;
    };
    for a in a {
        for b in std::fs::read_dir(a.unwrap().path()).unwrap() {
            for f in std::fs::read_dir(b.unwrap().path()).unwrap() {
                let f = f.unwrap();
                let name = f.file_name().to_string_lossy().into_owned();
                let bytes = std::fs::read(f.path()).unwrap();
                assert_eq!(
                    hex::encode(Sha256::digest(&bytes)),
                    name,
                    "a cached object is corrupt"
                );
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

fn temporaries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("tmp"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_second_and_a_concurrent_third_clone_cost_the_storage_nothing() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let a = content(1, 300 << 10);
    let b = content(2, 1 << 20);
    let files: [(&str, &[u8]); 2] = [("a.bin", &a), ("b.bin", &b)];
    let oids = lfs_repo(&up, &lfs, "o/assets", &files);
    let server = Server::in_front_of(&up, |_| {});
    let work = tempfile::tempdir().unwrap();
    let first = work.path().join("first");
    assert_cloned(
        &lfs_clone(&server.addr.to_string(), &up, "o/assets", &first, &[]),
        &first,
        &files,
    );
    for oid in &oids {
        assert_eq!(lfs.downloads_of(oid), 1);
    }
    std::thread::scope(|scope| {
        let clones: Vec<_> = ["second", "third"]
            .into_iter()
            .map(|name| {
                let dest = work.path().join(name);
                let up = &up;
                let addr = server.addr;
                scope.spawn(move || {
                    let out = lfs_clone(&addr.to_string(), up, "o/assets", &dest, &[]);
                    (dest, out)
                })
            })
            .collect();
        for clone in clones {
            let (dest, out) = clone.join().unwrap();
            assert_cloned(&out, &dest, &files);
        }
    });
    assert_eq!(lfs.downloads().len(), 2, "storage served each object once");
    assert_eq!(cached(&cache_dir(&server)).len(), 2);
}

#[test]
fn concurrent_cold_clones_share_one_download_per_object() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let a = content(3, 2 << 20);
    let b = content(4, 512 << 10);
    let files: [(&str, &[u8]); 2] = [("a.bin", &a), ("b.bin", &b)];
    lfs_repo(&up, &lfs, "o/cold", &files);
    let server = Server::in_front_of(&up, |_| {});
    let work = tempfile::tempdir().unwrap();
    std::thread::scope(|scope| {
        let clones: Vec<_> = (0..3)
            .map(|i| {
                let dest = work.path().join(format!("clone{i}"));
                let up = &up;
                let addr = server.addr;
                scope.spawn(move || {
                    let out = lfs_clone(&addr.to_string(), up, "o/cold", &dest, &[]);
                    (dest, out)
                })
            })
            .collect();
        for clone in clones {
            let (dest, out) = clone.join().unwrap();
            assert_cloned(&out, &dest, &files);
        }
    });
    // Whichever way the clones overlapped, a miss either joined the download in progress or
    // found the object stored.
    assert_eq!(lfs.downloads().len(), 2, "{:?}", lfs.downloads());
}

#[test]
fn a_download_streams_to_every_waiting_client_and_survives_one_leaving() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(5, 4 << 20);
    let oids = lfs_repo(&up, &lfs, "o/shared", &[("big.bin", &bytes)]);
    let server = Server::in_front_of(&up, |_| {});
    let reply = batch(
        server.addr,
        &up,
        "o/shared",
        &[(&oids[0], bytes.len())],
        None,
    );
    let path = link(&reply, server.addr, 0);
    lfs.set_gate(Gate::HoldHalf);
    // Both clients get the first half while the storage holds the second.
    let (leaver, _) = get_partly(server.addr, &path, 64 << 10);
    let (mut stayer, mut got) = get_partly(server.addr, &path, 1 << 20);
    assert_eq!(lfs.downloads_of(&oids[0]), 1);
    drop(leaver);
    lfs.set_gate(Gate::Open);
    stayer.read_to_end(&mut got).unwrap();
    assert!(got == bytes, "the staying client got {} bytes", got.len());
    let again = get(server.addr, &path);
    assert_eq!(again.header("x-git-proxy-status").as_deref(), Some("hit"));
    assert!(again.body == bytes);
    assert_eq!(lfs.downloads_of(&oids[0]), 1, "one download for all three");
}

#[test]
fn hits_answer_ranges() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(6, 100_000);
    let oids = lfs_repo(&up, &lfs, "o/range", &[("r.bin", &bytes)]);
    let server = Server::in_front_of(&up, |_| {});
    let path = link(
        &batch(
            server.addr,
            &up,
            "o/range",
            &[(&oids[0], bytes.len())],
            None,
        ),
        server.addr,
        0,
    );
    // A range of a miss waits for its bytes.
    let r = request(
        server.addr,
        "GET",
        &path,
        &[("Range", "bytes=1000-1999")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 1000-1999/100000")
    );
    assert!(r.body == bytes[1000..2000]);
    // The download goes on after that answer, to the end.
    wait_until("the object is stored", || {
        cached(&cache_dir(&server)) == oids
    });
    let r = request(server.addr, "GET", &path, &[("Range", "bytes=99000-")], b"");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("x-git-proxy-status").as_deref(), Some("hit"));
    assert!(r.body == bytes[99000..]);
    let r = request(
        server.addr,
        "GET",
        &path,
        &[("Range", "bytes=100000-")],
        b"",
    );
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */100000"));
    // `git lfs` resumes an interrupted download with a range: a clone works from the cache.
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("c");
    assert_cloned(
        &lfs_clone(&server.addr.to_string(), &up, "o/range", &dest, &[]),
        &dest,
        &[("r.bin", &bytes)],
    );
    assert_eq!(lfs.downloads_of(&oids[0]), 1);
}

#[test]
fn a_batch_on_one_repository_never_yields_another_repositorys_object() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let secret = content(7, 200_000);
    let files: [(&str, &[u8]); 1] = [("secret.bin", &secret)];
    let oids = lfs_repo(&up, &lfs, "o/a", &files);
    // o/b's tree points to the same object, which its LFS server does not have for it.
    let other = Lfs::start();
    lfs_repo(&up, &other, "o/b", &files);
    let server = Server::in_front_of(&up, |_| {});
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    assert_cloned(
        &lfs_clone(&server.addr.to_string(), &up, "o/a", &a, &[]),
        &a,
        &files,
    );
    assert_eq!(cached(&cache_dir(&server)), oids, "cached from o/a");
    // The batch on o/b keeps the upstream's refusal, cached copy or not.
    let reply = batch(server.addr, &up, "o/b", &[(&oids[0], secret.len())], None);
    assert_eq!(reply.status, 200);
    let answer: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(answer["objects"][0]["error"]["code"], 404, "{answer}");
    assert!(answer["objects"][0].get("actions").is_none());
    // o/a's link does not open the object under o/b.
    let path = link(
        &batch(server.addr, &up, "o/a", &[(&oids[0], secret.len())], None),
        server.addr,
        0,
    );
    let moved = path.replace("/o/a.git/", "/o/b.git/");
    assert_ne!(moved, path);
    let r = get(server.addr, &moved);
    assert_eq!(r.status, 403, "{}", r.text());
    // And a clone of o/b does not get it.
    let b = work.path().join("b");
    let out = lfs_clone(&server.addr.to_string(), &up, "o/b", &b, &[]);
    assert!(!out.status.success(), "the checkout of o/b must fail");
    let got = std::fs::read(b.join("secret.bin")).unwrap_or_default();
    assert!(got != secret, "o/b's clone holds o/a's object");
    assert_eq!(lfs.downloads_of(&oids[0]), 1);
}

#[test]
fn anonymous_batches_on_a_private_repository_stay_401() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(8, 50_000);
    let oids = lfs_repo(&up, &lfs, "private/r", &[("p.bin", &bytes)]);
    up.require_auth("/private", "user:pw");
    let server = Server::in_front_of(&up, |_| {});
    let anonymous = batch(
        server.addr,
        &up,
        "private/r",
        &[(&oids[0], bytes.len())],
        None,
    );
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    let wrong = batch(
        server.addr,
        &up,
        "private/r",
        &[(&oids[0], bytes.len())],
        Some("Basic dXNlcjp3cm9uZw=="),
    );
    assert_eq!(wrong.status, 401);
    let good = batch(
        server.addr,
        &up,
        "private/r",
        &[(&oids[0], bytes.len())],
        Some("Basic dXNlcjpwdw=="),
    );
    let path = link(&good, server.addr, 0);
    let r = get(server.addr, &path);
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
    // Cached now, and still refused without credentials.
    let again = batch(
        server.addr,
        &up,
        "private/r",
        &[(&oids[0], bytes.len())],
        None,
    );
    assert_eq!(again.status, 401);
    assert!(!again.text().contains("/info/lfs/cache/"));
}

#[test]
fn corrupted_bytes_are_never_cached() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(9, 300_000);
    let files: [(&str, &[u8]); 1] = [("c.bin", &bytes)];
    let oids = lfs_repo(&up, &lfs, "o/corrupt", &files);
    let server = Server::in_front_of(&up, |_| {});
    lfs.corrupt_next(1);
    let path = link(
        &batch(
            server.addr,
            &up,
            "o/corrupt",
            &[(&oids[0], bytes.len())],
            None,
        ),
        server.addr,
        0,
    );
    // The client gets an error, never the corrupt object whole. When the download failed its
    // check before the answer began, a 502 that says why; when it failed after the first
    // chunk was handed to the server, an answer cut short, or (when the server had not flushed
    // it yet) a connection closed with no answer.
    let mut s = TcpStream::connect(server.addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let body = &raw[head_end + 4..];
        assert!(body.len() < bytes.len(), "a corrupt object was sent whole");
        if head.starts_with("HTTP/1.1 502") {
            let body = String::from_utf8_lossy(body);
            assert!(body.contains("SHA-256"), "{head}\n{body}");
        } else {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
    }
    assert_eq!(cached(&cache_dir(&server)), Vec::<String>::new());
    // A later clone gets the right content, downloaded again.
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("c");
    assert_cloned(
        &lfs_clone(&server.addr.to_string(), &up, "o/corrupt", &dest, &[]),
        &dest,
        &files,
    );
    assert_eq!(lfs.downloads_of(&oids[0]), 2);
    assert_eq!(cached(&cache_dir(&server)), oids);
    let metrics = get(server.addr, "/metrics").text();
    assert!(metrics.contains("smart_git_proxy_lfs_verification_failures_total"));
}

#[test]
fn expired_and_tampered_links_are_refused() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(10, 10_000);
    let oids = lfs_repo(&up, &lfs, "o/links", &[("l.bin", &bytes)]);
    let server = Server::in_front_of(&up, |c| c.lfs_url_key = Some("test key".into()));
    let batch_link = || {
        link(
            &batch(
                server.addr,
                &up,
                "o/links",
                &[(&oids[0], bytes.len())],
                None,
            ),
            server.addr,
            0,
        )
    };
    // The storage's link expires at once: so does the proxy's.
    lfs.set_expires_in(0);
    let expired = batch_link();
    let r = get(server.addr, &expired);
    assert_eq!(r.status, 403);
    assert!(r.text().contains("expired"), "{}", r.text());
    lfs.set_expires_in(3600);
    let good = batch_link();
    let (base, query) = good.split_once('?').unwrap();
    let sig = query.split("sig=").nth(1).unwrap();
    let flipped = format!(
        "{}{}",
        &sig[..63],
        if sig.ends_with('0') { '1' } else { '0' }
    );
    let size = format!("size={}", bytes.len());
    let other_oid = "0".repeat(64);
    for tampered in [
        good.replace(sig, &flipped),
        good.replace(&size, "size=1"),
        good.replace(&oids[0], &other_oid),
        format!("{base}?{}", query.replace("expires=", "expires=9")),
        format!("{base}?{query}&extra=1"),
        base.to_owned(),
    ] {
        let r = get(server.addr, &tampered);
        assert_eq!(r.status, 403, "{tampered}: {}", r.text());
    }
    // Signed with another key.
    let forger = smart_git_proxy::lfs::sign::Signer::new(Some(b"another key")).unwrap();
    let expires: u64 = query
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let forged = forger.query(&smart_git_proxy::lfs::sign::Grant {
        repo: format!("{}/o/links", up.segment()),
        oid: oids[0].clone(),
        size: bytes.len() as u64,
        expires,
    });
    assert_eq!(get(server.addr, &format!("{base}?{forged}")).status, 403);
    let r = get(server.addr, &good);
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
    assert_eq!(
        lfs.downloads_of(&oids[0]),
        1,
        "refused links cost the storage nothing"
    );
}

#[test]
fn stalled_storage_times_out_with_a_clear_error() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(11, 10_000);
    let oids = lfs_repo(&up, &lfs, "o/stall", &[("s.bin", &bytes)]);
    let server = Server::in_front_of(&up, |c| {
        c.upstream_stall_timeout = std::time::Duration::from_secs(1).into()
    });
    let path = link(
        &batch(
            server.addr,
            &up,
            "o/stall",
            &[(&oids[0], bytes.len())],
            None,
        ),
        server.addr,
        0,
    );
    lfs.set_gate(Gate::Stall);
    let r = get(server.addr, &path);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("UPSTREAM_STALL_TIMEOUT"), "{}", r.text());
    lfs.set_gate(Gate::Open);
    let r = get(server.addr, &path);
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
}

#[test]
fn eviction_under_the_bound_while_an_object_is_read() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let a = content(12, 2 << 20);
    let b = content(13, 2 << 20);
    let oids = lfs_repo(&up, &lfs, "o/evict", &[("a.bin", &a), ("b.bin", &b)]);
    let server = Server::in_front_of(&up, |c| c.lfs_cache_max_size = bytesize::ByteSize::mib(3));
    let reply = batch(
        server.addr,
        &up,
        "o/evict",
        &[(&oids[0], a.len()), (&oids[1], b.len())],
        None,
    );
    let (link_a, link_b) = (link(&reply, server.addr, 0), link(&reply, server.addr, 1));
    assert!(get(server.addr, &link_a).body == a);
    assert_eq!(cached(&cache_dir(&server)), vec![oids[0].clone()]);
    // A reader of `a`, paused, while `b` takes its place.
    let (mut reader, mut got) = get_partly(server.addr, &link_a, 64 << 10);
    assert!(get(server.addr, &link_b).body == b);
    assert_eq!(
        cached(&cache_dir(&server)),
        vec![oids[1].clone()],
        "a was evicted"
    );
    reader.read_to_end(&mut got).unwrap();
    assert!(
        got == a,
        "the reader of the evicted object got {} bytes",
        got.len()
    );
    let metrics = get(server.addr, "/metrics").text();
    assert!(metrics.contains("smart_git_proxy_lfs_evictions_total"));
}

#[test]
fn kill_9_during_a_download_leaves_no_entry() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(14, 1 << 20);
    let oids = lfs_repo(&up, &lfs, "o/kill", &[("k.bin", &bytes)]);
    let mirror = tempfile::tempdir().unwrap();
    let env = [
        ("ALLOWED_UPSTREAMS", up.allowed()),
        ("LFS_URL_KEY", "kill key".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cache = mirror.path().join(".lfs-cache");
    let running = common::Running::start(mirror.path(), &env);
    let addr: SocketAddr = running.addr.parse().unwrap();
    let path = link(
        &batch(addr, &up, "o/kill", &[(&oids[0], bytes.len())], None),
        addr,
        0,
    );
    lfs.set_gate(Gate::HoldHalf);
    let (_client, _) = get_partly(addr, &path, 64 << 10);
    wait_until("the partial download is on disk", || {
        temporaries(&cache)
            .iter()
            .any(|t| std::fs::metadata(t).is_ok_and(|m| m.len() > 0))
    });
    drop(running);
    assert!(
        !temporaries(&cache).is_empty(),
        "killed with a partial download"
    );
    lfs.set_gate(Gate::Open);
    let running = common::Running::start(mirror.path(), &env);
    assert_eq!(
        temporaries(&cache),
        Vec::<PathBuf>::new(),
        "removed at start"
    );
    assert_eq!(cached(&cache), Vec::<String>::new());
    let addr: SocketAddr = running.addr.parse().unwrap();
    let path = link(
        &batch(addr, &up, "o/kill", &[(&oids[0], bytes.len())], None),
        addr,
        0,
    );
    let r = get(addr, &path);
    assert_eq!(r.status, 200);
    assert!(r.body == bytes);
    assert_eq!(cached(&cache), oids);
}

#[test]
fn uploads_and_locks_pass_through() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    lfs_repo(&up, &lfs, "o/up", &[("u.bin", b"upload")]);
    let server = Server::in_front_of(&up, |_| {});
    let upload = br#"{"operation":"upload","objects":[]}"#;
    let r = request(
        server.addr,
        "POST",
        &format!("/{}/o/up.git/info/lfs/objects/batch", up.segment()),
        &[("Content-Type", "application/vnd.git-lfs+json")],
        upload,
    );
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("/info/lfs/cache/"));
    let r = get(
        server.addr,
        &format!("/{}/o/up.git/info/lfs/locks", up.segment()),
    );
    assert!(r.text().starts_with("lfs-echo GET"), "{}", r.text());
}

#[test]
fn a_child_proxy_caches_the_parents_links() {
    let up = Upstream::start();
    let lfs = up.serve_lfs();
    let bytes = content(15, 700_000);
    let files: [(&str, &[u8]); 1] = [("chained.bin", &bytes)];
    let oids = lfs_repo(&up, &lfs, "o/chain", &files);
    let parent = Server::in_front_of(&up, |_| {});
    let parent_url = format!("http://{}/", parent.addr);
    let children: Vec<Server> = (0..2)
        .map(|_| {
            let parent_url = parent_url.clone();
            Server::in_front_of(&up, move |c| c.parent_proxy = Some(parent_url))
        })
        .collect();
    let work = tempfile::tempdir().unwrap();
    for (i, child) in children.iter().enumerate() {
        for round in 0..2 {
            let dest = work.path().join(format!("child{i}-{round}"));
            let out = lfs_clone(&child.addr.to_string(), &up, "o/chain", &dest, &[]);
            assert_cloned(&out, &dest, &files);
        }
        assert_eq!(cached(&cache_dir(child)), oids, "child {i} keeps its copy");
    }
    // The parent fetched once from the storage, and each child once from the parent.
    assert_eq!(cached(&cache_dir(&parent)), oids);
    assert_eq!(lfs.downloads_of(&oids[0]), 1);
}
