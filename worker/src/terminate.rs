//! TLS termination: finish the handshake with the host's certificate (rustls, ALPN
//! `h2,http/1.1`, TLS 1.2 and 1.3, session tickets), then serve HTTP/2 or HTTP/1.1 and proxy
//! each request to the backend of the host its `Host`/`:authority` names. A request for a host
//! this connection's certificate does not serve gets 421, so browsers that coalesced an HTTP/2
//! connection across names of one wildcard certificate retry on a new connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::ProducesTickets;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sluice_shared::{Host, Protocol};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::headers::{forward_request, host_name, strip_hop_by_hop, Forwarding};
use crate::pool::{PoolKey, Returning};
use crate::prefixed::Prefixed;
use crate::runtime::Runtime;
use crate::upstream::{connect_server, UpstreamError};
use crate::Worker;

/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a client to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the upstream to answer with headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request header block (431 beyond).
pub const MAX_HEADERS: usize = 16 * 1024;
/// HTTP/2 streams a client may have open at once.
pub const MAX_STREAMS: u32 = 250;

/// The body of every response the worker sends.
pub type ResBody = BoxBody<Bytes, hyper::Error>;

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
    public_port: u16,
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
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        acceptor.accept(Prefixed::new(peeked, stream)),
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
    let conn = Arc::new(Conn {
        public_port: worker.public_https_port.unwrap_or(local.port()),
        worker: worker.clone(),
        rt,
        certificate,
        peer,
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let io = TokioIo::new(tls);
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size(MAX_HEADERS as u32)
            .serve_connection(io, service)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEADERS)
            .keep_alive(true)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// A request body that says when it has been sent whole, so the response timeout can start then
/// (a long upload is not a slow server).
pub struct Watched {
    inner: Incoming,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Watched {
    fn new(inner: Incoming) -> (Watched, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut w = Watched {
            inner,
            done: Some(tx),
        };
        if hyper::body::Body::is_end_stream(&w.inner) {
            w.finish();
        }
        (w, rx)
    }

    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.finish(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Route, rewrite and proxy one request; every failure becomes a short local response.
async fn handle(conn: Arc<Conn>, mut req: Request<Incoming>) -> Response<ResBody> {
    let start = Instant::now();
    // Each request sees the snapshot in force when it arrives, never a mix.
    let rt = conn
        .worker
        .current
        .load()
        .unwrap_or_else(|| conn.rt.clone());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let name = host_name(&authority);
    // The access line's fields are taken only when that line is enabled.
    let logged =
        tracing::enabled!(target: "sluice_worker::access", tracing::Level::INFO).then(|| {
            (
                req.method().clone(),
                req.uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            )
        });
    let host = rt
        .host(&name)
        .filter(|h| rt.host_certificates.get(&h.id) == Some(&conn.certificate));
    let (response, upstream) = match host {
        None => (
            local_response(StatusCode::MISDIRECTED_REQUEST, "misdirected request"),
            None,
        ),
        Some(host) => {
            let host = host.clone();
            let upgrade = upgrade_of(&req);
            forward_request(
                req.headers_mut(),
                &Forwarding {
                    client: conn.peer.ip(),
                    host: &authority,
                    public_port: conn.public_port,
                    rules: &host.request_headers,
                },
            );
            match proxy(&conn, &rt, &host, req, upgrade).await {
                Ok((resp, server)) => (resp, Some(server)),
                Err(e) => (e.response(), e.server()),
            }
        }
    };
    conn.worker
        .metrics
        .request(&name, response.status().as_u16());
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "sluice_worker::access",
            client = %conn.peer, host = %name, %method, %path, status = response.status().as_u16(),
            upstream = upstream.as_deref().unwrap_or("-"), total_ms = start.elapsed().as_secs_f64() * 1000.0,
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
    Exchange { server: String, reason: String },
    #[error("upstream {server} did not answer in time")]
    Timeout { server: String },
    #[error("backend protocol {0} is not served yet")]
    Unsupported(&'static str),
}

impl ProxyError {
    fn response(&self) -> Response<ResBody> {
        match self {
            ProxyError::Upstream(UpstreamError::NoServer) => {
                local_response(StatusCode::SERVICE_UNAVAILABLE, "no server available")
            }
            ProxyError::Upstream(_) | ProxyError::Exchange { .. } | ProxyError::Unsupported(_) => {
                local_response(StatusCode::BAD_GATEWAY, "bad gateway")
            }
            ProxyError::Timeout { .. } => {
                local_response(StatusCode::GATEWAY_TIMEOUT, "gateway timeout")
            }
        }
    }

    fn server(&self) -> Option<String> {
        match self {
            ProxyError::Exchange { server, .. } | ProxyError::Timeout { server } => {
                Some(server.clone())
            }
            ProxyError::Upstream(UpstreamError::Connect { server, .. }) => Some(server.clone()),
            _ => None,
        }
    }
}

/// Send the request to a server of the host's backend over a pooled HTTP/1.1 connection.
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

/// A new upstream connection to `server`: TCP, then TLS for `https` backends, then HTTP/1.1.
async fn open(
    server: &sluice_shared::Server,
    tls: Option<(&Arc<rustls::ClientConfig>, &sluice_shared::BackendTls)>,
) -> Result<hyper::client::conn::http1::SendRequest<Watched>, UpstreamError> {
    let address = server.address.to_string();
    let failed = |reason: String| UpstreamError::Connect {
        server: address.clone(),
        reason,
    };
    let stream = connect_server(server).await?;
    match tls {
        None => h1_handshake(stream)
            .await
            .map_err(|e| failed(e.to_string())),
        Some((config, settings)) => {
            let name = crate::upstream_tls::server_name(settings, server).map_err(failed)?;
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = tokio::time::timeout(
                crate::upstream::CONNECT_TIMEOUT,
                connector.connect(name, stream),
            )
            .await
            .map_err(|_| failed("TLS handshake timed out".into()))?
            .map_err(|e| failed(format!("TLS handshake: {e}")))?;
            h1_handshake(tls).await.map_err(|e| failed(e.to_string()))
        }
    }
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade`), if it is one.
fn upgrade_of(req: &Request<Incoming>) -> Option<HeaderValue> {
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

/// Send the request to a server of the host's backend over a pooled HTTP/1.1 connection
/// (`upgrade`: the client's protocol upgrade, passed on and spliced after a 101).
async fn proxy(
    conn: &Conn,
    rt: &Runtime,
    host: &Host,
    mut req: Request<Incoming>,
    upgrade: Option<HeaderValue>,
) -> Result<(Response<ResBody>, String), ProxyError> {
    let backend = rt
        .config
        .backend(host.backend_id)
        .ok_or(ProxyError::Upstream(UpstreamError::NoBackend(
            host.backend_id,
        )))?;
    let tls = match backend.protocol {
        Protocol::Http => None,
        Protocol::Https => {
            let config = rt
                .upstream_tls
                .get(&backend.id)
                .ok_or(ProxyError::Unsupported("https"))?;
            Some((config, backend.tls.as_ref().unwrap_or(&DEFAULT_TLS)))
        }
        other => return Err(ProxyError::Unsupported(other.as_str())),
    };
    let balancer = rt
        .balancer(backend.id)
        .ok_or(ProxyError::Upstream(UpstreamError::NoBackend(backend.id)))?;
    let pool = &conn.worker.pool;
    // The balancer's choice: an idle pooled connection to it, else a new one; a failed connect
    // is retried once on another server (nothing has been sent yet).
    let mut tried: Vec<usize> = Vec::with_capacity(2);
    let mut chosen = None;
    let mut last_error = UpstreamError::NoServer;
    for _ in 0..2 {
        let Some(pick) = balancer
            .pick(|i| !tried.contains(&i) && conn.worker.health.usable(backend.servers[i].id))
        else {
            break;
        };
        let server = &backend.servers[pick.index];
        let key = PoolKey {
            address: server.address.to_string(),
            tls: tls.map(|(u, t)| {
                let sni = t
                    .server_name
                    .as_ref()
                    .map_or_else(|| server.address.host_str(), |n| n.to_string());
                (sni, t.verify, u.ca_sha256.clone())
            }),
        };
        if upgrade.is_none() {
            if let Some(sender) = pool.checkout(&key) {
                chosen = Some((sender, key, pick));
                break;
            }
        }
        match open(server, tls.map(|(u, t)| (&u.config, t))).await {
            Ok(sender) => {
                chosen = Some((sender, key, pick));
                break;
            }
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
                tried.push(pick.index);
            }
        }
    }
    let (mut sender, key, _pick) = chosen.ok_or(ProxyError::Upstream(last_error))?;
    let server = key.address.clone();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.version = http::Version::HTTP_11;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path.parse().unwrap_or_default();
    if let Some(proto) = &upgrade {
        parts.headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        parts.headers.insert(http::header::UPGRADE, proto.clone());
    }
    let (body, sent) = Watched::new(body);
    let upstream_req = Request::from_parts(parts, body);
    // The response timeout runs from the moment the request body has been sent.
    let sent_at = Instant::now();
    let exchange = sender.send_request(upstream_req);
    tokio::pin!(exchange);
    let answered = tokio::select! {
        r = &mut exchange => Some(r),
        _ = sent => None,
    };
    let answered = match answered {
        Some(r) => Ok(r),
        None => tokio::time::timeout(conn.worker.response_timeout, &mut exchange).await,
    };
    let mut resp = match answered {
        Ok(Ok(resp)) => {
            conn.worker
                .metrics
                .upstream_latency(sent_at.elapsed().as_secs_f64());
            resp
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
                    let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
            let (parts, _) = resp.into_parts();
            let empty = Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed();
            return Ok((Response::from_parts(parts, empty), server));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Returning::new(body, pool.clone(), key, sender).boxed();
    Ok((Response::from_parts(parts, body), server))
}

/// TLS settings of an `https` backend that has none: verify against the system roots.
static DEFAULT_TLS: std::sync::LazyLock<sluice_shared::BackendTls> =
    std::sync::LazyLock::new(sluice_shared::BackendTls::default);
