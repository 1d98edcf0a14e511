//! The HTTPS listener: accept, peek the ClientHello (without consuming it), and hand the
//! connection to passthrough or termination by its SNI, exact name before wildcard. Unknown
//! or missing SNI, non-TLS bytes, a malformed or too slow hello: the connection is closed and
//! counted (NGINX's `default blackhole`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_shared::Mode;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::metrics::Closed;
use crate::sni::{self, Peek};
use crate::Worker;

/// Hard cap on bytes read while waiting for the hello (a 64 KiB hello in 1-byte records).
const PEEK_CAP: usize = 6 * sni::MAX_HELLO + 5;

/// Read until the ClientHello is complete; returns the bytes read and the verdict.
pub async fn read_hello(
    stream: &mut TcpStream,
    timeout: Duration,
) -> (Vec<u8>, Result<Peek, Closed>) {
    let mut buf = Vec::with_capacity(2048);
    let result = tokio::time::timeout(timeout, async {
        loop {
            match sni::peek(&buf) {
                Peek::NeedMore => {}
                verdict => return Ok(verdict),
            }
            if buf.len() >= PEEK_CAP {
                return Ok(Peek::Malformed);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(Closed::ClientGone),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(Err(Closed::HelloTimeout));
    (buf, result)
}

/// Serve one accepted connection.
async fn handle(worker: Arc<Worker>, mut stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let _open = worker.metrics.connection_opened();
    if cfg!(not(target_os = "linux")) {
        // Linux hands it down from the listener (`listener::bind`).
        let _ = stream.set_nodelay(true);
    }
    let Some(rt) = worker.current.load() else {
        worker.metrics.closed(Closed::NotReady);
        return;
    };
    let (peeked, verdict) = read_hello(&mut stream, worker.hello_timeout).await;
    let name = match verdict {
        Ok(Peek::Sni(name)) => name,
        Ok(Peek::NoSni) => return worker.metrics.closed(Closed::NoSni),
        Ok(Peek::NotTls) => return worker.metrics.closed(Closed::NotTls),
        Ok(Peek::Malformed) => return worker.metrics.closed(Closed::Malformed),
        Ok(Peek::NeedMore) | Err(Closed::ClientGone) => {
            return worker.metrics.closed(Closed::ClientGone)
        }
        Err(other) => return worker.metrics.closed(other),
    };
    let Some((host, label)) = rt.host_labelled(&name) else {
        tracing::debug!(%peer, sni = %name, "no host for this SNI; closing");
        return worker.metrics.closed(Closed::UnknownSni);
    };
    match host.mode {
        Mode::Passthrough => {
            let meters = worker.metrics.passthrough_started(label);
            let forwarded = crate::passthrough::forward(
                stream, peeked, host, &rt, &worker, peer, local, &meters,
            );
            match forwarded.await {
                Ok(moved) => {
                    tracing::debug!(%peer, host = %host.hostname, ?moved, "passthrough done")
                }
                Err(e) => {
                    worker.metrics.passthrough_failed(label, e.kind());
                    tracing::info!(%peer, host = %host.hostname, error = %e, "passthrough failed");
                }
            }
        }
        Mode::Terminate => {
            let host = host.clone();
            // Not boxed: a box of its own would add the rest of this task's state (1.7 KiB)
            // to every idle TLS connection (measured: 15.0 against 13.5 KiB per connection).
            crate::terminate::serve(
                worker.clone(),
                rt.clone(),
                stream,
                peeked,
                host,
                peer,
                local,
            )
            .await;
        }
    }
}

/// Accept connections until `stop` turns true; every connection is tracked for draining.
pub async fn serve(
    worker: Arc<Worker>,
    listener: TcpListener,
    tracker: TaskTracker,
    mut stop: watch::Receiver<bool>,
) {
    let bound = listener.local_addr().ok();
    loop {
        tokio::select! {
            (stream, peer) = crate::listener::accept(&listener) => {
                // The connection's own local address costs a syscall; it differs from the
                // listener's only on a wildcard address, and only PROXY headers need it.
                let local = bound.unwrap_or(peer);
                // Boxed: the connection's state machine is a few KiB, and spawning moves the
                // future several times on its way into the task (and the task's stage is
                // rewritten whole when it ends); a pointer is moved instead. Measured
                // (`bench/instructions pt_conns`): -6.5% instructions per new connection, for
                // +0.1 KiB per idle connection (10.82 -> 10.94 KiB, `bench/profile idle`).
                tracker.spawn(Box::pin(handle(worker.clone(), stream, peer, local)));
            }
            _ = stop.changed() => return,
        }
    }
}
