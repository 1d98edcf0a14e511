//! Keep-alive pool of HTTP/1.1 upstream connections, per server address: hyper client
//! connections (requests with a body, `https` servers) or the worker's own
//! ([`crate::upstream_h1`], requests without a body to `http` servers).
//!
//! A hyper connection goes back to the pool once its response body has been read to the end (the
//! [`Returning`] body does that) and hyper says it is ready for the next request; a connection
//! that is not ready yet (its dispatcher has not seen the end, or the client is still uploading)
//! is waited for by a small task, off the request path, the way hyper-util's client does it.
//! So only idle, ready connections are in the pool and both check-in and check-out are O(1):
//! the newest connection is handed out first (the warmest), the oldest expire first. The pool
//! belongs to the worker, not to a snapshot, so connections to unchanged servers survive a
//! configuration switch.
//!
//! Up to [`MAX_IDLE_PER_SERVER`] idle connections per server wait the full [`IDLE_TIMEOUT`];
//! those beyond it, the least recently used, wait [`EXCESS_IDLE_TIMEOUT`], so a load whose
//! concurrency moves around the limit reuses them instead of closing and reopening connections
//! (HAProxy purges idle connections the same way, every `pool-purge-delay`); beyond
//! [`HARD_MAX_IDLE_PER_SERVER`] the oldest closes at once. A sweep ([`Pool::sweep_every`]) applies
//! these limits to servers no request touches any more.

use std::collections::VecDeque;

use foldhash::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections per server kept for the whole [`IDLE_TIMEOUT`].
pub const MAX_IDLE_PER_SERVER: usize = 512;
/// How long the idle connections beyond [`MAX_IDLE_PER_SERVER`] are kept.
pub const EXCESS_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections per server beyond which the oldest closes at once (bounds descriptors).
pub const HARD_MAX_IDLE_PER_SERVER: usize = 4096;
/// How often [`Pool::sweep_every`] applies the limits.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What identifies interchangeable connections: the server address and every TLS setting.
/// Made once per server when a snapshot is built; cloning it per request only counts references.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub address: Arc<str>,
    /// `None` for cleartext; for TLS: SNI, verify flag and CA bundle hash.
    pub tls: Option<Arc<(String, bool, String)>>,
}

/// The body type of upstream requests.
pub type UpBody = crate::terminate::Watched;

/// A connection that can wait in the pool.
pub trait Reusable: Send + 'static {
    /// Still open and ready for a request (the server may have closed it while idle).
    fn is_usable(&mut self) -> bool;
}

impl Reusable for SendRequest<UpBody> {
    fn is_usable(&mut self) -> bool {
        self.is_ready()
    }
}

impl Reusable for crate::upstream_h1::Conn {
    fn is_usable(&mut self) -> bool {
        crate::upstream_h1::Conn::is_usable(self)
    }
}

struct Idle<C> {
    conn: C,
    since: Stamp,
}

/// When a connection went idle, by the kernel's coarse monotonic clock
/// ([`crate::idle::coarse`]), in nanoseconds. The idle timeouts are seconds long and the
/// coarse clock's tick (1-10 ms) does not matter to them; reading it reads no hardware counter,
/// where `Instant::now` does, and the pool reads the clock twice per request (a check-out and a
/// check-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(u64);

impl Stamp {
    fn now() -> Stamp {
        Stamp(crate::idle::coarse::now_ns())
    }

    /// How long from `earlier` to `self` (zero if `earlier` is later).
    fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// A reading `d` earlier (tests put in connections idle for a while).
#[cfg(test)]
impl std::ops::Sub<Duration> for Stamp {
    type Output = Stamp;

    fn sub(self, d: Duration) -> Stamp {
        Stamp(
            self.0
                .saturating_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// The pool: hyper client connections, or this worker's own HTTP/1.1 connections
/// ([`crate::upstream_h1`]).
pub struct Pool<C = SendRequest<UpBody>> {
    /// Per server, idle connections oldest first.
    idle: Mutex<HashMap<PoolKey, VecDeque<Idle<C>>>>,
}

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool {
            idle: Mutex::default(),
        }
    }
}

impl<C> std::fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl<C: Reusable> Pool<C> {
    /// The newest idle, ready connection to `key`, if there is one.
    pub fn checkout(&self, key: &PoolKey) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(mut c) = list.pop_back() {
            // Everything older is older still: expired too.
            if Stamp::now().since(c.since) >= IDLE_TIMEOUT {
                list.clear();
                break;
            }
            // Closed by the server while idle, or closing: skip it.
            if c.conn.is_usable() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Put an idle connection ready for its next request into the pool.
    pub fn insert(&self, key: PoolKey, conn: C) {
        self.insert_at(key, conn, Stamp::now());
    }

    /// [`Pool::insert`] of a connection idle since `now` (tests put in older ones).
    fn insert_at(&self, key: PoolKey, conn: C, now: Stamp) {
        // Declared before the lock, so the closed connections are dropped after it is released.
        let mut closed = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        list.push_back(Idle { conn, since: now });
        trim(list, now, &mut closed);
    }

    /// Sweep every [`SWEEP_INTERVAL`] for as long as the pool is in use.
    pub async fn sweep_every(pool: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.sweep();
        }
    }

