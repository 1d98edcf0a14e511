//! The echo backend: answers every request with a JSON description of what reached it — its
//! own name, the protocol version, method, path, whether TLS was used, the peer address and
//! every request header — so users see exactly what the proxy forwarded (`X-Forwarded-*`,
//! `Host`/`:authority`, removed hop-by-hop headers).
//!
//! It speaks HTTP/1.1 (`http`), HTTP/2 with prior knowledge (`h2c`), or TLS with its own
//! certificate and ALPN `h2, http/1.1` (`tls`). Header reads time out, header blocks are
//! capped, and request bodies are counted and dropped, never held.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

/// Time a client has to send its request headers or finish the TLS handshake.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request header block.
const MAX_HEADERS: usize = 64 * 1024;

/// What the echo backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    H2c,
    Tls,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Protocol::Http),
            "h2c" => Ok(Protocol::H2c),
            "tls" => Ok(Protocol::Tls),
            other => Err(format!(
                "unknown protocol `{other}` (expected http, h2c or tls)"
            )),
        }
    }
}

/// The description of one request.
async fn describe(name: &str, tls: bool, peer: SocketAddr, req: Request<Incoming>) -> Value {
    let mut headers = Map::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        match headers.get_mut(k.as_str()) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_owned(), Value::String(v));
            }
        }
    }
    let mut out = json!({
        "backend": name,
        "version": format!("{:?}", req.version()),
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "authority": req.uri().authority().map(|a| a.to_string()),
        "tls": tls,
        "peer": peer.to_string(),
        "headers": headers,
    });
    let mut body = req.into_body();
    let mut bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            bytes += d.len() as u64;
        }
    }
    out["body_bytes"] = json!(bytes);
    out
}

/// Serve the echo backend on `listener` until the task is dropped. `tls` holds the chain and
/// key (PEM) for [`Protocol::Tls`].
pub async fn serve(
    listener: TcpListener,
    name: String,
    protocol: Protocol,
    tls: Option<(String, String)>,
) -> anyhow::Result<()> {
    let acceptor = match (protocol, tls) {
        (Protocol::Tls, Some((chain, key))) => Some(acceptor(&chain, &key)?),
        (Protocol::Tls, None) => anyhow::bail!("the tls protocol needs a certificate and key"),
        _ => None,
    };
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (name, acceptor) = (name.clone(), acceptor.clone());
        tokio::spawn(async move {
            match acceptor {
                None => {
                    let h2 = protocol == Protocol::H2c;
                    connection(TokioIo::new(stream), name, false, h2, peer).await
                }
                Some(a) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(READ_TIMEOUT, a.accept(stream)).await
                    else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    connection(TokioIo::new(tls), name, true, h2, peer).await
                }
            }
        });
    }
}

async fn connection<IO>(io: IO, name: Arc<str>, tls: bool, h2: bool, peer: SocketAddr)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let name = name.clone();
        async move {
            let body = describe(&name, tls, peer, req).await.to_string();
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .header("x-backend", &*name)
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid response"),
            )
        }
    });
    let result = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(250)
            .max_header_list_size(MAX_HEADERS as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(READ_TIMEOUT)
            .max_buf_size(MAX_HEADERS)
            .serve_connection(io, svc)
            .await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "echo connection ended with an error");
    }
}

fn acceptor(chain: &str, key: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
