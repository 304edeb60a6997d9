//! The Git LFS cache's metrics (`smart_git_proxy_lfs_*`), with closed label sets.

use super::Source;

/// `# HELP` lines of the cache's families, and their zeroes, so that a rate over them is 0
/// rather than empty.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        "smart_git_proxy_lfs_objects_total",
        "Git LFS object requests answered, by result: hit (from the cache), miss (started an upstream download), shared (joined another request's download)"
    );
    describe_counter!(
        "smart_git_proxy_lfs_served_bytes_total",
        "Git LFS object bytes sent to clients, by source: cache (stored objects) or upstream (downloads in progress)"
    );
    describe_counter!(
        "smart_git_proxy_lfs_upstream_bytes_total",
        "Git LFS object bytes downloaded from upstream storage"
    );
    describe_counter!(
        "smart_git_proxy_lfs_downloads_total",
        "Git LFS upstream downloads by result: ok, failed, stalled, corrupt (wrong SHA-256 or size: not cached), local"
    );
    describe_counter!(
        "smart_git_proxy_lfs_verification_failures_total",
        "Git LFS downloads refused because their SHA-256 or size did not match the OID"
    );
    describe_counter!(
        "smart_git_proxy_lfs_evictions_total",
        "Git LFS objects evicted from the cache (LFS_CACHE_MAX_SIZE)"
    );
    describe_counter!(
        "smart_git_proxy_lfs_links_refused_total",
        "Proxy object links refused, by reason: expired, signature, malformed"
    );
    describe_counter!(
        "smart_git_proxy_lfs_batches_total",
        "Git LFS download batch requests by answer: rewritten, upstream (an error or unknown answer passed on)"
    );
    describe_gauge!(
        "smart_git_proxy_lfs_cache_objects",
        "Objects in the Git LFS cache"
    );
    describe_gauge!(
        "smart_git_proxy_lfs_cache_bytes",
        "Bytes in the Git LFS cache"
    );
    for result in ["hit", "miss", "shared"] {
        metrics::counter!("smart_git_proxy_lfs_objects_total", "result" => result).absolute(0);
    }
    metrics::counter!("smart_git_proxy_lfs_verification_failures_total").absolute(0);
    metrics::counter!("smart_git_proxy_lfs_evictions_total").absolute(0);
}

pub(super) fn object(source: Source) {
    metrics::counter!("smart_git_proxy_lfs_objects_total", "result" => source.as_str())
        .increment(1);
}

pub(super) fn served_bytes(source: &'static str, n: u64) {
    metrics::counter!("smart_git_proxy_lfs_served_bytes_total", "source" => source).increment(n);
}

pub(super) fn upstream_bytes(n: u64) {
    metrics::counter!("smart_git_proxy_lfs_upstream_bytes_total").increment(n);
}

pub(super) fn download(result: &'static str) {
    metrics::counter!("smart_git_proxy_lfs_downloads_total", "result" => result).increment(1);
}

pub(super) fn verification_failed() {
    metrics::counter!("smart_git_proxy_lfs_verification_failures_total").increment(1);
}

pub(super) fn evicted(n: usize) {
    metrics::counter!("smart_git_proxy_lfs_evictions_total").increment(n as u64);
}

pub(super) fn link_refused(reason: &'static str) {
    metrics::counter!("smart_git_proxy_lfs_links_refused_total", "reason" => reason).increment(1);
}

/// A batch request answered: `rewritten` or `upstream`.
pub(super) fn batch(answer: &'static str) {
    metrics::counter!("smart_git_proxy_lfs_batches_total", "answer" => answer).increment(1);
}

pub(super) fn usage(objects: usize, bytes: u64) {
    metrics::gauge!("smart_git_proxy_lfs_cache_objects").set(objects as f64);
    metrics::gauge!("smart_git_proxy_lfs_cache_bytes").set(bytes as f64);
}