    /// Close the connections the limits say are over, on every server, and forget servers
    /// left with none (their hosts may be gone).
    pub fn sweep(&self) {
        self.sweep_at(Stamp::now());
    }

    /// [`Pool::sweep`] at `now` (tests choose it).
    fn sweep_at(&self, now: Stamp) {
        let mut closed = Vec::new();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            trim(list, now, &mut closed);
            !list.is_empty()
        });
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
            .map(VecDeque::len)
            .sum()
    }
}

/// Take off the front (the longest idle) every connection past its time: [`IDLE_TIMEOUT`], or
/// [`EXCESS_IDLE_TIMEOUT`] while more than [`MAX_IDLE_PER_SERVER`] wait, or at once beyond
/// [`HARD_MAX_IDLE_PER_SERVER`]. The list is in the order the connections went idle.
fn trim<C>(list: &mut VecDeque<Idle<C>>, now: Stamp, closed: &mut Vec<C>) {
    while let Some(oldest) = list.front() {
        let idle = now.since(oldest.since);
        let over = list.len() > HARD_MAX_IDLE_PER_SERVER
            || idle >= IDLE_TIMEOUT
            || (list.len() > MAX_IDLE_PER_SERVER && idle >= EXCESS_IDLE_TIMEOUT);
        if !over {
            break;
        }
        if let Some(c) = list.pop_front() {
            closed.push(c.conn);
        }
    }
}

impl Pool {
    /// Give a connection back after its exchange finished: into the pool if it is ready for
    /// another request, else once it is (a task waits; a connection that closes instead is
    /// dropped).
    pub fn checkin(self: &Arc<Self>, key: PoolKey, mut sender: SendRequest<UpBody>) {
        match sender.ready().now_or_never() {
            Some(Ok(())) => self.insert(key, sender),
            Some(Err(_)) => {}
            None => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let pool = self.clone();
                runtime.spawn(async move {
                    if sender.ready().await.is_ok() {
                        pool.insert(key, sender);
                    }
                });
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

    /// The body every answer carries: larger than the socket and hyper buffers, so a response
    /// is only over once its body has been read.
    const BODY: usize = 1 << 20;

    /// A client connection to an in-process server that names its connection in every answer
    /// (header `conn`), closing it after the answer when `close`.
    async fn connect(close: bool) -> SendRequest<UpBody> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed).to_string();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let mut resp = hyper::Response::new(Full::new(Bytes::from(vec![7u8; BODY])));
                resp.headers_mut()
                    .insert("conn", id.parse().expect("header value"));
                if close {
                    resp.headers_mut()
                        .insert("connection", "close".parse().expect("header value"));
                }
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        sender
    }

    fn key() -> PoolKey {
        PoolKey {
            address: Arc::from("127.0.0.1:1"),
            tls: None,
        }
    }

    /// Send one request; the connection's id and the response body, unread.
    async fn ask(sender: &mut SendRequest<UpBody>) -> (String, Incoming) {
        let (body, _sent) = crate::terminate::Watched::new(None);
        let resp = sender
            .send_request(hyper::Request::new(body))
            .await
            .expect("response");
        let id = resp.headers()["conn"].to_str().expect("id").to_owned();
        (id, resp.into_body())
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !what() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition reached");
    }

    /// A connection that stands for itself in the limit tests.
    #[derive(Debug, PartialEq)]
    struct Fake(usize);

    impl Reusable for Fake {
        fn is_usable(&mut self) -> bool {
            true
        }
    }

    /// A clock reading at least twice the idle timeout after the clock's zero (the machine's
    /// boot), so that "idle for the timeout" is a time that can have passed.
    fn test_now() -> Stamp {
        Stamp::now().max(Stamp(2 * IDLE_TIMEOUT.as_nanos() as u64))
    }

    /// `n` connections, numbered in the order they went idle, all idle for `for_`.
    fn idle_list(n: usize, for_: Duration, now: Stamp) -> VecDeque<Idle<Fake>> {
        (0..n)
            .map(|i| Idle {
                conn: Fake(i),
                since: now - for_,
            })
            .collect()
    }

