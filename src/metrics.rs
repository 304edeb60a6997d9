//! Prometheus metrics, served at `/metrics`. Labels come from closed sets (no repository
//! names), so that cardinality stays bounded however many repositories are mirrored.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder's handle; the recorder is installed on first use.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Durations are histograms (buckets), not summaries whose quantiles fall to 0 once
            // nothing happened for a while.
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(h) => {
                    describe();
                    crate::lfs::describe_metrics();
                    metrics::gauge!("smart_git_proxy_build_info", "version" => env!("CARGO_PKG_VERSION"))
                        .set(1.0);
                    // Present from the start, so that a rate over it is 0 rather than empty.
                    metrics::counter!("smart_git_proxy_mirror_evictions_total").absolute(0);
                    zero();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are disabled");
                    None
                }
            }
        })
        .as_ref()
}

/// `command` of `smart_git_proxy_requests_total` and `smart_git_proxy_request_seconds`.
pub const COMMANDS: &[&str] = &["info-refs", "ls-refs", "fetch", "upload-pack", "lfs"];
/// `result` of `smart_git_proxy_requests_total`.
pub const REQUEST_RESULTS: &[&str] = &["ok", "refused", "client-gone", "timeout", "error"];
/// `reason` of `smart_git_proxy_refusals_total`: the connection limit's, and those of
/// `http::Error`.
pub const REFUSAL_REASONS: &[&str] = &[
    "connections",
    "unknown-endpoint",
    "invalid-path",
    "not-found",
    "push",
    "dumb-http",
    "method",
    "body-too-large",
    "body-encoding",
    "body-unreadable",
    "malformed",
    "shutting-down",
    "busy",
    "body-timeout",
    "host-not-allowed",
    "auth-required",
    "upstream",
    "internal",
];
/// `status` of `smart_git_proxy_served_total` (`X-Git-Proxy-Status`).
pub const SERVED: &[&str] = &["clone", "sync", "hit", "stale"];
/// `status` of `smart_git_proxy_mirror_updates_total` and `smart_git_proxy_parent_fetches_total`.
pub const MIRROR_UPDATES: &[&str] = &["clone", "sync", "stale", "failed"];
/// `result` of `smart_git_proxy_pack_cache_lookups_total`.
pub const PACK_CACHE_LOOKUPS: &[&str] = &["hit", "shared", "miss", "bypass"];
/// `result` of `smart_git_proxy_maintenance_total` and
/// `smart_git_proxy_github_app_tokens_total`.
pub const OK_FAILED: &[&str] = &["ok", "failed"];

