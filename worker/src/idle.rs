//! Idle tracking for long-lived client connections. [`Activity`] remembers when bytes last
//! moved (a passthrough or upgraded tunnel); [`Requests`] counts the requests in flight on a
//! multiplexed HTTP/2 connection and says when it has had none for the idle timeout, so the
//! connection can be closed with a GOAWAY instead of being held open forever.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::terminate::{BoxError, ResBody};

/// When something last happened, cheap to update from any task.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Something happened now.
    pub fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last [`Activity::touch`] (or since creation).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// The requests in flight on one client connection.
#[derive(Debug, Default)]
pub struct Requests {
    in_flight: AtomicUsize,
    activity: Activity,
}

/// One request in flight, from its arrival until its response body has been sent whole (or
/// the request was dropped).
#[derive(Debug)]
pub struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Requests {
    /// A request has arrived.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
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

/// `body`, keeping `in_flight` until it has been sent whole or dropped.
pub fn hold(body: ResBody, in_flight: InFlight) -> ResBody {
    struct Held {
        inner: ResBody,
        _in_flight: InFlight,
    }
    impl hyper::body::Body for Held {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
            std::pin::Pin::new(&mut self.inner).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            self.inner.size_hint()
        }
    }
    Held {
        inner: body,
        _in_flight: in_flight,
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

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
