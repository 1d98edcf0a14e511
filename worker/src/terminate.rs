//! TLS termination: finish the handshake with the host's certificate (rustls, ALPN
//! `h2,http/1.1`, TLS 1.2 and 1.3, session tickets), then serve HTTP/2 or HTTP/1.1 and proxy
//! each request to the backend of the host its `Host`/`:authority` names. A request for a host
//! this connection's certificate does not serve gets 421, so browsers that coalesced an HTTP/2
//! connection across names of one wildcard certificate retry on a new connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::ProducesTickets;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sluice_shared::{BackendTls, Host, Protocol, Server};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::h2pool::{Acquired, Opened};
use crate::headers::{host_name, strip_hop_by_hop, Forward, ForwardedValues, Forwarding};
use crate::pool::{PoolKey, Returning};
use crate::prefixed::Prefixed;
use crate::runtime::Runtime;
use crate::upstream::{connect_server, UpstreamError};
use crate::upstream_h2::Failure;
use crate::upstream_tls::Upstream;
use crate::Worker;

/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the upstream to answer with headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request header block (431 beyond).
pub const MAX_HEADERS: usize = 16 * 1024;
/// HTTP/2 streams a client may have open at once.
pub const MAX_STREAMS: u32 = 250;

/// Errors of response bodies (hyper's, h2's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the worker sends.
pub type ResBody = BoxBody<Bytes, BoxError>;

/// Session tickets are encrypted with keys shared by every configuration of this process, so
/// resumption survives snapshot switches.
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| rustls::crypto::ring::Ticketer::new().ok())
        .clone()
}

