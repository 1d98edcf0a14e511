//! Listening sockets with `SO_REUSEPORT`, so several workers (and a replacement) share a port,
//! and the accept every listener of the worker (and the API) uses.
//!
//! With `net.ipv4.tcp_migrate_req=1` (Linux 5.14+), connections still queued on a worker that
//! closes its listener move to the others, which makes a replacement hitless; [`check_migrate`]
//! warns when it is off.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// A socket bound to its address (so conflicts show at start-up) but not yet listening, so it
/// takes no connections, and no share of the port's traffic, until [`Bound::listen`].
#[derive(Debug)]
pub struct Bound(Socket);

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not an IP socket"))
    }

    /// Start listening: from now on the kernel hands this worker its share of connections.
    pub fn listen(self) -> std::io::Result<TcpListener> {
        self.0.listen(4096)?;
        TcpListener::from_std(self.0.into())
    }
}

/// Bind a TCP socket with `SO_REUSEADDR` and `SO_REUSEPORT`, without listening yet.
pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(Bound(socket))
}

/// Log a warning when the kernel would reset queued connections of a closing listener.
pub fn check_migrate() {
    match std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req") {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => tracing::warn!(
            "net.ipv4.tcp_migrate_req is 0: connections queued on a stopping worker are reset; \
             set it to 1 for hitless worker restarts"
        ),
        Err(_) => {}
    }
}

/// The next connection. A failed accept (out of file descriptors and the like) is logged and
/// retried after a short pause instead of spinning. Cancel-safe, like `TcpListener::accept`.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let addr = listener.local_addr().ok();
                tracing::warn!(error = %e, ?addr, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