    #[test]
    fn connections_beyond_the_limit_are_kept_a_while_then_the_oldest_close() {
        let now = test_now();
        let mut closed = Vec::new();
        // Idle for a moment: a load around the limit gets them back, nothing closes.
        let mut list = idle_list(MAX_IDLE_PER_SERVER + 3, Duration::from_secs(1), now);
        trim(&mut list, now, &mut closed);
        assert_eq!(list.len(), MAX_IDLE_PER_SERVER + 3);
        assert!(closed.is_empty());
        // Past the short timeout: back to the limit, the three that went idle first closed.
        let mut list = idle_list(MAX_IDLE_PER_SERVER + 3, EXCESS_IDLE_TIMEOUT, now);
        trim(&mut list, now, &mut closed);
        assert_eq!(list.len(), MAX_IDLE_PER_SERVER);
        assert_eq!(closed, vec![Fake(0), Fake(1), Fake(2)]);
        assert_eq!(list.front().map(|c| &c.conn), Some(&Fake(3)));
    }

    #[test]
    fn connections_within_the_limit_wait_the_full_idle_timeout() {
        let now = test_now();
        let mut closed = Vec::new();
        let mut list = idle_list(
            MAX_IDLE_PER_SERVER,
            IDLE_TIMEOUT - Duration::from_secs(1),
            now,
        );
        trim(&mut list, now, &mut closed);
        assert_eq!(list.len(), MAX_IDLE_PER_SERVER);
        let mut list = idle_list(3, IDLE_TIMEOUT, now);
        trim(&mut list, now, &mut closed);
        assert!(list.is_empty());
        assert_eq!(closed.len(), 3);
    }

    #[test]
    fn beyond_the_hard_limit_the_oldest_closes_at_once() {
        let now = test_now();
        let mut closed = Vec::new();
        let mut list = idle_list(HARD_MAX_IDLE_PER_SERVER + 2, Duration::ZERO, now);
        trim(&mut list, now, &mut closed);
        assert_eq!(list.len(), HARD_MAX_IDLE_PER_SERVER);
        assert_eq!(closed, vec![Fake(0), Fake(1)]);
    }

    #[test]
    fn a_sweep_closes_what_no_request_came_back_for_and_forgets_emptied_servers() {
        let pool: Pool<Fake> = Pool::default();
        let now = test_now();
        let other = PoolKey {
            address: Arc::from("127.0.0.1:2"),
            tls: None,
        };
        // One server: three connections past the timeout, one fresh. Another: one past it.
        for i in 0..3 {
            pool.insert_at(key(), Fake(i), now - IDLE_TIMEOUT);
        }
        pool.insert_at(key(), Fake(3), now);
        pool.insert_at(other.clone(), Fake(4), now - IDLE_TIMEOUT);
        // Inserting trims too: only what was idle too long when the last one came back is gone.
        assert_eq!(pool.idle_count(), 2);
        pool.sweep_at(now);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(pool.checkout(&key()), Some(Fake(3)));
        let idle = pool.idle.lock().expect("lock");
        assert!(
            !idle.contains_key(&other),
            "a server with no connection left is forgotten"
        );
    }

    #[tokio::test]
    async fn newest_connection_first_then_older_then_none() {
        let pool = Arc::new(Pool::default());
        let mut a = connect(false).await;
        let mut b = connect(false).await;
        let (id_a, body_a) = ask(&mut a).await;
        let (id_b, body_b) = ask(&mut b).await;
        body_a.collect().await.expect("body");
        body_b.collect().await.expect("body");
        pool.checkin(key(), a);
        pool.checkin(key(), b);
        until(|| pool.idle_count() == 2).await;
        let mut first = pool.checkout(&key()).expect("a connection");
        assert_eq!(ask(&mut first).await.0, id_b);
        let mut second = pool.checkout(&key()).expect("another connection");
        assert_eq!(ask(&mut second).await.0, id_a);
        assert!(pool.checkout(&key()).is_none());
    }

    #[tokio::test]
    async fn a_connection_mid_response_joins_once_its_body_is_read() {
        let pool = Arc::new(Pool::default());
        let mut sender = connect(false).await;
        let (_, body) = ask(&mut sender).await;
        pool.checkin(key(), sender);
        // Not ready while its response is unread: not handed out.
        assert!(pool.checkout(&key()).is_none());
        assert_eq!(body.collect().await.expect("body").to_bytes().len(), BODY);
        until(|| pool.idle_count() == 1).await;
        assert!(pool.checkout(&key()).is_some());
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_kept() {
        let pool = Arc::new(Pool::default());
        let mut sender = connect(true).await;
        let (_, body) = ask(&mut sender).await;
        body.collect().await.expect("body");
        pool.checkin(key(), sender);
        // The waiting task ends without putting it back; nothing is ever handed out.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.idle_count(), 0);
        assert!(pool.checkout(&key()).is_none());
    }
}
