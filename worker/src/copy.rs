//! Moving bytes both ways between two TCP streams, verbatim: half-close is passed on (EOF one
//! way shuts down the write side of the other), and a connection idle in both directions for
//! longer than the idle timeout is closed.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::idle::Activity;

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Counters the bytes are added to as they pass (a host's metrics), besides the totals
/// [`Moved`] reports at the end: a tunnel may stay open for hours.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meters<'a> {
    pub client_to_server: Option<&'a AtomicU64>,
    pub server_to_client: Option<&'a AtomicU64>,
}

/// Idle timeout of a tunnel (a passthrough connection, an upgraded HTTP connection): no byte
/// either way for this long closes it (HAProxy's `timeout tunnel`).
pub const IDLE: Duration = Duration::from_secs(300);

/// Per-direction buffer by default. 16 KiB matches the TLS record size the streams mostly
/// carry; `bench/run` compares 8, 16 and 64 KiB.
pub const BUFFER: usize = 16 * 1024;

/// How a direction's end is passed on.
#[derive(Debug, Clone, Copy)]
struct Ends<'a> {
    /// Set by the first direction to see its EOF.
    one_ended: &'a AtomicBool,
    /// Dropping the streams sends the last EOF by itself (plain TCP: `close` sends the FIN;
    /// the receive buffer is empty, both reads having seen EOF). A TLS stream needs its
    /// `shutdown` for the close_notify.
    close_sends_eof: bool,
}

/// One direction, through `buf` (its half of the tunnel's buffer, never zeroed: reads fill
/// it); the idle timeout is kept by [`idle_watch`], one timer for both directions.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    activity: &Activity,
    buf: &mut [MaybeUninit<u8>],
    meter: Option<&AtomicU64>,
    ends: Ends<'_>,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = ReadBuf::uninit(buf);
    let mut total = 0u64;
    loop {
        buf.clear();
        std::future::poll_fn(|cx| Pin::new(&mut from).poll_read(cx, &mut buf)).await?;
        let n = buf.filled().len();
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction going. When the other
            // direction has ended already, both streams close next: the close passes this EOF
            // on when it can, saving a system call per connection.
            let last = ends.one_ended.swap(true, Ordering::Relaxed);
            if !(last && ends.close_sends_eof) {
                let _ = to.shutdown().await;
            }
            return Ok(total);
        }
        to.write_all(buf.filled()).await?;
        // A no-op on TCP; a TLS stream may hold the records it could not write yet.
        to.flush().await?;
        total += n as u64;
        if let Some(meter) = meter {
            meter.fetch_add(n as u64, Ordering::Relaxed);
        }
        activity.touch();
    }
}

/// Fails with `TimedOut` once no byte has moved either way for `idle`. One timer, registered
/// once and moved only when it fires early (traffic came meanwhile), instead of a timeout
/// armed around every read.
async fn idle_watch(idle: Duration, activity: &Activity) -> std::io::Error {
    let quiet = tokio::time::sleep(idle);
    tokio::pin!(quiet);
    loop {
        (&mut quiet).await;
        let since = activity.idle_for();
        if since >= idle {
            return std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout");
        }
        quiet
            .as_mut()
            .reset(tokio::time::Instant::now() + (idle - since));
    }
}

/// Copy both ways until both directions have ended (or one fails or the pair is idle).
pub async fn bidirectional(
    mut client: TcpStream,
    mut server: TcpStream,
    idle: Duration,
    buffer: usize,
    meters: Meters<'_>,
) -> std::io::Result<Moved> {
    // Borrowed halves: both directions run in this task, no shared ownership needed.
    both(client.split(), server.split(), idle, buffer, meters, true).await
}

/// [`bidirectional`] for any pair of streams (an upgraded HTTP connection and its upstream).
pub async fn tunnel<A, B>(
    client: A,
    server: B,
    idle: Duration,
    buffer: usize,
) -> std::io::Result<Moved>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    both(
        tokio::io::split(client),
        tokio::io::split(server),
        idle,
        buffer,
        Meters::default(),
        false,
    )
    .await
}