/// Every counter, with each value of its labels, and the gauges of events, at 0: a dashboard's
/// rate over them is 0 from the start rather than "No data" until the first event.
fn zero() {
    use metrics::counter;
    for name in [
        "smart_git_proxy_pack_objects_total",
        "smart_git_proxy_pack_bytes_total",
        "smart_git_proxy_upstream_bytes_total",
        "smart_git_proxy_pack_cache_served_bytes_total",
        "smart_git_proxy_pack_cache_evictions_total",
        "smart_git_proxy_mirror_evictions_total",
    ] {
        counter!(name).absolute(0);
    }
    for command in COMMANDS {
        for result in REQUEST_RESULTS {
            counter!("smart_git_proxy_requests_total", "command" => *command, "result" => *result)
                .absolute(0);
        }
    }
    let labelled: [(&'static str, &'static str, &[&'static str]); 8] = [
        ("smart_git_proxy_refusals_total", "reason", REFUSAL_REASONS),
        ("smart_git_proxy_served_total", "status", SERVED),
        (
            "smart_git_proxy_mirror_updates_total",
            "status",
            MIRROR_UPDATES,
        ),
        (
            "smart_git_proxy_parent_fetches_total",
            "status",
            MIRROR_UPDATES,
        ),
        (
            "smart_git_proxy_pack_cache_lookups_total",
            "result",
            PACK_CACHE_LOOKUPS,
        ),
        ("smart_git_proxy_maintenance_total", "result", OK_FAILED),
        (
            "smart_git_proxy_github_app_tokens_total",
            "result",
            OK_FAILED,
        ),
        (
            "smart_git_proxy_prewarm_total",
            "result",
            crate::prewarm::RESULTS,
        ),
    ];
    for (name, label, values) in labelled {
        for value in values {
            counter!(name, label => *value).absolute(0);
        }
    }
    metrics::gauge!("smart_git_proxy_requests_in_flight").set(0.0);
    metrics::gauge!("smart_git_proxy_buffered_body_bytes").set(0.0);
}

/// Bucket bounds of every `*_seconds` histogram: from a cached ref listing to a cold clone.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// `# HELP` lines for every family.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "smart_git_proxy_requests_total",
        "Requests by command (info-refs, ls-refs, fetch, upload-pack, lfs) and result (ok, refused, client-gone, timeout, error)"
    );
    describe_counter!(
        "smart_git_proxy_refusals_total",
        "Requests answered with an error status before upload-pack ran, by reason"
    );
    describe_histogram!(
        "smart_git_proxy_request_seconds",
        "Time to the start of the answer, by command"
    );
    describe_gauge!(
        "smart_git_proxy_requests_in_flight",
        "Requests whose answer has not started yet"
    );
    describe_counter!(
        "smart_git_proxy_pack_objects_total",
        "Objects sent in packs"
    );
    describe_counter!("smart_git_proxy_pack_bytes_total", "Pack bytes sent");
    describe_counter!(
        "smart_git_proxy_mirror_updates_total",
        "Mirror creations and syncs by status (clone, sync, stale, failed)"
    );
    describe_histogram!(
        "smart_git_proxy_mirror_update_seconds",
        "Duration of mirror creations and syncs, by status"
    );
    describe_counter!(
        "smart_git_proxy_upstream_bytes_total",
        "Pack bytes fetched from upstreams"
    );
    describe_counter!(
        "smart_git_proxy_webhook_syncs_total",
        "Push webhooks and warm-up requests by outcome (sync, clone, hit, stale, failed, ignored, duplicate, unauthorized, forwarded)"
    );
    describe_counter!(
        "smart_git_proxy_webhook_forwards_total",
        "Webhooks re-sent to BALANCER_URL, by result (ok, failed)"
    );
    describe_counter!(
        "smart_git_proxy_parent_fetches_total",
        "Mirror creations and syncs from PARENT_PROXY, by status (clone, sync, stale, failed)"
    );
    describe_counter!(
        "smart_git_proxy_maintenance_total",
        "Mirror maintenance runs by result (ok, failed)"
    );
    describe_counter!(
        "smart_git_proxy_github_app_tokens_total",
        "GitHub App installation tokens minted, by result (ok, failed: the previous token is used while valid)"
    );
    describe_counter!(
        "smart_git_proxy_pack_cache_lookups_total",
        "Pack-cache lookups by result (hit, shared, miss, bypass)"
    );
    describe_counter!(
        "smart_git_proxy_prewarm_total",
        "Checkout packs prewarmed after syncs, by result (generated, cached, superseded, cache-off, no-room, limit, failed)"
    );
    describe_counter!(
        "smart_git_proxy_pack_cache_served_bytes_total",
        "Pack bytes read from the pack cache for clients"
    );
    describe_gauge!(
        "smart_git_proxy_pack_cache_entries",
        "Packs in the pack cache"
    );
    describe_gauge!(
        "smart_git_proxy_pack_cache_bytes",
        "Bytes in the pack cache"
    );
    describe_counter!(
        "smart_git_proxy_pack_cache_evictions_total",
        "Packs evicted from the pack cache"
    );
    describe_counter!(
        "smart_git_proxy_served_total",
        "info/refs and upload-pack answers by X-Git-Proxy-Status (clone, sync, hit, stale)"
    );
    describe_gauge!("smart_git_proxy_mirrors", "Mirrors on disk");
    describe_gauge!(
        "smart_git_proxy_snapshots",
        "Mirrors whose snapshot (refs, advertisement) is held in memory"
    );
    describe_gauge!(
        "smart_git_proxy_snapshot_bytes",
        "Estimated memory of the snapshots held, bounded by SNAPSHOT_MEMORY"
    );
    describe_gauge!(
        "smart_git_proxy_mirror_bytes",
        "Bytes of the mirrors on disk (the pack cache not included)"
    );
    describe_gauge!(
        "smart_git_proxy_mirror_max_bytes",
        "MIRROR_MAX_SIZE in bytes, for mirrors and pack cache together (absent when unset)"
    );
    describe_counter!(
        "smart_git_proxy_mirror_evictions_total",
        "Mirrors deleted, least recently used first, to stay under MIRROR_MAX_SIZE"
    );
    describe_gauge!(
        "smart_git_proxy_pack_memory_reserved_bytes",
        "Delta-base cache memory taken from PACK_MEMORY_BUDGET"
    );
    describe_gauge!(
        "smart_git_proxy_buffered_body_bytes",
        "Request-body memory taken from MAX_BUFFERED_BODIES"
    );
    describe_gauge!(
        "smart_git_proxy_build_info",
        "The running version (always 1)"
    );
    process_collector().describe();
}

