//! The HTTP/1 server loop behind both listeners, with the limits `axum::serve`
//! does not offer: a client must send its request head within
//! [`HEADER_READ_TIMEOUT`], at most [`MAX_CONNECTIONS`] are open at once, and a
//! stop closes idle connections and ends when in-flight requests finish. The
//! caller bounds that last wait, so a stuck client can never hold the process
//! past its stop timeout.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections per listener; further clients wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 512;

/// Serves `app` on `listener` until `stop`, then closes idle connections and
/// waits for in-flight requests (the caller puts a time limit on it).
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A body's last segment goes out at once, not after the client's
                    // delayed acknowledgement (Nagle's algorithm would hold it up to
                    // 40 ms).
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors are the client's (reset, timeout): nothing to do but close.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
