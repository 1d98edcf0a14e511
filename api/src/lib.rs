//! `sluice-api`: the control plane. It stores hosts, certificates and backends in SQLite,
//! compiles every change into one new versioned snapshot, and serves the REST API.
//!
//! [`app`] builds the whole router from an [`AppState`] so tests can drive it without a socket;
//! [`run`] opens the store, binds the listener and serves until SIGTERM or Ctrl-C.

pub mod auth;
pub mod cli;
pub mod commit;
pub mod convert;
pub mod db;
pub mod demo;
pub mod document;
pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod workers;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;

use crate::auth::{Token, TokenSource};
use crate::cli::{Cli, Command, ServeArgs};
use crate::db::Db;
use crate::error::ApiError;
use crate::extract::BODY_LIMIT;
use crate::metrics::Metrics;
use crate::routes::{backends, certificates, config, hosts, ops};
use crate::workers::supervisor::{Spec, Supervisor};
use crate::workers::Hub;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: Arc<Db>,
    pub admin_token: Token,
    pub worker_token: Token,
    pub metrics: Arc<Metrics>,
    /// Live worker channel sessions.
    pub workers: Arc<Hub>,
    /// Managed workers, when this API runs any.
    pub supervisor: Arc<OnceLock<Supervisor>>,
    /// Body limit of `PUT /v1/config`, in bytes.
    pub config_body_limit: usize,
    /// Turns true when the API is shutting down (long-lived streams end then).
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    pub fn new(db: Db, admin_token: Token, worker_token: Token) -> AppState {
        AppState {
            db: Arc::new(db),
            admin_token,
            worker_token,
            metrics: Arc::new(Metrics::default()),
            workers: Arc::new(Hub::new(Duration::from_secs(5))),
            supervisor: Arc::new(OnceLock::new()),
            config_body_limit: 64 * 1024 * 1024,
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Use another heartbeat interval on the worker channel.
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> AppState {
        self.workers = Arc::new(Hub::new(heartbeat));
        self
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        what: "route",
        id: "for this path".into(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::bad_request("", "this method is not allowed on this path")
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let config_limit = state.config_body_limit;
    let v1 = Router::new()
        .route(
            "/certificates",
            get(certificates::list).post(certificates::create),
        )
        .route(
            "/certificates/{id}",
            get(certificates::get)
                .put(certificates::update)
                .delete(certificates::delete),
        )
        .route("/backends", get(backends::list).post(backends::create))
        .route(
            "/backends/{id}",
            get(backends::get)
                .put(backends::update)
                .delete(backends::delete),
        )
        .route("/hosts", get(hosts::list).post(hosts::create))
        .route(
            "/hosts/{id}",
            get(hosts::get).put(hosts::update).delete(hosts::delete),
        )
        .route(
            "/config",
            get(config::current)
                .put(config::apply)
                .layer::<_, std::convert::Infallible>(axum::Extension(extract::BodyLimit(
                    config_limit,
                )))
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(config_limit)),
        )
        .route("/config/export", get(config::export))
        .route(
            "/config/prune-keys",
            axum::routing::post(config::prune_keys),
        )
        .route("/config/versions", get(config::history))
        .route("/config/versions/{version}", get(config::version))
        .route(
            "/config/versions/{version}/restore",
            axum::routing::post(config::restore),
        )
        .route("/config/versions/{version}/rollout", get(config::rollout))
        .route("/backends/{id}/health", get(routes::health::backend))
        .route("/health", get(routes::health::all))
        .route("/events", get(routes::events::stream))
        .route("/workers", get(routes::workers::list))
        .route(
            "/workers/{id}",
            get(routes::workers::get).delete(routes::workers::delete),
        )
        .route(
            "/workers/{id}/restart",
            axum::routing::post(routes::workers::restart),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route(
            sluice_shared::channel::CHANNEL_PATH,
            get(workers::channel::handler),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), metrics::observe))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Create the data directory (0700) if needed.
fn prepare_data_dir(args: &ServeArgs) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !args.data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&args.data_dir)
            .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    }
    Ok(())
}

fn log_token(what: &str, source: TokenSource, file: &std::path::Path) {
    match source {
        TokenSource::Environment => tracing::info!("{what} token taken from the environment"),
        TokenSource::File => tracing::info!("{what} token read from {}", file.display()),
        TokenSource::Generated => tracing::info!(
            "{what} token generated and written to {} (mode 0600)",
            file.display()
        ),
    }
}