/// Build the rustls server configuration for one certificate.
pub fn server_config(key: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>, rustls::Error> {
    #[derive(Debug)]
    struct One(Arc<CertifiedKey>);
    impl rustls::server::ResolvesServerCert for One {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(One(key)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if let Some(t) = ticketer() {
        config.ticketer = t;
        config.send_tls13_tickets = 2;
    }
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(Arc::new(config))
}

/// What every request on one terminated connection shares.
struct Conn {
    worker: Arc<Worker>,
    rt: Arc<Runtime>,
    /// The certificate this connection was handshaken with.
    certificate: Uuid,
    peer: SocketAddr,
    /// This connection's `X-Forwarded-For` and `-Port` values.
    forwarded: ForwardedValues,
    /// Response deadlines, reused from one request to the next.
    timers: crate::deadline::Timers,
}

fn local_response(status: StatusCode, text: &str) -> Response<ResBody> {
    let body = Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serve one connection whose SNI named the terminate host `host`.
pub async fn serve(
    worker: Arc<Worker>,
    rt: Arc<Runtime>,
    stream: TcpStream,
    peeked: Vec<u8>,
    host: Host,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let Some(certificate) = rt.host_certificates.get(&host.id).copied() else {
        return;
    };
    let Some(config) = rt.server_configs.get(&certificate).cloned() else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    // The first poll answers the ClientHello (key exchange, signature: the costly part), and
    // waits for its turn so requests on open connections are not queued behind a burst of
    // handshakes (`heavy.rs`).
    let mut tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        crate::heavy::gate(acceptor.accept(Prefixed::new(peeked, stream))),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            worker.metrics.closed(crate::metrics::Closed::Handshake);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            worker.metrics.closed(crate::metrics::Closed::Handshake);
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // An idle connection (a browser's preconnect) costs only its TLS state until its first
    // request: hyper's buffers (8 KiB each way) and request state are set up when bytes arrive.
    let waiting = worker.metrics.awaiting_first_request();
    if !first_bytes_arrived(&mut tls, worker.header_timeout).await {
        return;
    }
    drop(waiting);
    let conn = Arc::new(Conn {
        forwarded: ForwardedValues::new(
            peer.ip(),
            worker.public_https_port.unwrap_or(local.port()),
        ),
        worker: worker.clone(),
        rt,
        certificate,
        peer,
        timers: Default::default(),
    });
    // The requests in flight, so a connection idle for the idle timeout can be closed.
    let requests = Arc::new(crate::idle::Requests::default());
    let idle = requests.idle(worker.idle_timeout);
    let result: Result<(), BoxError> = if h2 {
        // Each stream's request runs inside the connection's task (crate::serve_h2). Boxed:
        // the stream's future is moved a few times on its way into the connection's set of
        // streams, a pointer is cheaper to move than the whole state machine.
        let handler = |req: Request<crate::h2body::Recv>| {
            let conn = conn.clone();
            let in_flight = requests.start();
            Box::pin(async move {
                handle(conn, req.map(ReqBody::Http2), false)
                    .await
                    .map(|body| crate::idle::hold(body, in_flight))
            })
        };
        let limits = crate::serve_h2::Limits {
            max_streams: MAX_STREAMS,
            max_header_list: MAX_HEADERS as u32,
            grace: worker.header_timeout,
        };
        // Boxed: inline, the HTTP/2 connection's state would be part of every connection's
        // task from its start, idle ones and HTTP/1.1 ones included (+2 KiB each, measured).
        Box::pin(crate::serve_h2::serve(tls, limits, handler, idle))
            .await
            .map_err(BoxError::from)
    } else {
        // Boxed: hyper keeps a slot for the in-flight request's future for the whole
        // connection; a pointer there instead of the whole state machine (several KiB) keeps
        // idle keep-alive connections small.
        let service = {
            let requests = requests.clone();
            service_fn(move |req: Request<Incoming>| {
                let conn = conn.clone();
                let in_flight = requests.start();
                let length_conflict = in_flight.length_conflict();
                Box::pin(async move {
                    let resp = handle(conn, req.map(ReqBody::Http1), length_conflict).await;
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        in_flight.upgraded();
                    }
                    Ok::<_, Infallible>(resp.map(|body| crate::idle::hold(body, in_flight)))
                })
            })
        };
        // hyper's header timer would also end idle keep-alive connections (it runs whenever
        // hyper waits for a head); the header timeout runs in the stream instead, from a
        // head's first byte, and the idle timeout here.
        let io = crate::idle::HeadDeadline::new(tls, requests.clone(), worker.header_timeout);
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_HEADERS)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result.map_err(BoxError::from),
            () = idle => {
                tracing::debug!(%peer, "idle HTTP/1.1 connection; closing");
                Ok(())
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Wait, within the header read timeout, until the client has sent something after the
/// handshake: plaintext already decrypted along with the handshake's last flight, or new bytes on
/// the socket (a stale readiness only starts hyper early). False: nothing came, or the TLS
/// stream is broken; the connection is closed.
async fn first_bytes_arrived(
    tls: &mut tokio_rustls::server::TlsStream<Prefixed>,
    timeout: Duration,
) -> bool {
    let (socket, session) = tls.get_mut();
    match session.process_new_packets() {
        Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => true,
        Ok(_) => matches!(
            tokio::time::timeout(timeout, socket.get_ref().readable()).await,
            Ok(Ok(()))
        ),
        Err(_) => false,
    }
}

/// A client's request body: hyper's (HTTP/1.1) or an h2 stream's (HTTP/2).
pub enum ReqBody {
    Http1(Incoming),
    Http2(crate::h2body::Recv),
}

impl hyper::body::Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Http1(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BoxError::from))),
            ReqBody::Http2(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Http1(b) => b.is_end_stream(),
            ReqBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ReqBody::Http1(b) => b.size_hint(),
            ReqBody::Http2(b) => b.size_hint(),
        }
    }
}

/// A request body that says when it has been sent whole, so the response timeout can start then
/// (a long upload is not a slow server).
pub struct Watched {
    /// `None`: no body (a request sent again on a fresh HTTP/2 stream).
    inner: Option<ReqBody>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Watched {
    /// The receiver fires once the body has been sent whole; `None`: there is no body left to
    /// send (no channel is made for the common bodiless request).
    pub(crate) fn new(
        inner: Option<ReqBody>,
    ) -> (Watched, Option<tokio::sync::oneshot::Receiver<()>>) {
        let mut w = Watched { inner, done: None };
        if hyper::body::Body::is_end_stream(&w) {
            return (w, None);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.done = Some(tx);
        (w, Some(rx))
    }

    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            self.finish();
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.finish(),
            std::task::Poll::Ready(Some(Ok(_))) if self.is_end_stream() => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Route, rewrite and proxy one request; every failure becomes a short local response.
/// Route and proxy one request; `length_conflict`: its head had both `Content-Length` and
/// `Transfer-Encoding` (HTTP/1.1), refused with 400 before anything else.
async fn handle(
    conn: Arc<Conn>,
    mut req: Request<ReqBody>,
    length_conflict: bool,
) -> Response<ResBody> {
    // Each request sees the snapshot in force when it arrives, never a mix.
    let rt = conn
        .worker
        .current
        .load()
        .unwrap_or_else(|| conn.rt.clone());
    // As a header value: the `Host` passed on (an HTTP/1.1 client's is shared, not copied).
    let authority = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(http::header::HOST).cloned(),
    }
    .unwrap_or_else(|| HeaderValue::from_static(""));
    let name = host_name(authority.to_str().unwrap_or_default());
    // The access line's fields, its start time included, are taken only when that line is
    // enabled: reading the clock is not free either (see `pool::Stamp`).
    let logged =
        tracing::enabled!(target: "sluice_worker::access", tracing::Level::INFO).then(|| {
            (
                Instant::now(),
                req.method().clone(),
                req.uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            )
        });
    let host = rt
        .host_labelled(&name)
        .filter(|(h, _)| rt.host_certificates.get(&h.id) == Some(&conn.certificate));
    let label = host.map(|(_, label)| label);
    let mut error = None;
    let (response, upstream) = match host {
        // hyper reads such a body as chunked and closes the connection after the answer; the
        // request is refused outright (a smuggling attempt, or a broken client).
        _ if length_conflict => {
            let mut resp = local_response(
                StatusCode::BAD_REQUEST,
                "request has both Content-Length and Transfer-Encoding",
            );
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            (resp, None)
        }
        None => (
            local_response(StatusCode::MISDIRECTED_REQUEST, "misdirected request"),
            None,
        ),
        Some((host, _)) => {
            let upgrade = upgrade_of(&req);
            // Whether trailers can reach the client (always over HTTP/2; an HTTP/1.1 client
            // says so with `TE: trailers`); if so the backend is told it may send them (an
            // HTTP/1.1 server, hyper's for one, keeps them to itself otherwise).
            let te_trailers = req.version() == http::Version::HTTP_2 || wants_trailers(&req);
            let forward = Forward::new(
                req.headers_mut(),
                &Forwarding {
                    connection: &conn.forwarded,
                    host: &authority,
                    rules: &host.request_headers,
                },
                te_trailers,
            );
            // The request path's large futures are awaited pinned where they are made
            // (`pin!`, here and in `proxy`): a plain `.await` moves the callee's future into
            // the caller's state and rustc keeps room for it twice (rust-lang/rust#59087,
            // #62958). Measured: the per-request future (boxed whole for every request, so
            // this is memory per request in flight) 11,336 -> 4,544 bytes; instructions per
            // request -0.3% (h2) to -1% (h1) alone, within the +-1% that inlining moves them
            // from one build to the next.
            let result = pin!(proxy(&conn, &rt, host, req, &forward, upgrade)).await;
            match result {
                Ok((resp, server)) => (resp, Some(server)),
                Err(e) => {
                    let answer = (e.response(), e.server());
                    error = Some(e);
                    answer
                }
            }
        }
    };
    conn.worker
        .metrics
        .request(label, response.status().as_u16());
    if let Some((start, method, path)) = logged {
        tracing::info!(
            target: "sluice_worker::access",
            client = %conn.peer, host = %name, %method, %path, status = response.status().as_u16(),
            upstream = upstream.as_deref().unwrap_or("-"), total_ms = start.elapsed().as_secs_f64() * 1000.0,
            error = error.as_ref().map(tracing::field::display),
            "request"
        );
    }
    response
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("upstream {server}: {reason}")]
    Exchange { server: Arc<str>, reason: String },
    /// The connection failed before any response: an idempotent request without a body may be
    /// sent again.
    #[error("upstream {server}: {reason}")]
    Reset { server: Arc<str>, reason: String },
    #[error("upstream {server} did not answer in time")]
    Timeout { server: Arc<str> },
    #[error("backend protocol {0} is not served yet")]
    Unsupported(&'static str),
}

impl ProxyError {
    fn response(&self) -> Response<ResBody> {
        match self {
            ProxyError::Upstream(UpstreamError::NoServer) => {
                local_response(StatusCode::SERVICE_UNAVAILABLE, "no server available")
            }
            ProxyError::Upstream(_)
            | ProxyError::Exchange { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Unsupported(_) => local_response(StatusCode::BAD_GATEWAY, "bad gateway"),
            ProxyError::Timeout { .. } => {
                local_response(StatusCode::GATEWAY_TIMEOUT, "gateway timeout")
            }
        }
    }

    fn server(&self) -> Option<Arc<str>> {
        match self {
            ProxyError::Exchange { server, .. }
            | ProxyError::Reset { server, .. }
            | ProxyError::Timeout { server } => Some(server.clone()),
            ProxyError::Upstream(UpstreamError::Connect { server, .. }) => {
                Some(Arc::from(server.as_str()))
            }
            _ => None,
        }
    }
}

/// Open an HTTP/1.1 client connection over `io`; the connection runs in its own task.
async fn h1_handshake<IO>(
    io: IO,
) -> Result<hyper::client::conn::http1::SendRequest<Watched>, hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

/// TLS to `server` with `config`, with the connect timeout.
async fn tls_connect(
    server: &Server,
    config: &Arc<rustls::ClientConfig>,
    settings: &BackendTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let failed = |reason: String| UpstreamError::Connect {
        server: server.address.to_string(),
        reason,
    };
    let stream = connect_server(server).await?;
    let name = crate::upstream_tls::server_name(settings, server).map_err(failed)?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    tokio::time::timeout(
        crate::upstream::CONNECT_TIMEOUT,
        connector.connect(name, stream),
    )
    .await
    .map_err(|_| failed("TLS handshake timed out".into()))?
    .map_err(|e| failed(format!("TLS handshake: {e}")))
}

/// A new HTTP/1.1 upstream connection to `server`: TCP, then TLS for `https` backends.
async fn open(
    server: &Server,
    tls: Option<(&Arc<rustls::ClientConfig>, &BackendTls)>,
) -> Result<hyper::client::conn::http1::SendRequest<Watched>, UpstreamError> {
    let failed = |reason: String| UpstreamError::Connect {
        server: server.address.to_string(),
        reason,
    };
    match tls {
        None => h1_handshake(connect_server(server).await?)
            .await
            .map_err(|e| failed(e.to_string())),
        Some((config, settings)) => h1_handshake(tls_connect(server, config, settings).await?)
            .await
            .map_err(|e| failed(e.to_string())),
    }
}

/// A new multiplexed upstream connection to `server`: HTTP/2 with prior knowledge for `h2c`,
/// or TLS offering `h2, http/1.1` for `https` (HTTP/1.1 when the server picks it).
async fn open_h2(
    server: &Server,
    tls: Option<(&Upstream, &BackendTls)>,
    windows: crate::h2pool::Windows,
) -> Result<Opened, UpstreamError> {
    let failed = |reason: String| UpstreamError::Connect {
        server: server.address.to_string(),
        reason,
    };
    match tls {
        None => crate::h2pool::handshake(connect_server(server).await?, windows)
            .await
            .map(Opened::H2)
            .map_err(|e| failed(format!("HTTP/2 handshake: {e}"))),
        Some((upstream, settings)) => {
            let tls = tls_connect(server, &upstream.config_h2, settings).await?;
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                crate::h2pool::handshake(tls, windows)
                    .await
                    .map(Opened::H2)
                    .map_err(|e| failed(format!("HTTP/2 handshake: {e}")))
            } else {
                h1_handshake(tls)
                    .await
                    .map(Opened::H1)
                    .map_err(|e| failed(e.to_string()))
            }
        }
    }
}

/// The request's path and query (`/` if it has none), sharing the request's buffer.
pub(crate) fn path_or_root(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade`), if it is one.
fn upgrade_of(req: &Request<ReqBody>) -> Option<HeaderValue> {
    let connection_upgrade = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if connection_upgrade && req.version() == http::Version::HTTP_11 {
        req.headers().get(http::header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Whether the client asked for trailers (`TE: trailers`), which HTTP/2 upstreams may need.
fn wants_trailers(req: &Request<ReqBody>) -> bool {
    req.headers()
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// An upstream connection ready for one request.
enum Chosen {
    /// An HTTP/1.1 connection of our own for a request without a body.
    Plain(crate::upstream_h1::Conn),
    /// A hyper HTTP/1.1 connection (a request with a body, or an upgrade).
    H1(hyper::client::conn::http1::SendRequest<Watched>),
    H2(crate::h2pool::Lease),
}

/// Whether a request may be sent twice (when the first try got no answer at all).
fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    )
}

/// How the requests of one backend travel.
struct Route<'a> {
    backend: &'a sluice_shared::Backend,
    balancer: &'a crate::balance::Balancer,
    tls: Option<(&'a Upstream, &'a BackendTls)>,
    /// HTTP/2 (`h2c`, or `https` when ALPN picks it) rather than the HTTP/1.1 pool.
    multiplexed: bool,
    /// A protocol upgrade needs a fresh HTTP/1.1 connection of its own.
    upgrade: bool,
    /// A request without a body to an `http` backend: over [`crate::upstream_h1`].
    plain: bool,
    /// The pool key of each server, by index.
    keys: &'a [PoolKey],
}

/// The balancer's choice: a pooled connection to it, else a new one; a failed connect is
/// retried once on another server (nothing has been sent yet). `avoid`: the server a request
/// being sent again got no answer from, chosen again only when no other server is usable
/// (HAProxy's `option redispatch`).
async fn choose<'a>(
    conn: &Conn,
    route: &Route<'a>,
    avoid: Option<usize>,
) -> Result<(Chosen, PoolKey, &'a Server, crate::balance::Pick), ProxyError> {
    let (pool, h2pool) = (&conn.worker.pool, &conn.worker.h2pool);
    let backend = route.backend;
    let tls = route.tls;
    // The servers tried (at most two; no allocation on the request path).
    let mut tried = [usize::MAX; 2];
    let mut last_error = UpstreamError::NoServer;
    for round in 0..2 {
        let usable =
            |i: usize| !tried.contains(&i) && conn.worker.health.usable(backend.servers[i].id);
        let Some(pick) = route
            .balancer
            .pick(|i| Some(i) != avoid && usable(i))
            .or_else(|| avoid.and_then(|_| route.balancer.pick(usable)))
        else {
            break;
        };
        let server = &backend.servers[pick.index];
        let key = route
            .keys
            .get(pick.index)
            .cloned()
            .ok_or(ProxyError::Upstream(UpstreamError::NoBackend(backend.id)))?;
        let attempt = if route.multiplexed && !h2pool.is_h1_only(&key) {
            // The connection-opening futures are boxed: they are large (TCP, TLS, handshake)
            // and rarely run, and inline they would grow every request's future, which is
            // allocated and copied per request.
            h2pool
                .acquire(&key, || Box::pin(open_h2(server, tls, h2pool.windows())))
                .await
                .map(|a| match a {
                    Acquired::H2(lease) => Chosen::H2(lease),
                    Acquired::H1(sender) => Chosen::H1(sender),
                })
        } else if route.plain {
            match conn.worker.plain_pool.checkout(&key) {
                Some(up) => Ok(Chosen::Plain(up)),
                None => Box::pin(connect_server(server))
                    .await
                    .map(|io| Chosen::Plain(crate::upstream_h1::Conn::new(io))),
            }
        } else {
            match pool.checkout(&key).filter(|_| !route.upgrade) {
                Some(sender) => Ok(Chosen::H1(sender)),
                None => Box::pin(open(server, tls.map(|(u, t)| (&u.config, t))))
                    .await
                    .map(Chosen::H1),
            }
        };
        match attempt {
            Ok(c) => return Ok((c, key, server, pick)),
            Err(e) => {
                tracing::debug!(error = %e, "upstream connect failed");
                // Passive detection: a failed connect counts toward `fall`.
                conn.worker.health.record(
                    server.id,
                    false,
                    &backend.health_check,
                    None,
                    Some(e.to_string()),
                );
                last_error = e;
                tried[round] = pick.index;
            }
        }
    }
    Err(ProxyError::Upstream(last_error))
}

/// Send the request to a server of the host's backend: over a multiplexed HTTP/2 connection
/// for `h2c` and h2-capable `https` servers, else over a pooled HTTP/1.1 connection
/// (`upgrade`: the client's protocol upgrade, passed on and spliced after a 101). An
/// idempotent request without a body whose connection failed before any response is sent once
/// more, to another server when one is usable (a keep-alive connection the server had just
/// closed, a server that just died, or one that was dying as it accepted the connection:
/// NGINX's `proxy_next_upstream error`).
async fn proxy(
    conn: &Conn,
    rt: &Runtime,
    host: &Host,
    mut req: Request<ReqBody>,
    forward: &Forward<'_>,
    upgrade: Option<HeaderValue>,
) -> Result<(Response<ResBody>, Arc<str>), ProxyError> {
    let backend =
        rt.backend(host.backend_id)
            .ok_or(ProxyError::Upstream(UpstreamError::NoBackend(
                host.backend_id,
            )))?;
    let tls = match backend.protocol {
        Protocol::Http | Protocol::H2c => None,
        Protocol::Https => {
            let upstream = rt
                .upstream_tls
                .get(&backend.id)
                .ok_or(ProxyError::Unsupported("https"))?;
            Some((upstream, backend.tls.as_ref().unwrap_or(&DEFAULT_TLS)))
        }
        other => return Err(ProxyError::Unsupported(other.as_str())),
    };
    if upgrade.is_some() && backend.protocol == Protocol::H2c {
        return Err(ProxyError::Unsupported("protocol upgrades to h2c backends"));
    }
    let route = Route {
        backend,
        balancer: rt
            .balancer(backend.id)
            .ok_or(ProxyError::Upstream(UpstreamError::NoBackend(backend.id)))?,
        tls,
        multiplexed: backend.protocol == Protocol::H2c
            || (backend.protocol == Protocol::Https && upgrade.is_none()),
        upgrade: upgrade.is_some(),
        plain: backend.protocol == Protocol::Http
            && upgrade.is_none()
            && hyper::body::Body::is_end_stream(req.body()),
        keys: rt.pool_keys(backend.id),
    };
    // Our own HTTP/1.1 client writes the forwarded fields as it writes the head; hyper and
    // h2 take them in the header map.
    if !route.plain {
        forward.apply(req.headers_mut());
    }
    let mut req = req.map(Some);
    // The server a request sent again got no answer from.
    let mut replayed_from = None;
    loop {
        let (chosen, key, server, pick) = pin!(choose(conn, &route, replayed_from)).await?;
        // Requests on hyper's HTTP/1.1 connections carry a body (or an upgrade) and are never
        // sent twice; HTTP/2 retries refused streams itself.
        return match chosen {
            Chosen::Plain(up) => {
                let (parts, body) = req.into_parts();
                let result = pin!(exchange_plain(conn, &parts, forward, up, &key)).await;
                req = Request::from_parts(parts, body);
                match result {
                    Err(ProxyError::Reset { server, reason })
                        if replayed_from.is_none() && idempotent(req.method()) =>
                    {
                        tracing::debug!(%server, %reason, "upstream connection failed before answering; sending the request again");
                        conn.worker.plain_pool.purge(&key);
                        replayed_from = Some(pick.index);
                        continue;
                    }
                    other => other,
                }
            }
            Chosen::H1(sender) => {
                pin!(exchange_h1(conn, req, upgrade.clone(), sender, key.clone())).await
            }
            Chosen::H2(lease) => {
                let h2pool = &conn.worker.h2pool;
                let reopen = || async {
                    match h2pool
                        .acquire(&key, || Box::pin(open_h2(server, tls, h2pool.windows())))
                        .await
                    {
                        Ok(Acquired::H2(lease)) => Ok(lease),
                        Ok(Acquired::H1(_)) => Err("the server stopped speaking HTTP/2".to_owned()),
                        Err(e) => Err(e.to_string()),
                    }
                };
                let scheme = if tls.is_some() { "https" } else { "http" };
                pin!(exchange_h2(
                    conn,
                    req,
                    lease,
                    reopen,
                    scheme,
                    key.address.clone()
                ))
                .await
            }
        };
    }
}

/// One request over HTTP/1.1; the connection goes back to the pool when the response ends.
async fn exchange_h1(
    conn: &Conn,
    mut req: Request<Option<ReqBody>>,
    upgrade: Option<HeaderValue>,
    mut sender: hyper::client::conn::http1::SendRequest<Watched>,
    key: PoolKey,
) -> Result<(Response<ResBody>, Arc<str>), ProxyError> {
    let server = key.address.clone();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.version = http::Version::HTTP_11;
    // Origin form: the path and query alone (a shared-buffer clone, no copy or re-parse).
    let mut origin = http::uri::Parts::default();
    origin.path_and_query = Some(path_or_root(&parts.uri));
    parts.uri = http::Uri::from_parts(origin).unwrap_or_default();
    // TE applies to this hop only: its sender names it in `Connection` (RFC 9110 10.1.4).
    let te = parts.headers.contains_key(http::header::TE);
    let connection = match (&upgrade, te) {
        (Some(_), false) => Some("upgrade"),
        (Some(_), true) => Some("upgrade, te"),
        (None, true) => Some("te"),
        (None, false) => None,
    };
    if let Some(options) = connection {
        parts
            .headers
            .insert(http::header::CONNECTION, HeaderValue::from_static(options));
    }
    if let Some(proto) = &upgrade {
        parts.headers.insert(http::header::UPGRADE, proto.clone());
    }
    let (body, sent) = Watched::new(body);
    let upstream_req = Request::from_parts(parts, body);
    // The response timeout runs from the moment the request body has been sent.
    let sent_at = Instant::now();
    let exchange = sender.send_request(upstream_req);
    tokio::pin!(exchange);
    let answered = match sent {
        Some(sent) => tokio::select! {
            r = &mut exchange => Some(r),
            _ = sent => None,
        },
        None => None,
    };
    let answered = match answered {
        Some(r) => Ok(r),
        None => {
            conn.timers
                .timeout(conn.worker.response_timeout, &mut exchange)
                .await
        }
    };
    let mut resp = match answered {
        Ok(Ok(resp)) => {
            conn.worker
                .metrics
                .upstream_latency(sent_at.elapsed().as_secs_f64());
            resp
        }
        // The connection failed before any response byte (closed, reset, not sent at all): the
        // request may be sent again. A malformed answer or a local error is final.
        Ok(Err(e)) if !(e.is_parse() || e.is_parse_status() || e.is_user() || e.is_timeout()) => {
            return Err(ProxyError::Reset {
                server,
                reason: e.to_string(),
            })
        }
        Ok(Err(e)) => {
            return Err(ProxyError::Exchange {
                server,
                reason: e.to_string(),
            })
        }
        Err(_) => return Err(ProxyError::Timeout { server }),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            // Splice the two upgraded connections; this upstream connection is never pooled.
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                    let (a, b) = (TokioIo::new(client), TokioIo::new(upstream));
                    let _ = crate::copy::tunnel(a, b, crate::copy::IDLE, crate::copy::BUFFER).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Ok((Response::from_parts(parts, empty_body()), server));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Returning::new(body, conn.worker.pool.clone(), key, sender)
        .map_err(BoxError::from)
        .boxed();
    Ok((Response::from_parts(parts, body), server))
}

/// One request without a body over a connection of our own ([`crate::upstream_h1`]); the
/// connection goes back to the plain pool when the response ends.
async fn exchange_plain(
    conn: &Conn,
    req: &http::request::Parts,
    forward: &Forward<'_>,
    mut up: crate::upstream_h1::Conn,
    key: &PoolKey,
) -> Result<(Response<ResBody>, Arc<str>), ProxyError> {
    use crate::upstream_h1::Error;
    let server = key.address.clone();
    let sent_at = Instant::now();
    let deadline = tokio::time::Instant::from_std(sent_at) + conn.worker.response_timeout;
    let answered = conn
        .timers
        .timeout_at(deadline, async {
            up.send(req, forward.fields(&req.headers)).await?;
            up.head(&req.method).await
        })
        .await;
    let mut head = match answered {
        Ok(Ok(head)) => head,
        Ok(Err(Error::Closed(reason))) => return Err(ProxyError::Reset { server, reason }),
        Ok(Err(Error::Invalid(reason))) => return Err(ProxyError::Exchange { server, reason }),
        Err(_) => return Err(ProxyError::Timeout { server }),
    };
    conn.worker
        .metrics
        .upstream_latency(sent_at.elapsed().as_secs_f64());
    strip_hop_by_hop(&mut head.parts.headers);
    let back = Some((conn.worker.plain_pool.clone(), key.clone()));
    let body = crate::upstream_h1::UpBody::new(up, &head, back, conn.worker.response_timeout);
    Ok((Response::from_parts(head.parts, body.boxed()), server))
}

/// One request over a multiplexed HTTP/2 stream; a stream the server refused (it never
/// reached the application) is sent once more, on a fresh connection if need be, when the
/// request has no body to replay.
async fn exchange_h2<R, F>(
    conn: &Conn,
    req: Request<Option<ReqBody>>,
    lease: crate::h2pool::Lease,
    reopen: R,
    scheme: &'static str,
    server: Arc<str>,
) -> Result<(Response<ResBody>, Arc<str>), ProxyError>
where
    R: Fn() -> F,
    F: std::future::Future<Output = Result<crate::h2pool::Lease, String>>,
{
    let (mut parts, body) = req.into_parts();
    let head = crate::upstream_h2::Head::new(&mut parts, scheme, &server).map_err(|reason| {
        ProxyError::Exchange {
            server: server.clone(),
            reason,
        }
    })?;
    let replayable = body.as_ref().is_none_or(hyper::body::Body::is_end_stream);
    let mut body = body;
    let mut lease = Some(lease);
    for attempt in 0..2 {
        let this = match lease.take() {
            Some(l) => l,
            None => reopen().await.map_err(|reason| ProxyError::Exchange {
                server: server.clone(),
                reason,
            })?,
        };
        let mut sent_at = Instant::now();
        let result = crate::upstream_h2::send(
            this,
            &head,
            body.take(),
            &conn.timers,
            conn.worker.response_timeout,
            &mut sent_at,
        )
        .await;
        match result {
            Ok(mut resp) => {
                conn.worker
                    .metrics
                    .upstream_latency(sent_at.elapsed().as_secs_f64());
                strip_hop_by_hop(resp.headers_mut());
                return Ok((resp, server));
            }
            Err(Failure::Refused(reason)) if replayable && attempt == 0 => {
                tracing::debug!(%server, %reason, "upstream refused the stream; sending it again");
            }
            Err(Failure::Timeout) => return Err(ProxyError::Timeout { server }),
            Err(Failure::Refused(reason) | Failure::Failed(reason)) => {
                return Err(ProxyError::Exchange { server, reason })
            }
        }
    }
    Err(ProxyError::Exchange {
        server,
        reason: "refused twice".into(),
    })
}

fn empty_body() -> ResBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// TLS settings of an `https` backend that has none: verify against the system roots.
static DEFAULT_TLS: std::sync::LazyLock<sluice_shared::BackendTls> =
    std::sync::LazyLock::new(sluice_shared::BackendTls::default);
