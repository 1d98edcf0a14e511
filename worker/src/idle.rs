//! Idle tracking for long-lived client connections. [`Activity`] remembers when bytes last
//! moved (a passthrough or upgraded tunnel); [`Requests`] counts the requests in flight on a
//! terminated connection (HTTP/1.1 or HTTP/2) and says when it has had none for the idle
//! timeout, so the connection can be closed (with a GOAWAY on HTTP/2) instead of being held
//! open forever; [`HeadDeadline`] gives an HTTP/1.1 request head the header timeout from its
//! first byte, so the two timeouts are separate (NGINX's `keepalive_timeout` and
//! `client_header_timeout`); it also has the stream scanned for a head with a `Content-Length`
//! beside a `Transfer-Encoding` ([`crate::request_scan`]), which the server then refuses.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::request_scan::RequestScan;
use crate::terminate::ResBody;

/// When something last happened, cheap to update from any task: tunnels touch it for every
/// chunk they move. It keeps time by the kernel's coarse monotonic clock, which reads what the
/// last timer tick stored instead of reading a hardware counter, and needs no `Instant`
/// arithmetic (measured under callgrind, where both clocks are system calls: about 300
/// instructions less per new passthrough connection). Its resolution (one tick, 1-10 ms) is
/// allowed for: the idle time is never overstated, so a timeout fires up to a tick or two
/// late, never early.
#[derive(Debug)]
pub struct Activity {
    /// The coarse clock at the last touch (or at creation), in nanoseconds.
    last_ns: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            last_ns: AtomicU64::new(coarse::now_ns()),
        }
    }
}

impl Activity {
    /// Something happened now.
    pub fn touch(&self) {
        self.last_ns.store(coarse::now_ns(), Ordering::Relaxed);
    }

    /// How long since the last [`Activity::touch`] (or since creation), at least.
    pub fn idle_for(&self) -> Duration {
        let last = self.last_ns.load(Ordering::Relaxed);
        let elapsed = coarse::now_ns().saturating_sub(last);
        // Both readings may lag the true time by up to a tick: take one off to stay below.
        Duration::from_nanos(elapsed.saturating_sub(coarse::resolution_ns()))
    }
}

/// A monotonic clock in nanoseconds: Linux's `CLOCK_MONOTONIC_COARSE`.
#[cfg(target_os = "linux")]
pub(crate) mod coarse {
    use nix::sys::time::TimeSpec;
    use nix::time::{clock_getres, clock_gettime, ClockId};
    use std::sync::LazyLock;

    fn ns(t: TimeSpec) -> u64 {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    }

    pub fn now_ns() -> u64 {
        // Cannot fail on Linux 2.6.32 and later. Should it fail, it fails for every call (an
        // unknown clock), so all readings come from the fallback and stay consistent: a
        // constant instead would make every tunnel look busy forever.
        clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or_else(|_| fallback_ns(), ns)
    }

    pub(super) fn fallback_ns() -> u64 {
        static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
        START.elapsed().as_nanos() as u64
    }

    pub fn resolution_ns() -> u64 {
        static RESOLUTION: LazyLock<u64> =
            LazyLock::new(|| clock_getres(ClockId::CLOCK_MONOTONIC_COARSE).map_or(10_000_000, ns));
        *RESOLUTION
    }
}

/// A monotonic clock in nanoseconds: `Instant` elsewhere.
#[cfg(not(target_os = "linux"))]
pub(crate) mod coarse {
    use std::sync::LazyLock;
    use std::time::Instant;

    static START: LazyLock<Instant> = LazyLock::new(Instant::now);

    pub fn now_ns() -> u64 {
        START.elapsed().as_nanos() as u64
    }

    pub fn resolution_ns() -> u64 {
        0
    }
}

/// The requests in flight on one client connection.
#[derive(Debug, Default)]
pub struct Requests {
    in_flight: AtomicUsize,
    /// Requests started so far.
    started: AtomicU64,
    /// The connection switched protocols (a WebSocket): its bytes are no longer HTTP/1.1.
    upgraded: AtomicBool,
    /// The first request (counted from 1) whose head had both `Content-Length` and
    /// `Transfer-Encoding`; 0 for none.
    length_conflict: AtomicU64,
    activity: Activity,
}

/// One request in flight, from its arrival until its response body has been sent whole (or
/// the request was dropped).
#[derive(Debug)]
pub struct InFlight(Arc<Requests>, u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    /// This request switched the connection to another protocol (101): no more heads to time.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }

    /// Whether this request's head had both `Content-Length` and `Transfer-Encoding` (HTTP/1.1;
    /// found by [`HeadDeadline`]'s scan before hyper hands the request over).
    pub fn length_conflict(&self) -> bool {
        self.0.length_conflict.load(Ordering::Relaxed) == self.1
    }
}

