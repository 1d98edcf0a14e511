//! Upstream HTTP/2: per server, a small set of multiplexed connections shared by every client
//! connection and every thread of the worker.
//!
//! A request leases a stream slot on the first live connection with room under the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; only when every connection is full does a new one open
//! (one at a time per server, so a burst of clients shares the first connection instead of
//! racing to open their own). A new connection is published only after a PING round trip, by
//! which time the peer's SETTINGS have been read and its stream limit is known. Each connection
//! has a task that drives it, PINGs it to keep it alive and detect a dead peer, and retires it
//! when an extra connection has been idle for a while. The pool belongs to the worker, so
//! connections survive configuration switches.

use foldhash::{HashMap, HashMapExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sluice_shared::channel::UpstreamStats;

use crate::pool::PoolKey;
use crate::upstream::UpstreamError;

/// How often a connection is PINGed.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a PING may go unanswered before the connection counts as dead.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time after which an extra connection (not the server's only one) closes.
pub const EXTRA_IDLE: Duration = Duration::from_secs(30);
/// Idle time after which even the only connection to a server closes.
pub const LAST_IDLE: Duration = Duration::from_secs(300);
/// Per-stream receive window by default (hyper's client default; `bench/run` compares sizes).
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Per-connection receive window by default, shared by all of its streams.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Receive windows of upstream HTTP/2 connections: how much a server may send before the
/// worker has passed it on to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

impl Default for Windows {
    fn default() -> Windows {
        Windows {
            stream: STREAM_WINDOW,
            connection: CONNECTION_WINDOW,
        }
    }
}

impl Windows {
    /// `stream_kib` per stream and eight times that per connection (the defaults' ratio),
    /// within HTTP/2's limits (64 KiB - 1 at least as sent by default, 2^31 - 1 at most).
    pub fn from_kib(stream_kib: u32) -> Windows {
        const MAX: u32 = (1 << 31) - 1;
        let stream = stream_kib.saturating_mul(1024).clamp(65_535, MAX);
        Windows {
            stream,
            connection: stream.saturating_mul(8).min(MAX),
        }
    }
}
/// How long an `https` server whose ALPN chose HTTP/1.1 is taken to speak only that; then the
/// next new connection offers `h2` again.
pub const H1_ONLY_RECHECK: Duration = Duration::from_secs(300);
/// Streams assumed allowed before the peer's SETTINGS arrive.
const INITIAL_STREAMS: usize = 100;

/// A driven HTTP/2 client connection, fresh from its handshake.
pub struct Handshaken {
    pub send: SendRequest<Bytes>,
    pub ping: PingPong,
    /// Drives the connection; ends when it closes.
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// What an opener made: an HTTP/2 connection, or (for `https` backends whose ALPN chose
/// HTTP/1.1) an HTTP/1.1 one.
pub enum Opened {
    H2(Handshaken),
    H1(hyper::client::conn::http1::SendRequest<crate::pool::UpBody>),
}

/// Handshake HTTP/2 over `io` with these receive windows.
pub async fn handshake<T>(io: T, windows: Windows) -> Result<Handshaken, h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(windows.stream)
        .initial_connection_window_size(windows.connection)
        .initial_max_send_streams(INITIAL_STREAMS)
        .max_concurrent_reset_streams(256)
        .handshake::<_, Bytes>(io)
        .await?;
    let ping = connection
        .ping_pong()
        .ok_or_else(|| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
    let driver = Box::pin(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Handshaken { send, ping, driver })
}

/// One multiplexed connection.
pub struct H2Conn {
    send: SendRequest<Bytes>,
    in_flight: AtomicUsize,
    /// Set once the connection is dead or going away: no new streams.
    closed: AtomicBool,
    /// On tokio's clock, like the keep-alive timer that reads it.
    idle_since: Mutex<tokio::time::Instant>,
}

impl H2Conn {
    /// A handle to open a stream with.
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }

    /// No new streams from now on (GOAWAY seen, or a connection error).
    pub fn retire(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn room(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.in_flight.load(Ordering::Acquire) < self.send.current_max_send_streams()
    }
}

/// Per-server metric handles.
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    pub connections: Gauge,
    pub streams: Gauge,
    pub requests: Counter,
    pub opened: Counter,
}

/// The connections to one server (one pool key).
pub struct Server {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Held while a connection is being opened.
    opening: tokio::sync::Mutex<()>,
    /// The last failed open: waiters that queued before it fail fast with the same error.
    failed: Mutex<Option<(Instant, String)>>,
    /// When an `https` server's ALPN last chose HTTP/1.1: until [`H1_ONLY_RECHECK`] has
    /// passed, requests to it use the HTTP/1.1 pool.
    h1_only: Mutex<Option<Instant>>,
    metrics: ServerMetrics,
}

impl Server {
    fn try_lease(self: &Arc<Self>) -> Option<Lease> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let conn = conns.iter().find(|c| c.room())?.clone();
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        drop(conns);
        self.metrics.streams.inc();
        self.metrics.requests.inc();
        Some(Lease {
            conn,
            server: self.clone(),
        })
    }

    fn remove(&self, conn: &Arc<H2Conn>) {
        conn.retire();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let before = conns.len();
        conns.retain(|c| !Arc::ptr_eq(c, conn));
        if conns.len() < before {
            self.metrics.connections.dec();
        }
    }

    /// Whether this idle connection should close now (checked and removed under one lock, so
    /// no lease can slip in between).
    fn retire_if_idle(&self, conn: &Arc<H2Conn>) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conn.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let idle = conn
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        let others = conns.iter().any(|c| !Arc::ptr_eq(c, conn) && c.room());
        if idle < EXTRA_IDLE || (!others && idle < LAST_IDLE) {
            return false;
        }
        conn.retire();
        conns.retain(|c| !Arc::ptr_eq(c, conn));
        self.metrics.connections.dec();
        true
    }

    pub fn stats(&self) -> UpstreamStats {
        let requests = self.metrics.requests.get();
        let opened = self.metrics.opened.get();
        UpstreamStats {
            protocol: "h2".into(),
            connections: self.metrics.connections.get().max(0) as u64,
            streams_in_flight: self.metrics.streams.get().max(0) as u64,
            requests,
            connections_opened: opened,
            reuse_ratio: if opened == 0 {
                None
            } else {
                Some(requests as f64 / opened as f64)
            },
        }
    }
}

