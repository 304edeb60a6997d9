//! Prometheus metrics, served at `/metrics`. Labels come from closed sets (no repository
//! names), so that cardinality stays bounded however many repositories are mirrored.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder's handle; the recorder is installed on first use.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics are disabled");
                None
            }
        })
        .as_ref()
}

/// The text exposition of every metric.
pub fn render() -> String {
    metrics::gauge!("smart_git_proxy_pack_memory_reserved_bytes")
        .set(crate::pack::memory_reserved() as f64);
    handle().map(|h| h.render()).unwrap_or_default()
}

/// A request finished: `command` is `info-refs`, `ls-refs`, `fetch`, `upload-pack` or `lfs`;
/// `result` is `ok`, `refused`, `client-gone` or `error`.
pub fn request(command: &'static str, result: &'static str) {
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
    metrics::counter!("smart_git_proxy_mirror_updates_total", "status" => status).increment(1);
    metrics::histogram!("smart_git_proxy_mirror_update_seconds", "status" => status)
        .record(duration.as_secs_f64());
    metrics::counter!("smart_git_proxy_upstream_bytes_total").increment(bytes);
}

/// A pack-cache lookup: `hit`, `shared` (attached to a generation in flight), `miss` (started
/// one) or `bypass`.
pub fn pack_cache_lookup(result: &'static str) {
    metrics::counter!("smart_git_proxy_pack_cache_lookups_total", "result" => result).increment(1);
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
