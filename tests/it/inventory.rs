//! The mirror inventory: `GET /api/v1/mirrors` (off without `ADMIN_TOKEN`, 401 without it,
//! paginated JSON) and `smart-git-proxy mirrors` beside a running server.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::upstream::{Mode, Upstream};
use common::*;

const TOKEN: &str = "s3cr3t-admin-token";

fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
    request(addr, "GET", path, &headers, b"")
}

#[test]
fn the_admin_api_is_off_without_a_token() {
    let mirror = tempfile::tempdir().unwrap();
    let running = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    let addr = running.addr.parse().unwrap();
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(get(addr, "/api/v1/mirrors", None).status, 404);
    assert_eq!(get(addr, "/api/v1/mirrors", Some(&bearer)).status, 404);
}

#[test]
fn the_inventory_lists_every_mirror_in_pages_to_the_token_holder_only() {
    let up = Upstream::start();
    for name in ["acme/one", "acme/two", "acme/private"] {
        up.add_fixture(name, "basic");
    }
    up.require_auth("/acme/private", "user:pa55word");
    let mirror = tempfile::tempdir().unwrap();
    let allowed = up.allowed();
    let running = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", &allowed),
            ("AUTH_MODE", "pass-through"),
            ("ADMIN_TOKEN", TOKEN),
            ("SYNC_STALE_AFTER", "1s"),
        ],
    );
    let addr: SocketAddr = running.addr.parse().unwrap();
    let seg = up.segment();
    let work = tempfile::tempdir().unwrap();
    for (name, userinfo) in [("one", ""), ("two", ""), ("private", "user:pa55word@")] {
        let url = format!("http://{userinfo}{addr}/{seg}/acme/{name}");
        git(work.path(), &["clone", "-q", "--bare", &url, name]);
    }
    // A sync of `two` fails: served stale, recorded as failed.
    up.set_mode(Mode::Fail);
    std::thread::sleep(Duration::from_millis(1100));
    let r = get(
        addr,
        &format!("/{seg}/acme/two/info/refs?service=git-upload-pack"),
        None,
    );
    assert_eq!(r.header("x-git-proxy-status").as_deref(), Some("stale"));
    up.set_mode(Mode::Normal);

    // The token, and only the token, opens it.
    let path = "/api/v1/mirrors";
    for auth in [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
    ] {
        let r = get(addr, path, auth.as_deref());
        assert_eq!(r.status, 401, "{auth:?}");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    }
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        get(addr, "/api/v1/mirrors?limit=x", Some(&bearer)).status,
        400
    );

    // Two pages of two.
    let page = |query: &str| {
        let r = get(addr, &format!("{path}{query}"), Some(&bearer));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert!(!r.text().contains("user") && !r.text().contains("pa55word"));
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()
    };
    let first = page("?limit=2");
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = page(&format!("?limit=2&cursor={cursor}"));
    assert!(second.get("next_cursor").is_none(), "{second}");
    let all: Vec<serde_json::Value> = [&first, &second]
        .iter()
        .flat_map(|p| p["mirrors"].as_array().unwrap().clone())
        .collect();
    let names: Vec<&str> = all.iter().map(|m| m["repo"].as_str().unwrap()).collect();
    let expected: Vec<String> = ["one", "private", "two"]
        .iter()
        .map(|n| format!("{seg}/acme/{n}"))
        .collect();
    assert_eq!(names, expected);
    assert_eq!(
        page("")["mirrors"].as_array().unwrap().len(),
        3,
        "default limit"
    );
    assert_eq!(page("?limit=0")["mirrors"].as_array().unwrap().len(), 1);

    for m in &all {
        let name = m["repo"].as_str().unwrap();
        let mut keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes",
                "last_serve",
                "last_sync",
                "last_sync_outcome",
                "pack_cache_bytes",
                "packs",
                "private",
                "repo"
            ]
        );
        assert!(m["bytes"].as_u64().unwrap() > 1000, "{m}");
        assert!(m["packs"].as_u64().unwrap() >= 1, "{m}");
        assert!(m["pack_cache_bytes"].as_u64().unwrap() > 0, "{m}");
        for time in ["last_sync", "last_serve"] {
            let t = m[time].as_str().unwrap();
            assert!(humantime::parse_rfc3339(t).is_ok(), "{time}: {t}");
        }
        let failed = name.ends_with("/two");
        assert_eq!(
            m["last_sync_outcome"],
            if failed { "failed" } else { "ok" },
            "{m}"
        );
        assert_eq!(m["private"], name.ends_with("/private"), "{m}");
    }

    // The same list from the disk, beside the running server.
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("mirrors")
        .env("MIRROR_DIR", mirror.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("REPOSITORY") && lines[0].contains("LAST SERVE"),
        "{table}"
    );
    for (line, name) in lines[1..4].iter().zip(&expected) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], name, "{table}");
        let private = if name.ends_with("/private") {
            "yes"
        } else {
            "no"
        };
        let outcome = if name.ends_with("/two") {
            "failed"
        } else {
            "ok"
        };
        assert!(
            cells.contains(&private) && cells.contains(&outcome),
            "{table}"
        );
    }
    assert!(lines[4].starts_with("3 mirrors"), "{table}");
}