/// The `process_*` families (resident memory, open files, threads, CPU time).
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The text exposition of every metric.
pub fn render() -> String {
    process_collector().collect();
    handle().map(|h| h.render()).unwrap_or_default()
}

/// A request was refused before upload-pack ran (`reason`: a closed set, see the caller).
pub fn refusal(reason: &'static str) {
    debug_assert!(REFUSAL_REASONS.contains(&reason), "{reason}");
    metrics::counter!("smart_git_proxy_refusals_total", "reason" => reason).increment(1);
}

/// A GitHub App installation token was minted (`ok`) or could not be (`failed`).
pub fn app_token(result: &'static str) {
    debug_assert!(OK_FAILED.contains(&result), "{result}");
    metrics::counter!("smart_git_proxy_github_app_tokens_total", "result" => result).increment(1);
}

/// A request's answer started after `elapsed`.
pub fn answered(command: &'static str, elapsed: Duration) {
    metrics::histogram!("smart_git_proxy_request_seconds", "command" => command)
        .record(elapsed.as_secs_f64());
}

/// Requests whose answer has not started: +1 when one arrives, -1 when it is answered.
pub fn in_flight(delta: f64) {
    metrics::gauge!("smart_git_proxy_requests_in_flight").increment(delta);
}

/// A maintenance run ended (`ok` or `failed`).
pub fn maintenance(result: &'static str) {
    debug_assert!(OK_FAILED.contains(&result), "{result}");
    metrics::counter!("smart_git_proxy_maintenance_total", "result" => result).increment(1);
}

/// A request finished: `command` is `info-refs`, `ls-refs`, `fetch`, `upload-pack` or `lfs`;
/// `result` is `ok`, `refused`, `client-gone` or `error`.
pub fn request(command: &'static str, result: &'static str) {
    debug_assert!(COMMANDS.contains(&command) && REQUEST_RESULTS.contains(&result));
    metrics::counter!("smart_git_proxy_requests_total", "command" => command, "result" => result)
        .increment(1);
}

/// A pack was sent.
pub fn pack(objects: usize, bytes: u64) {
    metrics::counter!("smart_git_proxy_pack_objects_total").increment(objects as u64);
    metrics::counter!("smart_git_proxy_pack_bytes_total").increment(bytes);
}

/// A mirror was created or synced (`clone`, `sync`), or a sync failed (`stale` when the old
/// mirror was served, `failed` when there was none).
pub fn mirror_update(status: &'static str, duration: Duration, bytes: u64) {
    debug_assert!(MIRROR_UPDATES.contains(&status), "{status}");
    metrics::counter!("smart_git_proxy_mirror_updates_total", "status" => status).increment(1);
    metrics::histogram!("smart_git_proxy_mirror_update_seconds", "status" => status)
        .record(duration.as_secs_f64());
    metrics::counter!("smart_git_proxy_upstream_bytes_total").increment(bytes);
}

