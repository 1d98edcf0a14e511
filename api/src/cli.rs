//! Command-line flags of `sluice-api` (each also an `SLUICE_*` environment variable).
//! Secrets are read from the environment only, so they never show in `ps`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Sluice control plane: REST API, configuration store and worker supervisor.
#[derive(Debug, Parser)]
#[command(name = "sluice-api", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the OpenAPI document and exit.
    Openapi,
    /// Run as a worker (how managed workers are started; same as `sluice-worker`).
    Worker(Box<sluice_worker::cli::WorkerArgs>),
    /// Run the demo echo backend (HTTP/1.1, h2c or TLS), as the compose stack does.
    Echo(EchoArgs),
    /// Write the demo certificates (CA, `*.beerme` edge, odoo backend) to a directory, keeping
    /// existing ones.
    DemoCerts {
        /// Directory for ca.pem, edge.pem/.key and odoo.pem/.key.
        #[arg(long, env = "SLUICE_DEMO_CERTS", default_value = "./sluice-data/demo")]
        out: PathBuf,
    },
}

/// Flags of the echo backend.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Name the backend reports in every answer.
    #[arg(long, env = "ECHO_NAME", default_value = "echo")]
    pub name: String,
    /// `http` (HTTP/1.1), `h2c` (HTTP/2 with prior knowledge) or `tls` (ALPN h2, http/1.1).
    #[arg(long, env = "ECHO_PROTOCOL", default_value = "http")]
    pub protocol: sluice_demo::echo::Protocol,
    /// For `tls`: a directory from `demo-certs`; the backend serves odoo.pem/odoo.key.
    #[arg(long, env = "ECHO_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
}

/// Flags of the API server.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the REST API (and, later, the worker channel).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Directory for the database and generated tokens (created 0700 if missing).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// SQLite database file [default: <data-dir>/sluice.db].
    #[arg(long, env = "SLUICE_DATABASE")]
    pub database: Option<PathBuf>,
    /// Managed workers to spawn on this machine.
    #[arg(long, env = "SLUICE_WORKERS", default_value_t = 1)]
    pub workers: u16,
    /// HTTPS listener of managed workers.
    #[arg(long, env = "SLUICE_WORKER_HTTPS", default_value = "0.0.0.0:8443")]
    pub worker_https: SocketAddr,
    /// Plain HTTP listener of managed workers (redirects to HTTPS).
    #[arg(long, env = "SLUICE_WORKER_HTTP", default_value = "0.0.0.0:8080")]
    pub worker_http: SocketAddr,
    /// Port clients reach HTTPS on, for X-Forwarded-Port and redirects [default: the listener's].
    #[arg(long, env = "SLUICE_PUBLIC_HTTPS_PORT")]
    pub public_https_port: Option<u16>,
    /// Largest body `PUT /v1/config` accepts, in bytes.
    #[arg(long, env = "SLUICE_CONFIG_BODY_LIMIT", default_value_t = 64 * 1024 * 1024)]
    pub config_body_limit: usize,
    /// Start demo backends and load the seed scenario (redmine, odoo, grpc `.beerme` hosts),
    /// then print curl commands for each pattern. Replaces the stored configuration.
    #[arg(long, env = "SLUICE_DEMO")]
    pub demo: bool,
    /// Heartbeat interval of the worker channel, in milliseconds.
    #[arg(long, env = "SLUICE_HEARTBEAT_MS", default_value_t = 5000, hide = true)]
    pub heartbeat_ms: u64,
}

impl ServeArgs {
    pub fn database_path(&self) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| self.data_dir.join("sluice.db"))
    }
}
