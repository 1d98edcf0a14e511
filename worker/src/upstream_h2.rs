//! One request over an upstream HTTP/2 stream: the request head for `:authority`/`:scheme`,
//! the client's body piped into the stream under HTTP/2 flow control (trailers included), and
//! the response body handed back frame by frame, releasing flow-control capacity as the client
//! reads it.
//!
//! Cancellation runs both ways: when the client goes away (its stream reset, its connection
//! closed, or the response dropped) the upstream stream is reset with `CANCEL`, so the backend
//! stops working for nobody; an upstream reset ends the client's response with an error, which
//! hyper turns into a client stream reset (HTTP/2) or a closed connection (HTTP/1.1).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{Reason, SendStream};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::h2body::Recv;
use crate::h2pool::Lease;
use crate::terminate::{BoxError, ReqBody, ResBody};

/// A request head that can be sent again (for the one retry of a refused stream).
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
}

impl Head {
    /// The upstream head for a request already rewritten by the header rules (which put back
    /// `te: trailers` when the client can take trailers: HTTP/2 allows it and gRPC needs it):
    /// `Host` (as the rules left it; `server` if there is none) becomes `:authority`. The
    /// client's own authority and path are shared, not copied or parsed again.
    pub fn new(
        parts: &mut http::request::Parts,
        scheme: &'static str,
        server: &str,
    ) -> Result<Head, String> {
        let mut headers = std::mem::take(&mut parts.headers);
        let host = headers.remove(http::header::HOST);
        let authority = match (&host, parts.uri.authority()) {
            (Some(host), Some(a)) if host.as_bytes() == a.as_str().as_bytes() => a.clone(),
            (Some(host), _) => http::uri::Authority::try_from(host.as_bytes())
                .map_err(|e| format!("request authority {host:?}: {e}"))?,
            (None, _) => http::uri::Authority::try_from(server)
                .map_err(|e| format!("request authority `{server}`: {e}"))?,
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(if scheme == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        uri.authority = Some(authority);
        uri.path_and_query = Some(crate::terminate::path_or_root(&parts.uri));
        let uri = http::Uri::from_parts(uri).map_err(|e| format!("request URI: {e}"))?;
        Ok(Head {
            method: parts.method.clone(),
            uri,
            headers,
        })
    }

    fn request(&self) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// Whether the method may be replayed when the connection went away (RFC 9110 9.2.2).
    pub fn idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        ) || self.method == Method::TRACE
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// The stream never reached the application (refused, or above a GOAWAY's last id, or the
    /// connection could not take it): safe to send again.
    Refused(String),
    /// Anything else.
    Failed(String),
    /// No response headers within the response timeout.
    Timeout,
}

fn classify(e: h2::Error, idempotent: bool) -> Failure {
    let refused = e.reason() == Some(Reason::REFUSED_STREAM)
        || (idempotent && e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR));
    if refused {
        Failure::Refused(e.to_string())
    } else {
        Failure::Failed(e.to_string())
    }
}

/// Send one request on the leased connection and wait for the response head. `body` is
/// `None` for a request without one; the response timeout runs on one of the client
/// connection's `timers`.
pub async fn send(
    lease: Lease,
    head: &Head,
    body: Option<ReqBody>,
    timers: &crate::deadline::Timers,
    response_timeout: Duration,
    sent_at: &mut Instant,
) -> Result<Response<ResBody>, Failure> {
    let sender = lease.conn().sender();
    let mut sender = sender.ready().await.map_err(|e| {
        lease.conn().retire();
        Failure::Refused(e.to_string())
    })?;
    let body = body.filter(|b| !b.is_end_stream());
    let (response, stream) = sender
        .send_request(head.request(), body.is_none())
        .map_err(|e| {
            lease.conn().retire();
            Failure::Refused(e.to_string())
        })?;
    // A body is piped by a task of its own, cancelled when the response is dropped; a request
    // without one (the common case) needs neither the task nor the channels.
    let (guard, sent_rx) = match body {
        Some(body) => {
            let cancel = CancellationToken::new();
            let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(pipe(body, stream, cancel.clone(), sent_tx));
            (Some(cancel.drop_guard()), Some(sent_rx))
        }
        None => {
            drop(stream);
            (None, None)
        }
    };
    tokio::pin!(response);
    // The response timeout runs from the moment the request body has been sent.
    let early = match sent_rx {
        Some(sent_rx) => tokio::select! {
            r = &mut response => Some(r),
            _ = sent_rx => None,
        },
        None => None,
    };
    *sent_at = Instant::now();
    let answered = match early {
        Some(r) => r,
        None => timers
            .timeout(response_timeout, &mut response)
            .await
            .map_err(|_| Failure::Timeout)?,
    };
    let resp = answered.map_err(|e| {
        if e.is_go_away() || e.is_io() {
            lease.conn().retire();
        }
        classify(e, head.idempotent())
    })?;
    let (parts, recv) = resp.into_parts();
    let body = H2Body {
        recv: Recv::new(recv),
        hold: Some((lease, guard)),
    };
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Copy the client's body into the upstream stream; on cancellation, a client error or a
/// reset by the server, reset the upstream stream.
async fn pipe(
    body: ReqBody,
    stream: SendStream<Bytes>,
    cancel: CancellationToken,
    sent: tokio::sync::oneshot::Sender<()>,
) {
    let mut send = crate::h2body::Send::new(body, stream);
    let result = tokio::select! {
        _ = cancel.cancelled() => Err(Reason::CANCEL),
        r = &mut send => r,
    };
    match result {
        Ok(()) => {
            let _ = sent.send(());
        }
        Err(reason) => send.stream().send_reset(reason),
    }
}

/// The upstream response body. Holds the stream slot and the request pipe's cancel guard
/// until it ends or is dropped.
struct H2Body {
    recv: Recv,
    hold: Option<(Lease, Option<DropGuard>)>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.recv).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            if frame.as_ref().is_none_or(|f| f.is_err()) || self.recv.is_end_stream() {
                self.hold = None;
            }
        }
        polled.map(|f| f.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
