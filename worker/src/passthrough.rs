//! TLS passthrough: connect to a server of the host's `tcp` backend (retrying once on another
//! server if the connect fails: nothing has been sent yet), send the PROXY header if asked,
//! then the peeked ClientHello bytes, then both directions verbatim.

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_shared::{Host, ProxyProtocol};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::copy;
use crate::metrics::{PassthroughFailure, TunnelMeters};
use crate::runtime::Runtime;
use crate::upstream::{connect_with_pick, UpstreamError};

/// Why a passthrough connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

impl PassthroughError {
    /// The metrics' name for this failure.
    pub fn kind(&self) -> PassthroughFailure {
        match self {
            PassthroughError::Upstream(UpstreamError::Connect { .. }) => {
                PassthroughFailure::Connect
            }
            PassthroughError::Upstream(_) => PassthroughFailure::NoServer,
            PassthroughError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                PassthroughFailure::IdleTimeout
            }
            PassthroughError::Io(_) => PassthroughFailure::Io,
        }
    }
}

/// Forward one client connection to the host's backend, counting the bytes on `meters`.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    client: TcpStream,
    peeked: Vec<u8>,
    host: &Host,
    rt: &Arc<Runtime>,
    worker: &crate::Worker,
    peer: SocketAddr,
    // The listener's address (see below).
    local: SocketAddr,
    meters: &TunnelMeters,
) -> Result<copy::Moved, PassthroughError> {
    let health = &worker.health;
    // The pick is held for the life of the stream: least_requests counts open connections.
    let (mut server, addr, _pick) = connect_with_pick(health, rt, host.backend_id).await?;
    // `local` is the listener's address; on a wildcard listener the header needs the address
    // this client actually reached.
    let local = || {
        if local.ip().is_unspecified() {
            client.local_addr().unwrap_or(local)
        } else {
            local
        }
    };
    let header = match host.proxy_protocol {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => crate::proxy_protocol::v1(peer, local()),
        ProxyProtocol::V2 => crate::proxy_protocol::v2(peer, local()),
    };
    let hello = peeked.len() as u64;
    let first = if header.is_empty() {
        peeked
    } else {
        let mut first = header;
        first.extend_from_slice(&peeked);
        first
    };
    // Under the tunnel's idle timeout like every later write: a server that accepted the
    // connection but reads nothing must not hold it forever.
    tokio::time::timeout(copy::IDLE, server.write_all(&first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"))??;
    meters.client_to_server.inc_by(hello);
    tracing::debug!(%peer, server = %addr, host = %host.hostname, "passthrough connected");
    let meters = copy::Meters {
        client_to_server: Some(meters.client_to_server.inner()),
        server_to_client: Some(meters.server_to_client.inner()),
    };
    Ok(copy::bidirectional(client, server, copy::IDLE, worker.copy_buffer, meters).await?)
}
