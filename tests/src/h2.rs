//! An in-process HTTP/2 backend for the upstream-multiplexing tests: cleartext (h2c, prior
//! knowledge) or TLS with its own certificate, counting what a proxy does to it — TCP
//! connections accepted and those that carried requests, TLS handshakes, requests, streams reset by the peer — and able to
//! advertise a small `SETTINGS_MAX_CONCURRENT_STREAMS` or send GOAWAY every N requests.
//!
//! Paths: `/trailers` echoes the request's trailers back as response trailers (gRPC style);
//! `/hang` never answers and counts its stream being reset; anything else answers
//! `{"backend", "version", "authority", "body_bytes"}` after reading the request body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::net::{BoxBody, Seen};

/// How the backend behaves.
#[derive(Debug, Clone, Default)]
pub struct H2Options {
    /// Advertised `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_streams: Option<u32>,
    /// TLS with this chain and key (ALPN `h2` only).
    pub tls: Option<(String, String)>,
    /// Send GOAWAY (graceful: in-flight streams finish) after this many requests on a
    /// connection.
    pub goaway_after: Option<usize>,
}

/// What the backend counted.
#[derive(Debug, Default)]
pub struct H2Counts {
    /// TCP connections accepted (health checks included).
    pub accepted: AtomicUsize,
    /// Connections that carried at least one request.
    pub connections: AtomicUsize,
    pub handshakes: AtomicUsize,
    pub requests: AtomicUsize,
    pub resets: AtomicUsize,
    pub goaways: AtomicUsize,
}

/// The backend.
pub struct H2Backend {
    pub addr: SocketAddr,
    pub counts: Arc<H2Counts>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a `/hang` handler dropped before it finished: its stream was reset.
struct ResetGuard(Arc<H2Counts>);

impl Drop for ResetGuard {
    fn drop(&mut self) {
        self.0.resets.fetch_add(1, Ordering::SeqCst);
    }
}

async fn answer(
    name: String,
    counts: Arc<H2Counts>,
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: req.uri().to_string(),
        version: format!("{:?}", req.version()),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
    });
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let path = req.uri().path().to_owned();
    if path == "/hang" {
        let _guard = ResetGuard(counts);
        std::future::pending::<()>().await;
    }
    let mut body = req.into_body();
    let mut received = 0usize;
    let mut trailers = None;
    while let Some(Ok(frame)) = body.frame().await {
        match frame.into_data() {
            Ok(d) => received += d.len(),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    let text = json!({"backend": name, "version": version, "authority": authority,
        "body_bytes": received})
    .to_string();
    let out: BoxBody = if path == "/trailers" {
        let mut t = trailers.unwrap_or_default();
        t.insert("x-backend", name.parse().expect("header value"));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
            vec![Ok(Frame::data(Bytes::from(text))), Ok(Frame::trailers(t))];
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else {
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed()
    };
    Response::builder()
        .header("x-backend", name.as_str())
        .body(out)
        .expect("response")
}

impl H2Backend {
    pub async fn start(name: &str, options: H2Options) -> H2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(H2Counts::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = options
            .tls
            .as_ref()
            .map(|(chain, key)| crate::net::tls_acceptor(chain, key, &[b"h2"]));
        let (c, s, name) = (counts.clone(), seen.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                let (c, s, name, options, acceptor) = (
                    c.clone(),
                    s.clone(),
                    name.clone(),
                    options.clone(),
                    acceptor.clone(),
                );
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(TokioIo::new(stream), name, c, s, options).await,
                        Some(a) => {
                            let Ok(tls) = a.accept(stream).await else {
                                return;
                            };
                            c.handshakes.fetch_add(1, Ordering::SeqCst);
                            serve(TokioIo::new(tls), name, c, s, options).await
                        }
                    }
                });
            }
        });
        H2Backend {
            addr,
            counts,
            seen,
            task,
        }
    }

    pub fn count(&self, what: fn(&H2Counts) -> &AtomicUsize) -> usize {
        what(&self.counts).load(Ordering::SeqCst)
    }
}

async fn serve<IO>(
    io: IO,
    name: String,
    counts: Arc<H2Counts>,
    seen: Arc<Mutex<Vec<Seen>>>,
    options: H2Options,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let on_conn = Arc::new(AtomicUsize::new(0));
    let goaway = Arc::new(tokio::sync::Notify::new());
    let (oc, ga, limit, c2) = (
        on_conn.clone(),
        goaway.clone(),
        options.goaway_after,
        counts.clone(),
    );
    let svc = service_fn(move |req: Request<Incoming>| {
        c2.requests.fetch_add(1, Ordering::SeqCst);
        let n = oc.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            c2.connections.fetch_add(1, Ordering::SeqCst);
        }
        if limit == Some(n) {
            ga.notify_one();
        }
        let (name, counts, seen) = (name.clone(), c2.clone(), seen.clone());
        async move { Ok::<_, Infallible>(answer(name, counts, seen, req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(options.max_streams);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = goaway.notified() => {}
    }
    counts.goaways.fetch_add(1, Ordering::SeqCst);
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
