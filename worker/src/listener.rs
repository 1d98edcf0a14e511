//! Listening sockets with `SO_REUSEPORT`, so several workers (and a replacement) share a port,
//! and the accept every listener of the worker (and the API) uses.
//!
//! With `net.ipv4.tcp_migrate_req=1` (Linux 5.14+), connections still queued on a worker that
//! closes its listener move to the others, which makes a replacement hitless; [`check_migrate`]
//! warns when it is off.
//!
//! The traffic listeners defer accepting (`TCP_DEFER_ACCEPT`, HAProxy's `defer-accept`, NGINX's
//! `listen ... deferred`): the kernel hands a connection over once its client has spoken (a
//! ClientHello, a request line), so accepting it and reading its first bytes take one wake-up
//! instead of two, and a client that connects and says nothing costs the worker nothing until
//! [`DEFER_ACCEPT_SECS`] have passed (then the hello timeout applies as before).

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

    /// Start listening: from now on the kernel hands this worker its share of connections,
    /// each once its client has sent something or after [`DEFER_ACCEPT_SECS`].
    pub fn listen(self) -> std::io::Result<TcpListener> {
        self.0.listen(4096)?;
        if let Err(e) = defer_accept(&self.0) {
            // Not fatal: connections are then accepted at once, as without the option.
            tracing::warn!(error = %e, "cannot defer accepting (TCP_DEFER_ACCEPT)");
        }
        TcpListener::from_std(self.0.into())
    }
}

/// How long the kernel holds a connection whose client has not sent anything before handing it
/// over anyway, in seconds (it rounds up to SYN-ACK retransmissions: the first comes after one
/// second). Then the worker's own deadlines apply, such as the hello timeout, so a silent
/// client is closed about this much later than without deferring. HAProxy uses one second too.
pub const DEFER_ACCEPT_SECS: u32 = 1;

#[cfg(target_os = "linux")]
use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};

// nix's documented way to add a socket option it does not wrap; it has none for this one.
#[cfg(target_os = "linux")]
sockopt_impl!(
    /// `TCP_DEFER_ACCEPT` on a listening socket, in seconds (0: off).
    DeferAccept,
    Both,
    libc::IPPROTO_TCP,
    libc::TCP_DEFER_ACCEPT,
    u32
);

#[cfg(target_os = "linux")]
fn defer_accept(socket: &Socket) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(socket, DeferAccept, &DEFER_ACCEPT_SECS)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &Socket) -> std::io::Result<()> {
    Ok(())
}

/// Bind a TCP socket with `SO_REUSEADDR`, `SO_REUSEPORT` and `TCP_NODELAY`, without listening
/// yet.
pub fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Accepted connections inherit it on Linux: no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn traffic_listeners_defer_accepting() {
        let listener = bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .listen()
            .unwrap();
        // The kernel reports the period rounded to whole SYN-ACK retransmissions.
        let secs = nix::sys::socket::getsockopt(&listener, DeferAccept).unwrap();
        assert!(secs >= DEFER_ACCEPT_SECS, "TCP_DEFER_ACCEPT is {secs}");
    }

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .listen()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(
            async {
                let client = TcpStream::connect(addr).await.unwrap();
                // Deferred accept: the kernel hands the connection over once it has data.
                client.writable().await.unwrap();
                client.try_write(b"x").unwrap();
                client
            },
            accept(&listener)
        );
        assert!(!client.nodelay().unwrap(), "a plain socket has Nagle on");
        assert!(accepted.0.nodelay().unwrap(), "the accepted one has it off");
    }
}