/// A pack-cache lookup: `hit`, `shared` (attached to a generation in flight), `miss` (started
/// one) or `bypass`.
pub fn pack_cache_lookup(result: &'static str) {
    debug_assert!(PACK_CACHE_LOOKUPS.contains(&result), "{result}");
    metrics::counter!("smart_git_proxy_pack_cache_lookups_total", "result" => result).increment(1);
}

/// `n` prewarms ended with `result` (a closed set: `prewarm::RESULTS`).
pub fn prewarm(result: &'static str, n: u64) {
    metrics::counter!("smart_git_proxy_prewarm_total", "result" => result).increment(n);
}

/// Bytes of pack read from the cache for clients.
pub fn pack_cache_bytes_served(bytes: u64) {
    metrics::counter!("smart_git_proxy_pack_cache_served_bytes_total").increment(bytes);
}

/// The cache's size after a change, and whether an entry was evicted.
pub fn pack_cache_size(entries: usize, bytes: u64) {
    metrics::gauge!("smart_git_proxy_pack_cache_entries").set(entries as f64);
    metrics::gauge!("smart_git_proxy_pack_cache_bytes").set(bytes as f64);
}

/// An entry was evicted to keep the cache under `PACK_CACHE_MAX_SIZE`.
pub fn pack_cache_eviction() {
    metrics::counter!("smart_git_proxy_pack_cache_evictions_total").increment(1);
}

/// A push webhook or warm-up request ended: `outcome` is the sync's status (`sync`, `clone`,
/// `hit`, `stale`), `failed`, `ignored` (no mirror, not allowed, not a push), `unauthorized`
/// or `forwarded`.
pub fn webhook_sync(outcome: &'static str) {
    metrics::counter!("smart_git_proxy_webhook_syncs_total", "outcome" => outcome).increment(1);
}

/// Request-body memory was taken from the budget (positive) or given back (negative).
pub fn buffered_body_bytes(delta: f64) {
    metrics::gauge!("smart_git_proxy_buffered_body_bytes").increment(delta);
}

/// A webhook was re-sent to `BALANCER_URL` (`ok` or `failed`).
pub fn webhook_forward(result: &'static str) {
    metrics::counter!("smart_git_proxy_webhook_forwards_total", "result" => result).increment(1);
}

/// A mirror update fetched from `PARENT_PROXY` ended with `status`.
pub fn parent_fetch(status: &'static str) {
    debug_assert!(MIRROR_UPDATES.contains(&status), "{status}");
    metrics::counter!("smart_git_proxy_parent_fetches_total", "status" => status).increment(1);
}

/// An answer carried `X-Git-Proxy-Status: status`.
pub fn served(status: &'static str) {
    debug_assert!(SERVED.contains(&status), "{status}");
    metrics::counter!("smart_git_proxy_served_total", "status" => status).increment(1);
}

/// The mirrors on disk and their bytes, and `MIRROR_MAX_SIZE` when set, after an eviction pass.
pub fn mirror_disk(mirrors: usize, bytes: u64, limit: Option<u64>) {
    metrics::gauge!("smart_git_proxy_mirrors").set(mirrors as f64);
    metrics::gauge!("smart_git_proxy_mirror_bytes").set(bytes as f64);
    if let Some(limit) = limit {
        metrics::gauge!("smart_git_proxy_mirror_max_bytes").set(limit as f64);
    }
}

/// The mirrors whose snapshot is held in memory, and its estimated bytes.
pub fn snapshots(mirrors: usize, bytes: u64) {
    metrics::gauge!("smart_git_proxy_snapshots").set(mirrors as f64);
    metrics::gauge!("smart_git_proxy_snapshot_bytes").set(bytes as f64);
}

/// A mirror was evicted to stay under `MIRROR_MAX_SIZE`.
pub fn mirror_evicted() {
    metrics::counter!("smart_git_proxy_mirror_evictions_total").increment(1);
}