/// A stream slot on a connection; dropping it frees the slot.
pub struct Lease {
    conn: Arc<H2Conn>,
    server: Arc<Server>,
}

impl Lease {
    pub fn conn(&self) -> &Arc<H2Conn> {
        &self.conn
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        }
        self.server.metrics.streams.dec();
    }
}

/// What [`H2Pool::acquire`] hands out.
pub enum Acquired {
    H2(Lease),
    /// The server turned out to speak HTTP/1.1 only (ALPN); here is a fresh connection to it.
    H1(hyper::client::conn::http1::SendRequest<crate::pool::UpBody>),
}

/// Makes the metric handles of one server, by address.
pub type MetricsFactory = Arc<dyn Fn(&str) -> ServerMetrics + Send + Sync>;

/// The pool of upstream HTTP/2 connections.
#[derive(Default)]
pub struct H2Pool {
    servers: Mutex<HashMap<PoolKey, Arc<Server>>>,
    /// Makes per-server metric handles (set by the worker at start).
    metrics: Option<MetricsFactory>,
    /// Receive windows of new connections.
    windows: Windows,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H2Pool")
    }
}

impl H2Pool {
    /// A pool whose per-server metrics come from `metrics`.
    pub fn new(metrics: MetricsFactory, windows: Windows) -> H2Pool {
        H2Pool {
            servers: Mutex::default(),
            metrics: Some(metrics),
            windows,
        }
    }

