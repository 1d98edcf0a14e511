//! Keep-alive pool of HTTP/1.1 upstream connections, per server address.
//!
//! A connection goes back to the pool when its response body has been read to the end (the
//! [`Returning`] body does that), so only idle, ready connections are ever handed out. The pool
//! belongs to the worker, not to a snapshot, so connections to unchanged servers survive a
//! configuration switch.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per server.
pub const MAX_IDLE_PER_SERVER: usize = 512;

/// What identifies interchangeable connections: the server address and every TLS setting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub address: String,
    /// `None` for cleartext; for TLS: SNI, verify flag and CA bundle hash.
    pub tls: Option<(String, bool, String)>,
}

/// The body type of upstream requests.
pub type UpBody = crate::terminate::Watched;

struct Idle {
    sender: SendRequest<UpBody>,
    since: Instant,
}

/// The pool.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// An idle, ready connection to `key`, if there is one.
    pub fn checkout(&self, key: &PoolKey) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(mut c) = list.pop() {
            if c.sender.is_closed() || c.since.elapsed() >= IDLE_TIMEOUT {
                continue;
            }
            // A connection whose last response just ended may not have noticed yet: poll it
            // once; if it is still busy, keep it for later instead of dropping it.
            match c.sender.ready().now_or_never() {
                Some(Ok(())) => {
                    found = Some(c.sender);
                    break;
                }
                Some(Err(_)) => {}
                None => busy.push(c),
            }
        }
        list.extend(busy);
        found
    }

    /// Give a connection back after its exchange finished.
    pub fn checkin(&self, key: PoolKey, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT);
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drop every idle connection to `key` (one just failed: the others are suspect).
    pub fn purge(&self, key: &PoolKey) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Number of idle connections held (for metrics and tests).
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// A response body that returns its connection to the pool when it has been read to the end.
pub struct Returning {
    body: Incoming,
    back: Option<(Arc<Pool>, PoolKey, SendRequest<UpBody>)>,
}

impl Returning {
    pub fn new(
        body: Incoming,
        pool: Arc<Pool>,
        key: PoolKey,
        sender: SendRequest<UpBody>,
    ) -> Returning {
        let mut r = Returning {
            body,
            back: Some((pool, key, sender)),
        };
        if r.body.is_end_stream() {
            r.give_back();
        }
        r
    }

    fn give_back(&mut self) {
        if let Some((pool, key, sender)) = self.back.take() {
            pool.checkin(key, sender);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response: it is not reused.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            // Servers stop polling once `is_end_stream` says so: hand back on the last frame.
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