async fn both<CR, CW, SR, SW>(
    (cr, cw): (CR, CW),
    (sr, sw): (SR, SW),
    idle: Duration,
    buffer: usize,
    meters: Meters<'_>,
    close_sends_eof: bool,
) -> std::io::Result<Moved>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let activity = Activity::default();
    let one_ended = AtomicBool::new(false);
    let ends = Ends {
        one_ended: &one_ended,
        close_sends_eof,
    };
    // One allocation for both directions' buffers (a connection's mallocs are a measurable
    // part of its cost), left uninitialised.
    let mut buffers = Vec::<u8>::with_capacity(2 * buffer.max(1024));
    let (up_buf, down_buf) = buffers.spare_capacity_mut().split_at_mut(buffer.max(1024));
    let both_ways = async {
        tokio::try_join!(
            pump(cr, sw, &activity, up_buf, meters.client_to_server, ends),
            pump(sr, cw, &activity, down_buf, meters.server_to_client, ends)
        )
    };
    tokio::select! {
        biased;
        moved = both_ways => {
            let (up, down) = moved?;
            Ok(Moved {
                client_to_server: up,
                server_to_client: down,
            })
        }
        timed_out = idle_watch(idle, &activity) => Err(timed_out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Two connected pairs: (client, proxy's client side) and (proxy's server side, server).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let connect = TcpStream::connect(listener.local_addr().expect("addr"));
            let (connected, accepted) = tokio::join!(connect, listener.accept());
            (connected.expect("connect"), accepted.expect("accept").0)
        }
        let (client, inner) = pair().await;
        let (outer, server) = pair().await;
        ((client, inner), (outer, server))
    }

    #[tokio::test]
    async fn bytes_and_half_closes_pass_both_ways() {
        let ((mut client, inner), (outer, mut server)) = pairs().await;
        let metered = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let m = metered.clone();
        let copy = tokio::spawn(async move {
            let meters = Meters {
                client_to_server: Some(&m.0),
                server_to_client: Some(&m.1),
            };
            bidirectional(inner, outer, Duration::from_secs(5), 1024, meters).await
        });
        // 100 KiB through a 1 KiB buffer, then the client half-closes.
        let data: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
        client.write_all(&data).await.expect("write");
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.expect("read");
        // Counted as they passed, with the tunnel still open (the count follows the relay's
        // write, so it may trail the server's read by a moment).
        let counted = async {
            while metered.0.load(Ordering::Relaxed) < data.len() as u64 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .expect("the bytes counted while the tunnel is open");
        assert!(!copy.is_finished());
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("read to EOF");
        assert!(rest.is_empty());
        assert_eq!(got, data);
        // The other direction still works after the half-close.
        server.write_all(b"answer").await.expect("write back");
        server.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, b"answer");
        let moved = copy.await.expect("join").expect("copied");
        assert_eq!(
            moved,
            Moved {
                client_to_server: data.len() as u64,
                server_to_client: 6
            }
        );
        // The meters saw the same bytes.
        assert_eq!(metered.0.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(metered.1.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn a_pair_stuck_writing_both_ways_is_closed_when_idle() {
        // Neither end reads while both keep writing: once the socket buffers are full both
        // directions wait in their writes and no byte moves; the pair counts as idle.
        let idle = Duration::from_millis(300);
        let ((client, inner), (outer, server)) = pairs().await;
        let copy = tokio::spawn(bidirectional(inner, outer, idle, 1024, Meters::default()));
        let flood = |mut s: TcpStream| {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            })
        };
        let (a, b) = (flood(client), flood(server));
        let ended = tokio::time::timeout(Duration::from_secs(20), copy)
            .await
            .expect("the stuck pair was closed");
        let err = ended.expect("join").expect_err("idle timeout");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        a.abort();
        b.abort();
    }

    #[tokio::test]
    async fn a_pair_idle_both_ways_is_closed_but_one_busy_way_keeps_it_open() {
        let idle = Duration::from_millis(300);
        let ((mut client, inner), (outer, mut server)) = pairs().await;
        let copy = tokio::spawn(bidirectional(inner, outer, idle, 1024, Meters::default()));
        let mut last = Instant::now();
        // Traffic one way only, every 100 ms for 900 ms: the pair stays open.
        for _ in 0..9 {
            client.write_all(b"x").await.expect("write");
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.expect("relayed");
            last = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!copy.is_finished(), "closed while one direction was busy");
        // Then silence: closed once idle.
        let err = copy.await.expect("join").expect_err("idle timeout");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        // Counted from the last byte moved (the relay stamps it just before the server sees it).
        assert!(last.elapsed() >= idle - Duration::from_millis(20));
    }
}
