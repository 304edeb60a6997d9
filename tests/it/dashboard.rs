//! `scripts/grafana-dashboard.json` cannot drift from the code: every metric it queries is in a
//! live `/metrics` scrape (with its `# HELP`) after a clone.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

/// Every query of the dashboard: panel targets and template variables.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The metric names a PromQL query reads: identifiers of the proxy's families, outside label
/// matchers' quoted values.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut unquoted = String::new();
    for (i, part) in query.split('"').enumerate() {
        if i % 2 == 0 {
            unquoted.push_str(part);
            unquoted.push(' ');
        }
    }
    for word in unquoted.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if word.starts_with("smart_git_proxy_") || word.starts_with("process_") {
            names.insert(word.to_owned());
        }
    }
    names
}

/// The shipped dashboard, and the metric names its queries read.
fn dashboard() -> (serde_json::Value, BTreeSet<String>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    let wanted = all.iter().flat_map(|q| metric_names(q)).collect();
    (dashboard, wanted)
}

/// Issue 23, item 5: every counter the dashboard queries is in the first scrape, at 0, with
/// every value of its labels (refusals by each reason), so that no panel shows "No data"
/// before the first event.
#[test]
fn every_counter_the_dashboard_queries_is_exported_at_zero_from_the_start() {
    let (_, wanted) = dashboard();
    let counters: Vec<&String> = wanted.iter().filter(|n| n.ends_with("_total")).collect();
    assert!(counters.len() >= 8, "{counters:?}");
    let mirror = tempfile::tempdir().unwrap();
    let running = Running::start(mirror.path(), &[]);
    let scrape = request(running.addr.parse().unwrap(), "GET", "/metrics", &[], b"").text();
    for name in counters {
        let series: Vec<&str> = scrape
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name.as_str()))
            .collect();
        assert!(!series.is_empty(), "{name} is not exported:\n{scrape}");
        for line in series {
            assert!(line.ends_with(" 0"), "{line}");
        }
    }
    for reason in [
        "push",
        "host-not-allowed",
        "auth-required",
        "busy",
        "upstream",
        "connections",
    ] {
        assert!(
            scrape.contains(&format!(
                "smart_git_proxy_refusals_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}:\n{scrape}"
        );
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let (dashboard, wanted) = dashboard();
    assert!(wanted.len() > 15, "{wanted:?}");
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert!(
                !panel["targets"].as_array().unwrap().is_empty(),
                "{}",
                panel["title"]
            );
        }
    }

    let s = Scenario::new()
        .fixture("acme/widgets", "basic")
        .proxy_env("MIRROR_MAX_SIZE", "80%")
        .start_binary();
    let (running, up) = (&s.running, &s.up);
    let work = tempfile::tempdir().unwrap();
    let url = s.url("acme/widgets");
    git(work.path(), &["clone", "-q", &url, "c"]);
    assert_fsck(&work.path().join("c/.git"));
    // A refusal (a push), so that refusals have a reason to show.
    let addr = running.addr.parse().unwrap();
    let push = format!(
        "/{}/acme/widgets/info/refs?service=git-receive-pack",
        up.segment()
    );
    assert_eq!(request(addr, "GET", &push, &[], b"").status, 403);

    // The disk gauges come from the eviction task's pass after the clone.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scrape = request(addr, "GET", "/metrics", &[], b"").text();
        let exported: BTreeSet<String> = scrape
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = wanted.difference(&exported).collect();
        if missing.is_empty() {
            for name in &wanted {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    scrape.contains(&format!("# HELP {family} ")),
                    "{family} has no # HELP"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics that are not exported: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
