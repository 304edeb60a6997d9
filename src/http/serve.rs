//! The accept loop: HTTP/1 connections served by hyper directly, within the limits a hostile
//! client must meet, and drained on shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::Request;
use tokio::sync::Semaphore;

use super::{router, AppState};

/// Serve `router(state)` on `listener` until `shutdown` completes, then let the open
/// connections finish, for at most `SHUTDOWN_GRACE`.
///
/// HTTP/1 connections are served by hyper directly, not `axum::serve`, for the limits a
/// hostile client must meet: `HEADER_READ_TIMEOUT` (which also closes idle keep-alive
/// connections), `CLIENT_STALL_TIMEOUT` (a connection that takes no byte of its answer that
/// long is closed) and `MAX_CONNECTIONS`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = Arc::clone(&state.config);
    let draining = Arc::clone(&state.draining);
    let app = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(*config.header_read_timeout);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: let connections close before the next try.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            // Shed: a short answer, not a wait, so that the client retries elsewhere or later.
            crate::metrics::refusal("connections");
            let _ = stream.try_write(SHED_RESPONSE);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Requests carry their client's address, for the request log line.
        let peer = stream.peer_addr().ok();
        let service = hyper_util::service::TowerToHyperService::new(
            tower::ServiceExt::map_request(app.clone(), move |mut req: Request<_>| {
                if let Some(peer) = peer {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                }
                req
            }),
        );
        // Progress resets the timer: a slow reader is served, a client that reads nothing is
        // cut off, whatever it holds (a stream slot, the connection).
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(*config.client_stall_timeout));
        let io = hyper_util::rt::TokioIo::new(Box::pin(stream));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    draining.store(true, Ordering::Relaxed);
    drop(listener);
    if tokio::time::timeout(*config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after SHUTDOWN_GRACE are cut off");
    }
    Ok(())
}

/// The answer to a connection over `MAX_CONNECTIONS`.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain\r\nContent-Length: 42\r\nConnection: close\r\n\r\n\
server busy (too many connections); retry\n";
