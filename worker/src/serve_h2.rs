//! HTTP/2 to clients on the h2 crate: one task per connection that drives the connection and
//! every stream's request future and response body (no task per stream, no channel between
//! them), the response head rules (`Date`, `Content-Length` of local answers), a client's
//! stream reset cancelling its request (dropping the future resets the upstream stream too),
//! a panic in one stream's future resetting that stream only (the others share its task), and
//! a graceful GOAWAY when the connection has been idle.
//!
//! Settings are hyper's server defaults (1 MiB stream and connection windows, 16 KiB frames,
//! 400 KiB send buffer per stream) plus our stream and header-list limits; the h2 crate's
//! protections against reset floods (pending-accept and local-error reset limits) stay on.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use h2::server::SendResponse;
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderValue, Request, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::h2body::{Recv, Send};

/// Limits of one client connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams the client may have open at once.
    pub max_streams: u32,
    /// Largest request header list.
    pub max_header_list: u32,
    /// Time allowed for the connection preface and, once idle, for the GOAWAY exchange.
    pub grace: Duration,
}

/// Serve one client connection: `handler` answers each request; `idle` completes when the
/// connection has had nothing in flight for the idle timeout (it is then closed with GOAWAY).
pub async fn serve<IO, H, F, B>(
    io: IO,
    limits: Limits,
    mut handler: H,
    idle: impl Future<Output = ()>,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Recv>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_list)
        .handshake::<_, Bytes>(io);
    let Ok(handshaken) = tokio::time::timeout(limits.grace, handshake).await else {
        return Ok(());
    };
    let mut conn = handshaken?;
    let mut streams = FuturesUnordered::new();
    let mut idle = pin!(idle);
    let mut closing: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| loop {
        // The connection: frames in and out, new streams.
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, reply)))) => {
                    // Dropped on a panic: h2 resets a stream whose responder is dropped.
                    let answer = respond(handler(req.map(Recv::new)), reply);
                    streams.push(std::panic::AssertUnwindSafe(answer).catch_unwind());
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        // The streams; one that finished has queued frames for the connection to write.
        let mut finished = false;
        while let Poll::Ready(Some(done)) = streams.poll_next_unpin(cx) {
            if done.is_err() {
                tracing::error!("a request panicked; its stream was reset");
            }
            finished = true;
        }
        if finished {
            continue;
        }
        match &mut closing {
            None => {
                if idle.as_mut().poll(cx).is_ready() {
                    tracing::debug!("idle HTTP/2 connection; sending GOAWAY");
                    conn.graceful_shutdown();
                    // Nothing is in flight: a peer that stalls the GOAWAY exchange is dropped
                    // after the grace period.
                    closing = Some(Box::pin(tokio::time::sleep(limits.grace)));
                    continue;
                }
            }
            Some(deadline) => {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
        }
        return Poll::Pending;
    })
    .await
}

/// Answer one stream: wait for the handler's response (a client reset first drops it), send
/// the head, then pipe the body; a body that fails resets the stream.
async fn respond<F, B>(handled: F, mut reply: SendResponse<Bytes>)
where
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
{
    let mut handled = pin!(handled);
    let answered = std::future::poll_fn(|cx| {
        if let Poll::Ready(resp) = handled.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        reply.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(resp) = answered else {
        return;
    };
    let (mut parts, body) = resp.into_parts();
    if !parts.headers.contains_key(DATE) {
        parts.headers.insert(DATE, date());
    }
    if let Some(len) = body.size_hint().exact() {
        if !parts.headers.contains_key(CONTENT_LENGTH) {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let end = body.is_end_stream();
    let stream = match reply.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "response head not sent");
            return;
        }
    };
    if end {
        return;
    }
    let mut send = Send::new(body, stream);
    if let Err(reason) = (&mut send).await {
        send.stream().send_reset(reason);
    }
}

/// The `Date` value for now, made at most once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            *cached = (
                second,
                HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("")),
            );
        }
        cached.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};

    #[tokio::test]
    async fn a_panicking_request_resets_its_stream_and_the_connection_serves_on() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let limits = Limits {
            max_streams: 10,
            max_header_list: 16 * 1024,
            grace: Duration::from_secs(5),
        };
        tokio::spawn(serve(
            server,
            limits,
            |req: Request<Recv>| async move {
                assert_ne!(req.uri().path(), "/panic", "this request panics");
                Response::new(Full::new(Bytes::from_static(b"ok")))
            },
            std::future::pending(),
        ));
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(client),
        )
        .await
        .expect("handshake");
        tokio::spawn(conn);
        let get = |path: &str| {
            Request::get(format!("http://a{path}"))
                .body(Empty::<Bytes>::new())
                .expect("request")
        };
        let panicked = send.send_request(get("/panic")).await;
        assert!(panicked.is_err(), "the stream is reset: {panicked:?}");
        for _ in 0..2 {
            let resp = send.send_request(get("/fine")).await.expect("answered");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
        }
    }

    #[test]
    fn date_is_an_http_date() {
        let value = date();
        let parsed = httpdate::parse_http_date(value.to_str().expect("ascii")).expect("parses");
        let now = SystemTime::now();
        let skew = now.duration_since(parsed).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(2), "{value:?} is {skew:?} away");
    }
}
