//! Serving an axum router (the worker's admin listener, `sluice-api`'s REST API) on hyper's
//! HTTP/1.1 and HTTP/2 server with what `axum::serve` leaves out: a deadline on reading each
//! request head (a client that connects and sends nothing, or dribbles its headers, is closed
//! after [`HEADER_TIMEOUT`]) and on graceful shutdown. Each request carries the client address
//! as axum's `ConnectInfo<SocketAddr>`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How long a client may take to send a request head, the first one counted from the
/// connection; also how long an HTTP/1.1 connection may wait for its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// After the shutdown signal, how long open connections may take to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until `shutdown` completes, then let open connections finish
/// (within [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::listener::accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(req)
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("connections still open after the shutdown grace period; closing them");
    }
}