impl Requests {
    /// A request has arrived.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        InFlight(self.clone(), started)
    }

    /// Completes once no request has been in flight for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        let mut wait = timeout;
        loop {
            tokio::time::sleep(wait).await;
            let since = self.activity.idle_for();
            wait = match self.in_flight.load(Ordering::Relaxed) {
                0 if since >= timeout => return,
                0 => timeout - since,
                // Busy now: it cannot be idle before `timeout` after the last one ends.
                _ => timeout,
            };
        }
    }
}

/// An HTTP/1.1 client stream whose reads fail with `TimedOut` once a request head has been
/// arriving for longer than the header timeout: from its first byte after the connection went
/// idle (or, for the first request, from the start) until the server takes the request. The
/// wait for that first byte is the idle timeout's business ([`Requests::idle`]). hyper's own
/// header timer cannot tell the two apart: it starts as soon as hyper waits for the next head.
///
/// Cheap on the hot path: no clock read or timer unless a read comes back empty while a head
/// is incomplete; the request scan looks at each head line's name and skips bodies by
/// their framing.
pub struct HeadDeadline<IO> {
    io: IO,
    requests: Arc<Requests>,
    timeout: Duration,
    /// A head has begun: the count of requests started when its first byte came, and its
    /// deadline once armed.
    head: Option<(u64, bool)>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    scan: RequestScan,
}

impl<IO> HeadDeadline<IO> {
    /// `io`, on which the first request's bytes have begun to arrive.
    pub fn new(io: IO, requests: Arc<Requests>, timeout: Duration) -> HeadDeadline<IO> {
        let started = requests.started.load(Ordering::Relaxed);
        HeadDeadline {
            io,
            requests,
            timeout,
            head: Some((started, false)),
            timer: None,
            scan: RequestScan::default(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let upgraded = this.requests.upgraded.load(Ordering::Relaxed);
        if buf.filled().len() > before && !upgraded && !this.scan.stopped() {
            // Every byte, bodies and pipelined heads included, so that each head is found.
            this.scan.feed(&buf.filled()[before..]);
            if let Some(n) = this.scan.conflict() {
                this.requests.length_conflict.store(n, Ordering::Relaxed);
            }
        }
        if upgraded || this.requests.in_flight.load(Ordering::Relaxed) > 0 {
            // Serving: these bytes are a body or a pipelined request, not a head to time.
            this.head = None;
            return polled;
        }
        let started = this.requests.started.load(Ordering::Relaxed);
        match (&polled, &mut this.head) {
            (Poll::Ready(Ok(())), head)
                if buf.filled().len() > before
                    && !matches!(*head, Some((at, _)) if at == started) =>
            {
                // The first bytes of a new head.
                *head = Some((started, false));
            }
            (Poll::Pending, Some((at, _))) if *at != started => {
                // That head became a request, served since: idle again.
                this.head = None;
            }
            (Poll::Pending, Some((_, armed))) => {
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.timeout)));
                if !*armed {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + this.timeout);
                    *armed = true;
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request head not complete within the header timeout",
                    )));
                }
            }
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until it has been sent whole
/// or dropped.
pub struct Held<B = ResBody> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// `body`, keeping `in_flight` until it has been sent whole or dropped (not boxed again: one
/// allocation per response less).
pub fn hold<B>(body: B, in_flight: InFlight) -> Held<B> {
    Held {
        inner: body,
        _in_flight: in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_clock_fallback_advances() {
        let before = coarse::fallback_ns();
        std::thread::sleep(Duration::from_millis(20));
        let waited = coarse::fallback_ns() - before;
        assert!(waited >= 20_000_000, "{waited} ns");
    }

    #[tokio::test]
    async fn idle_only_after_the_timeout_with_nothing_in_flight() {
        let requests = Arc::new(Requests::default());
        let timeout = Duration::from_millis(200);
        let request = requests.start();
        let idle = tokio::spawn({
            let requests = requests.clone();
            async move { requests.idle(timeout).await }
        });
        // A request in flight longer than the timeout keeps the connection busy (the scenario
        // itself is a span of time, so the test waits it out).
        tokio::time::sleep(timeout * 3).await;
        assert!(!idle.is_finished(), "idle while a request was in flight");
        drop(request);
        let ended = Instant::now();
        idle.await.expect("idle task");
        let waited = ended.elapsed();
        assert!(
            waited >= timeout && waited < timeout * 10,
            "idle {waited:?} after the last request ended"
        );
    }
}