/// Open the store and build the state, as `run` does (also used by tests).
pub async fn open_state(args: &ServeArgs) -> anyhow::Result<AppState> {
    prepare_data_dir(args)?;
    let db_path = args.database_path();
    let db = Db::open(&db_path)
        .await
        .with_context(|| format!("opening database {}", db_path.display()))?;
    commit::ensure_initial_version(&db)
        .await
        .context("creating the first configuration version")?;
    let (admin, admin_src) = auth::load_or_create(
        std::env::var("SLUICE_ADMIN_TOKEN").ok(),
        &args.data_dir,
        "admin.token",
    )
    .context("loading the admin token")?;
    log_token("admin", admin_src, &args.data_dir.join("admin.token"));
    let (worker, worker_src) = auth::load_or_create(
        std::env::var("SLUICE_WORKER_TOKEN").ok(),
        &args.data_dir,
        "worker.token",
    )
    .context("loading the worker token")?;
    log_token("worker", worker_src, &args.data_dir.join("worker.token"));
    let mut state = AppState::new(db, admin, worker)
        .with_heartbeat(Duration::from_millis(args.heartbeat_ms.max(10)));
    state.config_body_limit = args.config_body_limit;
    Ok(state)
}

/// Resolves on SIGTERM or Ctrl-C (the worker's signal handling, shared).
async fn shutdown_signal() {
    sluice_worker::shutdown_signal().await;
    tracing::info!("shutting down");
}

/// Serve the API until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let state = open_state(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "sluice-api listening");
    if args.workers > 0 {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            addr.ip().to_string()
        };
        let host = if addr.is_ipv6() && !addr.ip().is_unspecified() {
            format!("[{host}]")
        } else {
            host
        };
        let spec = Spec {
            exe: std::env::current_exe()
                .context("finding this executable to start managed workers")?,
            api_url: format!("http://{host}:{}", addr.port()),
            data_dir: args.data_dir.clone(),
            https: args.worker_https,
            http: args.worker_http,
            public_https_port: args.public_https_port,
            worker_token: state.worker_token.clone(),
        };
        let supervisor = Supervisor::start(
            spec,
            args.workers as usize,
            state.workers.clone(),
            state.db.clone(),
        )
        .await
        .context("starting managed workers")?;
        let _ = state.supervisor.set(supervisor);
    }
    // Kept alive while the API serves.
    let _demo = if args.demo {
        Some(crate::demo::start(&state, &args, addr).await?)
    } else {
        crate::demo::first_run_hint(&state, &args, addr).await;
        None
    };
    let supervisor = state.supervisor.clone();
    let stopping = state.stopping.clone();
    // Header-read deadline and graceful shutdown included (`axum::serve` has no deadline).
    sluice_worker::http_server::serve(listener, app(state), async move {
        shutdown_signal().await;
        stopping.send_replace(true);
    })
    .await;
    if let Some(s) = supervisor.get() {
        s.shutdown().await;
    }
    Ok(())
}

/// The whole `sluice-api` program: parse flags, set up logging, run the API (or, for managed
/// workers, the worker). `main.rs` only calls this.
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        Some(Command::Openapi) => {
            print!("{}", crate::openapi::document_json());
            std::process::ExitCode::SUCCESS
        }
        Some(Command::Worker(args)) => {
            sluice_worker::init_logging();
            sluice_worker::start(*args)
        }
        Some(Command::Echo(args)) => {
            sluice_worker::init_logging();
            run_blocking(crate::echo(args))
        }
        Some(Command::DemoCerts { out }) => {
            match sluice_demo::certs::DemoCerts::load_or_create(&out) {
                Ok(_) => {
                    println!("demo certificates in {}", out.display());
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice-api demo-certs: {e:#}");
                    std::process::ExitCode::from(1)
                }
            }
        }
        None => {
            sluice_worker::init_logging();
            run_blocking(crate::run(cli.serve))
        }
    }
}

/// Run `future` on a new multi-threaded runtime; log its error and exit 1 if it fails.
fn run_blocking(
    future: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-api: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(future) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The `echo` subcommand: the demo backend on its own, until SIGTERM or Ctrl-C.
async fn echo(args: crate::cli::EchoArgs) -> anyhow::Result<()> {
    let tls = match (&args.cert_dir, args.protocol) {
        (Some(dir), sluice_demo::echo::Protocol::Tls) => {
            let certs = sluice_demo::certs::DemoCerts::load_or_create(dir)
                .with_context(|| format!("demo certificates in {}", dir.display()))?;
            Some((certs.odoo_chain, certs.odoo_key))
        }
        (None, sluice_demo::echo::Protocol::Tls) => {
            anyhow::bail!("--protocol tls needs --cert-dir (a directory from `demo-certs`)")
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, name = %args.name, protocol = ?args.protocol, "echo backend listening");
    tokio::select! {
        r = sluice_demo::echo::serve(listener, args.name, args.protocol, tls) => r,
        _ = shutdown_signal() => Ok(()),
    }
}
