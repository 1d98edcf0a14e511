//! Serving an axum router (the worker's admin listener, `sluice-api`'s REST API) on hyper's
//! HTTP/1.1 and HTTP/2 server with what `axum::serve` leaves out: deadlines on every
//! connection and a graceful shutdown. A client that connects and sends nothing is closed after
//! the header timeout (hyper's protocol detection has no deadline of its own); one that
//! dribbles an HTTP/1.1 head, or waits between requests, after the header timeout (hyper's);
//! a connection with no request in flight for the idle timeout is closed gracefully (for
//! HTTP/2, a GOAWAY: hyper has no idle timeout there). A response still streaming (server-sent
//! events) counts as in flight. Each request carries the client address as axum's
//! `ConnectInfo<SocketAddr>`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::idle::Requests;

/// How long a client may take to send a request head, the first one counted from the
/// connection; also how long an HTTP/1.1 connection may wait for its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection (HTTP/2's in particular) may have no request in flight.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// After the shutdown signal, how long open connections may take to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The deadlines of [`serve_with`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: HEADER_TIMEOUT,
            idle: IDLE_TIMEOUT,
        }
    }
}

/// Serve `router` on `listener` until `shutdown` completes, then let open connections finish
/// (within [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
    serve_with(listener, router, shutdown, Timeouts::default()).await;
}

/// [`serve`] with other deadlines.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
    timeouts: Timeouts,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    builder.http2().timer(TokioTimer::new());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::listener::accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        tracker.spawn(connection(
            builder.clone(),
            stream,
            peer,
            router.clone(),
            timeouts,
            stop.clone(),
        ));
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!("connections still open after the shutdown grace period; closing them");
    }
}

/// Serve one connection until it ends, closing it gracefully when idle or on `stop`.
async fn connection(
    builder: auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    timeouts: Timeouts,
    stop: CancellationToken,
) {
    // A peek, not `readable()`: a fresh socket can report readiness with nothing to read.
    let mut byte = [0u8; 1];
    let first = tokio::select! {
        first = tokio::time::timeout(timeouts.header, stream.peek(&mut byte)) => first,
        () = stop.cancelled() => return,
    };
    if !matches!(first, Ok(Ok(1))) {
        tracing::debug!(%peer, "nothing sent within the header timeout; closing");
        return;
    }
    let requests = Arc::new(Requests::default());
    let service = {
        let requests = requests.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let in_flight = requests.start();
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let answer = router.clone().oneshot(req);
            async move {
                let resp = answer.await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|body| crate::idle::hold(body, in_flight)),
                )
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let idle = requests.idle(timeouts.idle);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = &mut idle, if !closing => {
                tracing::debug!(%peer, "idle HTTP connection; closing");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::AsyncReadExt;

    /// A server with short deadlines, answering `ok` on `/`.
    async fn start(timeouts: Timeouts) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve_with(
            listener,
            router,
            std::future::pending(),
            timeouts,
        ));
        addr
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_closed_after_the_header_timeout() {
        let addr = start(Timeouts {
            header: Duration::from_millis(300),
            idle: Duration::from_secs(60),
        })
        .await;
        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("closed within the bound");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
        let idle = Duration::from_millis(400);
        let addr = start(Timeouts {
            header: Duration::from_secs(10),
            idle,
        })
        .await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("handshake");
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get("http://a/")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("answered");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        let served = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the server closed the idle connection")
            .expect("task")
            .expect("a clean close (GOAWAY)");
        assert!(served.elapsed() >= idle - Duration::from_millis(50));
    }
}
