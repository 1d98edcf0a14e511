//! In-process peers for the data-plane tests: an HTTP/1.1 echo backend that records exactly
//! what reached it, a TLS backend for passthrough (its own certificate, optional PROXY header),
//! a test CA, and TLS clients speaking HTTP/1.1 or HTTP/2 through the worker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A certificate authority for tests, and leaf certificates it signs.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Sluice Test CA");
        let cert = params.self_signed(&key).expect("ca");
        let pem = cert.pem();
        TestCa { cert, key, pem }
    }

    /// A leaf for these names: (chain PEM, key PEM).
    pub fn leaf(&self, sans: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            sans.first().copied().unwrap_or("leaf"),
        );
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        (format!("{}{}", cert.pem(), self.pem), key.serialize_pem())
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A body of `n` zero bytes, produced 64 KiB at a time (never held whole).
pub fn stream_body(n: u64) -> BoxBody {
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(chunk.len() as u64);
            Some((
                Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.slice(..take as usize))),
                left - take,
            ))
        }
    });
    http_body_util::StreamBody::new(stream).boxed()
}

/// What one request looked like when it reached a backend.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub version: String,
    /// Header values by lower-case name, in order.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 backend answering every request with `{"backend": name}` and recording it.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections that carried at least one request.
    pub connections: Arc<AtomicUsize>,
    /// Bytes received by `/big` requests.
    pub uploaded: Arc<std::sync::atomic::AtomicU64>,
    /// Status every answer carries (200 unless a test makes the backend sick).
    pub status: Arc<std::sync::atomic::AtomicU16>,
    /// Trailer fields of the request bodies it read, in order.
    pub trailers: Arc<Mutex<Vec<(String, String)>>>,
    task: JoinHandle<()>,
    /// Closes every open connection when set (a crash, as peers see it).
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

impl EchoBackend {
    pub async fn start(name: &str) -> EchoBackend {
        EchoBackend::start_on(name, "127.0.0.1:0".parse().expect("address")).await
    }

