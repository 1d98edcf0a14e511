//! The plain HTTP listener: `308 Permanent Redirect` to the HTTPS URL for known terminate
//! hosts, `404` for anything else. Nothing is proxied in cleartext.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_shared::Mode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::headers::host_name;
use crate::runtime::Runtime;
use crate::Worker;

/// Idle time allowed between requests on a keep-alive connection, and for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to one cleartext request (pure: runtime, request, public HTTPS port).
pub fn answer(
    rt: Option<&Runtime>,
    req: &Request<Incoming>,
    https_port: u16,
) -> Response<Full<Bytes>> {
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host_name(authority);
    let known = rt
        .and_then(|rt| rt.host(&name))
        .is_some_and(|h| h.mode == Mode::Terminate);
    if !known {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    }
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{name}{port}{path}");
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Serve redirects until `stop` turns true.
pub async fn serve(
    worker: Arc<Worker>,
    listener: TcpListener,
    https_port: u16,
    tracker: TaskTracker,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = crate::listener::accept(&listener) => accepted,
            _ = stop.changed() => return,
        };
        let worker = worker.clone();
        tracker.spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let rt = worker.current.load();
                let resp = answer(rt.as_deref(), &req, https_port);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(crate::terminate::MAX_HEADERS)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
