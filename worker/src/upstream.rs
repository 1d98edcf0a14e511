//! Connecting to a backend's servers: pick with the balancer, connect with a timeout, and on
//! a failed connect try once more on another server.

use std::time::Duration;

use tokio::net::TcpStream;
use uuid::Uuid;

use sluice_shared::{Server, ServerAddr};

use crate::balance::Pick;
use crate::runtime::Runtime;

/// Connect timeout to an upstream server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("backend {0} is not in the configuration")]
    NoBackend(Uuid),
    #[error("no usable server")]
    NoServer,
    #[error("connecting to {server} failed: {reason}")]
    Connect { server: String, reason: String },
}

/// Connect to `addr`: an IP address directly, a name through the resolver (an address is
/// not turned into text and parsed back on every connection).
pub async fn connect_addr(addr: &ServerAddr) -> std::io::Result<TcpStream> {
    match addr.socket_addr() {
        Some(ip) => TcpStream::connect(ip).await,
        None => TcpStream::connect((addr.host_str(), addr.port())).await,
    }
}

/// Connect to one server, with the connect timeout.
pub async fn connect_server(server: &Server) -> Result<TcpStream, UpstreamError> {
    let reason = match tokio::time::timeout(CONNECT_TIMEOUT, connect_addr(&server.address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    Err(UpstreamError::Connect {
        server: server.address.to_string(),
        reason,
    })
}

/// Connect to a server of the backend, retrying once on another server if the connect fails;
/// returns the stream, the server address and the balancer's pick (drop it when done).
pub async fn connect_with_pick<'rt>(
    health: &crate::health::Health,
    rt: &'rt Runtime,
    backend_id: Uuid,
) -> Result<(TcpStream, &'rt sluice_shared::ServerAddr, Pick), UpstreamError> {
    let backend = rt
        .backend(backend_id)
        .ok_or(UpstreamError::NoBackend(backend_id))?;
    let balancer = rt
        .balancer(backend_id)
        .ok_or(UpstreamError::NoBackend(backend_id))?;
    let mut tried = [usize::MAX; 2];
    let mut last_error = None;
    for attempt in 0..2 {
        let Some(pick) =
            balancer.pick(|i| !tried.contains(&i) && health.usable(backend.servers[i].id))
        else {
            break;
        };
        let server = &backend.servers[pick.index];
        match connect_server(server).await {
            Ok(stream) => return Ok((stream, &server.address, pick)),
            Err(e) => {
                tracing::debug!(error = %e, "upstream connect failed");
                // Passive detection: a failed connect counts toward `fall`.
                health.record(
                    server.id,
                    false,
                    &backend.health_check,
                    None,
                    Some(e.to_string()),
                );
                last_error = Some(e);
                tried[attempt] = pick.index;
            }
        }
    }
    Err(last_error.unwrap_or(UpstreamError::NoServer))
}