    /// Start on `addr` (to bring a killed backend back on its address).
    pub async fn start_on(name: &str, addr: SocketAddr) -> EchoBackend {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let uploaded = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let trailers = Arc::new(Mutex::new(Vec::new()));
        let (n, s, c, u, st, tr) = (
            name.to_owned(),
            seen.clone(),
            connections.clone(),
            uploaded.clone(),
            status.clone(),
            trailers.clone(),
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut stopped = stopped.clone();
                // A connection counts once it carries a request (bare TCP health checks do not).
                let counted = Arc::new(AtomicBool::new(false));
                let (n, s, u, st, c, tr) = (
                    n.clone(),
                    s.clone(),
                    u.clone(),
                    st.clone(),
                    c.clone(),
                    tr.clone(),
                );
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        if !counted.swap(true, Ordering::SeqCst) {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                        let (n, s, up, code, tr) = (
                            n.clone(),
                            s.clone(),
                            u.clone(),
                            st.load(Ordering::SeqCst),
                            tr.clone(),
                        );
                        async move {
                            let seen = Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                version: format!("{:?}", req.version()),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect(),
                            };
                            s.lock().unwrap().push(seen);
                            // `/big?n=N` answers N bytes at once, streamed, and counts the upload
                            // alongside (full duplex); `/trailers` records the request's trailers
                            // and answers `ok` with a declared `x-checksum` trailer; anything
                            // else echoes what it received.
                            let big = req.uri().path() == "/big";
                            let with_trailers = req.uri().path() == "/trailers";
                            let n_bytes: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("n="))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let mut body = req.into_body();
                            let count = async move {
                                let mut received = 0u64;
                                while let Some(Ok(frame)) = body.frame().await {
                                    if let Some(d) = frame.data_ref() {
                                        received += d.len() as u64;
                                    }
                                    if let Some(t) = frame.trailers_ref() {
                                        tr.lock().unwrap().extend(t.iter().map(|(k, v)| {
                                            let v = v.to_str().unwrap_or("").to_owned();
                                            (k.as_str().to_owned(), v)
                                        }));
                                    }
                                }
                                received
                            };
                            if with_trailers {
                                count.await;
                                let mut fields = http::HeaderMap::new();
                                fields.insert("x-checksum", "abc".parse().expect("value"));
                                let frames = [
                                    Ok(hyper::body::Frame::data(Bytes::from_static(b"ok"))),
                                    Ok(hyper::body::Frame::trailers(fields)),
                                ];
                                let body = http_body_util::StreamBody::new(
                                    futures_util::stream::iter(frames),
                                );
                                return Ok::<_, Infallible>(
                                    Response::builder()
                                        .header("trailer", "x-checksum")
                                        .body(BodyExt::boxed(body))
                                        .expect("response"),
                                );
                            }
                            let out: BoxBody = if big {
                                tokio::spawn(
                                    async move { up.fetch_add(count.await, Ordering::SeqCst) },
                                );
                                stream_body(n_bytes)
                            } else {
                                let received = count.await;
                                up.fetch_add(received, Ordering::SeqCst);
                                Full::new(Bytes::from(
                                    json!({"backend": n, "body_bytes": received}).to_string(),
                                ))
                                .map_err(|never| match never {})
                                .boxed()
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(code)
                                    .header("x-backend", n.as_str())
                                    .header("connection", "keep-alive")
                                    .body(out)
                                    .expect("response"),
                            )
                        }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = served => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        EchoBackend {
            addr,
            name: name.to_owned(),
            seen,
            connections,
            uploaded,
            status,
            trailers,
            task,
            stop,
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A WebSocket echo backend (plain TCP): every message comes back as sent.
pub struct WsBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsBackend {
    pub async fn start() -> WsBackend {
        use futures_util::{SinkExt, StreamExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsBackend { addr, task }
    }
}

/// A backend that accepts connections and requests but never answers.
pub struct SilentBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentBackend {
    pub async fn start() -> SilentBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        SilentBackend { addr, task }
    }
}

/// A TLS backend for passthrough: its own certificate, HTTP/1.1 inside, answering with its
/// name; with `proxy_protocol` it first reads a PROXY header (v1 or v2) and records it as
/// [`crate::tunnel::read_proxy_header`] describes it.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub proxy_lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    /// A backend offering ALPN `h2, http/1.1`.
    pub async fn start(
        name: &str,
        chain_pem: &str,
        key_pem: &str,
        proxy_protocol: bool,
    ) -> TlsBackend {
        TlsBackend::start_alpn(
            name,
            chain_pem,
            key_pem,
            proxy_protocol,
            &[b"h2", b"http/1.1"],
        )
        .await
    }

    /// A backend offering these ALPN protocols.
    pub async fn start_alpn(
        name: &str,
        chain_pem: &str,
        key_pem: &str,
        proxy_protocol: bool,
        alpn: &[&[u8]],
    ) -> TlsBackend {
        let acceptor = tls_acceptor(chain_pem, key_pem, alpn);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let proxy_lines = Arc::new(Mutex::new(Vec::new()));
        let (lines, name) = (proxy_lines.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, lines, name) = (acceptor.clone(), lines.clone(), name.clone());
                tokio::spawn(async move {
                    if proxy_protocol {
                        let Some(header) = crate::tunnel::read_proxy_header(&mut stream).await
                        else {
                            return;
                        };
                        lines.lock().unwrap().push(header);
                    }
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let body = json!({"backend": name.clone(), "h2": h2}).to_string();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        TlsBackend {
            addr,
            proxy_lines,
            task,
        }
    }
}

/// A TLS acceptor for a backend holding its own certificate, offering these ALPN protocols.
pub fn tls_acceptor(chain_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS connection to `addr` with SNI `sni`, trusting `root`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    root: CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).map_err(std::io::Error::other)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Value,
}

async fn read(resp: Response<Incoming>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Reply {
        status,
        headers,
        body,
    }
}

fn build(
    method: &str,
    uri: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// An HTTP/1.1 client on one TLS connection.
pub struct H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl H1 {
    pub async fn new<IO>(tls: IO) -> H1
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        H1(send)
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("GET", host, path, headers).await
    }

    /// A request without a body.
    pub async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.0.ready().await.expect("ready");
        read(
            self.0
                .send_request(build(method, path, Some(host), headers))
                .await
                .expect("h1 request"),
        )
        .await
    }
}

/// An HTTP/2 client on one TLS connection.
#[derive(Clone)]
pub struct H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>);

impl H2 {
    pub async fn new<IO>(tls: IO) -> H2
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        H2(send)
    }

    pub async fn get(&mut self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.0.ready().await.expect("ready");
        let req = build("GET", &format!("https://{authority}{path}"), None, headers);
        read(self.0.send_request(req).await.expect("h2 request")).await
    }
}

/// JSON object of a backend reply.
pub fn backend_of(reply: &Reply) -> String {
    reply
        .body
        .get("backend")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// An empty JSON object (for building bodies).
pub fn obj() -> Map<String, Value> {
    Map::new()
}

/// HTTP/1.1 over TLS: POST `up` streamed bytes to `path?n=down` and read the answer as a stream;
/// returns (status, bytes sent, bytes of the answer).
pub async fn stream_both(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    host: &str,
    up: u64,
    down: u64,
    path: &str,
) -> (u16, u64, u64) {
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, BoxBody>(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method("POST")
        .uri(format!("{path}?n={down}"))
        .header("host", host)
        .header("content-length", up.to_string())
        .body(stream_body(up))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            got += d.len() as u64;
        }
    }
    (status, up, got)
}