    /// The receive windows new connections get.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    fn server(&self, key: &PoolKey) -> Arc<Server> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = servers.get(key) {
            return s.clone();
        }
        let metrics = self
            .metrics
            .as_ref()
            .map(|m| m(&key.address))
            .unwrap_or_default();
        let s = Arc::new(Server {
            conns: Mutex::default(),
            opening: tokio::sync::Mutex::new(()),
            failed: Mutex::default(),
            h1_only: Mutex::default(),
            metrics,
        });
        servers.insert(key.clone(), s.clone());
        s
    }

    /// Whether `key` is an `https` server known to speak HTTP/1.1 only (learned less than
    /// [`H1_ONLY_RECHECK`] ago: a server upgraded to HTTP/2 is noticed without a restart).
    pub fn is_h1_only(&self, key: &PoolKey) -> bool {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.get(key).is_some_and(|s| {
            still_h1_only(
                *s.h1_only.lock().unwrap_or_else(|e| e.into_inner()),
                Instant::now(),
            )
        })
    }

    /// A stream slot to `key`, opening a connection with `open` when every connection is full.
    pub async fn acquire<F, Fut>(&self, key: &PoolKey, open: F) -> Result<Acquired, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Opened, UpstreamError>>,
    {
        let server = self.server(key);
        if let Some(lease) = server.try_lease() {
            return Ok(Acquired::H2(lease));
        }
        let queued_at = Instant::now();
        let _opening = server.opening.lock().await;
        if let Some(lease) = server.try_lease() {
            return Ok(Acquired::H2(lease));
        }
        if let Some((at, reason)) = &*server.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            if *at >= queued_at {
                return Err(UpstreamError::Connect {
                    server: key.address.to_string(),
                    reason: reason.clone(),
                });
            }
        }
        let opened = match open().await {
            Ok(o) => o,
            Err(e) => {
                *server.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        let hs = match opened {
            Opened::H2(hs) => hs,
            Opened::H1(sender) => {
                *server.h1_only.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                return Ok(Acquired::H1(sender));
            }
        };
        let conn = publish(&server, hs).await.map_err(|reason| {
            *server.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), reason.clone()));
            UpstreamError::Connect {
                server: key.address.to_string(),
                reason,
            }
        })?;
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        drop(_opening);
        server.metrics.streams.inc();
        server.metrics.requests.inc();
        Ok(Acquired::H2(Lease { conn, server }))
    }

    /// Connection figures per server address (summed over pool keys), for reports.
    pub fn stats(&self) -> HashMap<String, UpstreamStats> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: HashMap<String, UpstreamStats> = HashMap::new();
        for (key, server) in servers.iter() {
            let s = server.stats();
            if s.connections_opened == 0 {
                continue;
            }
            match out.get_mut(&*key.address) {
                None => {
                    out.insert(key.address.to_string(), s);
                }
                Some(sum) => {
                    sum.connections += s.connections;
                    sum.streams_in_flight += s.streams_in_flight;
                    sum.requests += s.requests;
                    sum.connections_opened += s.connections_opened;
                    sum.reuse_ratio =
                        Some(sum.requests as f64 / sum.connections_opened.max(1) as f64);
                }
            }
        }
        out
    }
}

/// Start driving a fresh connection, wait one PING round trip (the peer's SETTINGS come
/// before its PONG), then add it to the server's connections.
async fn publish(server: &Arc<Server>, hs: Handshaken) -> Result<Arc<H2Conn>, String> {
    let Handshaken {
        send,
        mut ping,
        mut driver,
    } = hs;
    let pong = tokio::select! {
        _ = &mut driver => return Err("the connection closed during the handshake".into()),
        r = tokio::time::timeout(crate::upstream::CONNECT_TIMEOUT, ping.ping(Ping::opaque())) => r,
    };
    match pong {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("HTTP/2 handshake: {e}")),
        Err(_) => return Err("HTTP/2 handshake timed out".into()),
    }
    let conn = Arc::new(H2Conn {
        send,
        in_flight: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        idle_since: Mutex::new(tokio::time::Instant::now()),
    });
    server
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(conn.clone());
    server.metrics.connections.inc();
    server.metrics.opened.inc();
    tokio::spawn(keep(
        Arc::downgrade(server),
        Arc::downgrade(&conn),
        ping,
        driver,
    ));
    Ok(conn)
}

/// Drive one connection until it closes: PING it every [`KEEPALIVE`], close it when it is dead
/// or has been idle too long.
async fn keep(
    server: Weak<Server>,
    conn: Weak<H2Conn>,
    mut ping: PingPong,
    mut driver: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut driver => break,
            _ = tick.tick() => {}
        }
        let (Some(s), Some(c)) = (server.upgrade(), conn.upgrade()) else {
            return;
        };
        if s.retire_if_idle(&c) {
            // Leases are gone and the pool no longer hands it out: drop it.
            return;
        }
        drop((s, c));
        let alive = tokio::select! {
            _ = &mut driver => false,
            r = tokio::time::timeout(PING_TIMEOUT, ping.ping(Ping::opaque())) => matches!(r, Ok(Ok(_))),
        };
        if !alive {
            tracing::debug!("upstream HTTP/2 connection did not answer a PING; closing it");
            break;
        }
    }
    if let (Some(s), Some(c)) = (server.upgrade(), conn.upgrade()) {
        s.remove(&c);
    }
}

