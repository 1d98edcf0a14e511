//! Moving bytes both ways between two TCP streams, verbatim: half-close is passed on (EOF one
//! way shuts down the write side of the other), and a connection idle in both directions for
//! longer than the idle timeout is closed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Per-direction buffer by default. 16 KiB matches the TLS record size the streams mostly
/// carry; `bench/buffers` compares 8, 16 and 64 KiB.
pub const BUFFER: usize = 16 * 1024;

struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    idle: Duration,
    activity: &Activity,
    buffer: usize,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; buffer.max(1024)];
    let mut total = 0u64;
    loop {
        let n = match tokio::time::timeout(idle, from.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) if activity.idle_for() < idle => continue,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "idle timeout",
                ))
            }
        };
        if n == 0 {
            // Half-close: pass the EOF on and keep the other direction going.
            let _ = to.shutdown().await;
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        activity.touch();
    }
}

/// Copy both ways until both directions have ended (or one fails or the pair is idle).
pub async fn bidirectional(
    client: TcpStream,
    server: TcpStream,
    idle: Duration,
    buffer: usize,
) -> std::io::Result<Moved> {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (up, down) = tokio::try_join!(
        pump(cr, sw, idle, &activity, buffer),
        pump(sr, cw, idle, &activity, buffer)
    )?;
    Ok(Moved {
        client_to_server: up,
        server_to_client: down,
    })
}
