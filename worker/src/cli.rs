//! Command-line flags of the worker (each also an `SLUICE_*` environment variable). The token
//! comes from the environment only (`SLUICE_WORKER_TOKEN`).

use std::net::SocketAddr;
use std::path::PathBuf;

use uuid::Uuid;

/// Flags of `sluice-worker` (and of `sluice-api worker`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Base URL of the API.
    #[arg(long, env = "SLUICE_API", default_value = "http://127.0.0.1:9000")]
    pub api: String,
    /// Name shown in the API's worker list [default: the host name].
    #[arg(long, env = "SLUICE_WORKER_NAME")]
    pub name: Option<String>,
    /// Directory for the worker id and the last applied snapshot (created 0700).
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = "./worker-state")]
    pub state_dir: PathBuf,
    /// HTTPS listener for both terminate and passthrough hosts.
    #[arg(long, env = "SLUICE_HTTPS", default_value = "0.0.0.0:8443")]
    pub https: SocketAddr,
    /// Plain HTTP listener (redirects to HTTPS).
    #[arg(long, env = "SLUICE_HTTP", default_value = "0.0.0.0:8080")]
    pub http: SocketAddr,
    /// Admin listener: /healthz, /readyz, /status, /metrics.
    #[arg(long, env = "SLUICE_ADMIN", default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// Port clients reach HTTPS on [default: the listener's].
    #[arg(long, env = "SLUICE_PUBLIC_HTTPS_PORT")]
    pub public_https_port: Option<u16>,
    /// Runtime threads; 0 = one per available core.
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// With `--threads 1`: while the event loop is loaded (busy at least half the time), how long
    /// it waits before sleeping in epoll, in microseconds, so the events arriving meanwhile are
    /// handled in one batch (interrupt moderation for the event loop; a spin, at most a fifth of
    /// the thread's time); 0 = sleep at once. Multi-thread runtimes never wait.
    #[arg(long, env = "SLUICE_COALESCE_US", default_value_t = 20)]
    pub coalesce_us: u64,
    /// How long an upstream may take to send its response headers, in milliseconds (then 504).
    #[arg(long, env = "SLUICE_RESPONSE_TIMEOUT_MS", default_value_t = 60_000)]
    pub response_timeout_ms: u64,
    /// How long a client may take to send its whole TLS ClientHello, in milliseconds (HAProxy's
    /// `tcp-request inspect-delay`); slower connections are closed.
    #[arg(long, env = "SLUICE_HELLO_TIMEOUT_MS", default_value_t = 5_000)]
    pub hello_timeout_ms: u64,
    /// How long a client may take to send a request's headers, in milliseconds, counted from
    /// their first byte (the first request's from the end of the TLS handshake; NGINX's
    /// `client_header_timeout`); slower connections are closed.
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// How long a client connection (HTTP/1.1 keep-alive or HTTP/2) may stay open with no
    /// request in flight, in milliseconds; then it is closed, HTTP/2 after a GOAWAY (NGINX's
    /// `keepalive_timeout`).
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// On SIGTERM, how long open connections may take to finish, in milliseconds.
    #[arg(long, env = "SLUICE_DRAIN_MS", default_value_t = 10_000)]
    pub drain_ms: u64,
    /// Per-direction copy buffer of passthrough connections, in KiB (`bench/run` compares
    /// sizes; 16 KiB, one TLS record, measured best).
    #[arg(
        long,
        env = "SLUICE_COPY_BUFFER_KIB",
        default_value_t = 16,
        hide = true
    )]
    pub copy_buffer_kib: usize,
    /// Receive window per upstream HTTP/2 stream, in KiB (eight times that per connection)
    /// [default: 2048]; `bench/run` compares sizes.
    #[arg(long, env = "SLUICE_UPSTREAM_H2_WINDOW_KIB", hide = true)]
    pub upstream_h2_window_kib: Option<u32>,
    /// Fixed worker id (managed workers get theirs from the API) [default: kept in the state dir].
    #[arg(long, env = "SLUICE_WORKER_ID", hide = true)]
    pub worker_id: Option<Uuid>,
}

/// `sluice-worker`'s own command line.
#[derive(Debug, clap::Parser)]
#[command(name = "sluice-worker", version, about = "Sluice data plane worker")]
pub struct Cli {
    #[command(flatten)]
    pub args: WorkerArgs,
}

impl WorkerArgs {
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_ms)
    }
}