/// Whether a server that chose HTTP/1.1 at `learned` still counts as HTTP/1.1-only at `now`.
fn still_h1_only(learned: Option<Instant>, now: Instant) -> bool {
    learned.is_some_and(|at| now.saturating_duration_since(at) < H1_ONLY_RECHECK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// An in-memory HTTP/2 server for one connection, allowing `max_streams` concurrent
    /// streams; it stops reading (so PINGs go unanswered) once `freeze` is notified.
    fn serve(io: tokio::io::DuplexStream, max_streams: u32, freeze: Arc<tokio::sync::Notify>) {
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(io)
                .await
                .expect("server handshake");
            loop {
                tokio::select! {
                    accepted = conn.accept() => if accepted.is_none() { return },
                    () = freeze.notified() => {
                        // Alive but deaf: hold the connection, never poll it again.
                        std::future::pending::<()>().await;
                    }
                }
            }
        });
    }

    /// A stream slot from `pool`, opening a connection to a fresh in-memory server if needed.
    async fn lease(pool: &H2Pool, key: &PoolKey, freeze: &Arc<tokio::sync::Notify>) -> Lease {
        let open = || async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            serve(server, 1, freeze.clone());
            Ok(Opened::H2(
                handshake(client, Windows::default())
                    .await
                    .expect("handshake"),
            ))
        };
        match pool.acquire(key, open).await.expect("acquire") {
            Acquired::H2(lease) => lease,
            Acquired::H1(_) => unreachable!("an HTTP/2 opener"),
        }
    }

    fn open_connections(pool: &H2Pool) -> u64 {
        pool.stats().values().map(|s| s.connections).sum()
    }

    fn key() -> PoolKey {
        PoolKey {
            address: "10.0.0.1:80".into(),
            tls: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_peer_stops_answering_pings_is_dropped() {
        let pool = H2Pool::default();
        let freeze = Arc::new(tokio::sync::Notify::new());
        drop(lease(&pool, &key(), &freeze).await);
        assert_eq!(open_connections(&pool), 1);
        freeze.notify_waiters();
        // Idle, so the keep-alive PING goes out after KEEPALIVE; unanswered, it fails after
        // PING_TIMEOUT more (paused time: the clock jumps to each timer).
        tokio::time::sleep(KEEPALIVE + PING_TIMEOUT - Duration::from_secs(1)).await;
        assert_eq!(open_connections(&pool), 1, "not before the PING timed out");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(open_connections(&pool), 0, "a dead connection is dropped");
        // The next request opens a new one.
        let freeze = Arc::new(tokio::sync::Notify::new());
        let _lease = lease(&pool, &key(), &freeze).await;
        assert_eq!(open_connections(&pool), 1);
        assert_eq!(pool.stats()["10.0.0.1:80"].connections_opened, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_extra_connection_closes_when_idle_and_the_last_one_later() {
        let pool = H2Pool::default();
        let freeze = Arc::new(tokio::sync::Notify::new());
        // One stream per connection: a second concurrent request needs a second connection.
        let (a, b) = (
            lease(&pool, &key(), &freeze).await,
            lease(&pool, &key(), &freeze).await,
        );
        assert_eq!(open_connections(&pool), 2);
        drop((a, b));
        // PINGs keep both alive, but the extra one closes after EXTRA_IDLE (checked on the
        // next keep-alive tick)...
        tokio::time::sleep(EXTRA_IDLE + KEEPALIVE).await;
        assert_eq!(open_connections(&pool), 1);
        // ...and the last one only after LAST_IDLE.
        tokio::time::sleep(LAST_IDLE - EXTRA_IDLE - KEEPALIVE * 2).await;
        assert_eq!(open_connections(&pool), 1);
        tokio::time::sleep(KEEPALIVE * 3).await;
        assert_eq!(open_connections(&pool), 0);
    }

    #[test]
    fn an_http1_only_server_is_asked_again_after_the_recheck_time() {
        let learned = Instant::now();
        assert!(!still_h1_only(None, learned));
        assert!(still_h1_only(Some(learned), learned));
        assert!(still_h1_only(
            Some(learned),
            learned + H1_ONLY_RECHECK - Duration::from_millis(1)
        ));
        assert!(!still_h1_only(Some(learned), learned + H1_ONLY_RECHECK));
    }

    #[test]
    fn windows_from_kib_keep_the_ratio_within_http2_limits() {
        assert_eq!(
            Windows::from_kib(2048),
            Windows {
                stream: 2 << 20,
                connection: 16 << 20
            }
        );
        // Below the protocol's default window: raised to it; beyond 2^31 - 1: capped.
        assert_eq!(Windows::from_kib(1).stream, 65_535);
        let huge = Windows::from_kib(u32::MAX);
        assert_eq!(
            (huge.stream, huge.connection),
            ((1 << 31) - 1, (1 << 31) - 1)
        );
        assert_eq!(Windows::default(), Windows::from_kib(2048));
    }
}
