//! `/readyz`: whether this node should be sent work. (`/healthz`, liveness, is answered by
//! the router itself.)

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;

/// Readiness: 200 when the server takes work and `MIRROR_DIR` is writable (a probe file is
/// created and removed) with room to spare (the pack cache's floor: 256 MiB free, or a tenth
/// of a smaller filesystem), 503 with the reason otherwise.
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let dir = state.config.mirror_dir.clone();
    if let Ok(true) =
        tokio::task::spawn_blocking(move || crate::pack::cache::low_on_space(&dir)).await
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "MIRROR_DIR is nearly full (under 256 MiB, or a tenth of its filesystem, free)\n"
                .into(),
        );
    }
    // One file per probe: overlapping probes (a kubelet's and a balancer's) must not remove
    // each other's.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let probe = state.config.mirror_dir.join(format!(
        ".readyz-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = tokio::task::spawn_blocking(move || {
        std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe))
    })
    .await;
    match written {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("MIRROR_DIR is not writable: {e}\n"),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}
