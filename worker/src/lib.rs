//! `sluice-worker`: the data plane. It follows the API over the channel, keeps the newest
//! snapshot it validated in force, persists it for restarts without the API, and answers on an
//! admin listener. (Listeners for traffic come with the termination and passthrough work.)
//!
//! [`start`] is the whole program for `sluice-worker` and for `sluice-api worker`.

pub mod admin;
pub mod balance;
pub mod channel;
pub mod cli;
pub mod coalesce;
pub mod copy;
pub mod deadline;
pub mod edge;
pub mod h2body;
pub mod h2pool;
pub mod headers;
pub mod health;
pub mod heavy;
pub mod http_server;
pub mod idle;
pub mod listener;
pub mod metrics;
pub mod passthrough;
pub mod pool;
pub mod prefixed;
pub mod proxy_protocol;
pub mod redirect;
pub mod request_scan;
pub mod runtime;
pub mod serve_h2;
pub mod sni;
pub mod state;
pub mod terminate;
pub mod upstream;
pub mod upstream_h1;
pub mod upstream_h2;
pub mod upstream_tls;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use sluice_shared::channel::Frame;
use sluice_shared::Snapshot;
use tokio::sync::watch;
use uuid::Uuid;

use crate::cli::WorkerArgs;
use crate::metrics::Metrics;
use crate::runtime::{Current, Source};
use crate::state::StateDir;

/// Everything the worker's tasks share.
#[derive(Debug)]
pub struct Worker {
    pub id: Uuid,
    pub name: String,
    pub api: String,
    token: String,
    pub https_addr: SocketAddr,
    /// Port clients reach HTTPS on, for `X-Forwarded-Port` (default: the listener's).
    pub public_https_port: Option<u16>,
    /// How long a client may take to send its ClientHello.
    pub hello_timeout: std::time::Duration,
    /// See `--header-timeout-ms`.
    pub header_timeout: std::time::Duration,
    /// See `--idle-timeout-ms`.
    pub idle_timeout: std::time::Duration,
    /// How long an upstream may take to answer with headers (then 504).
    pub response_timeout: std::time::Duration,
    /// Per-direction passthrough copy buffer, in bytes.
    pub copy_buffer: usize,
    /// Health of every server as this worker sees it.
    pub health: Arc<health::Health>,
    /// Upstream HTTP/1.1 keep-alive connections driven by hyper (requests with a body,
    /// `https` servers).
    pub pool: Arc<pool::Pool>,
    /// Upstream HTTP/1.1 keep-alive connections to `http` servers for requests without a body.
    pub plain_pool: Arc<pool::Pool<upstream_h1::Conn>>,
    /// Upstream HTTP/2 connections, multiplexed and shared by every client.
    pub h2pool: Arc<h2pool::H2Pool>,
    pub admin_addr: OnceLock<SocketAddr>,
    /// The HTTPS listener's bound address.
    pub https_bound: OnceLock<SocketAddr>,
    pub current: Current,
    pub connected: AtomicBool,
    pub metrics: Metrics,
    state: StateDir,
    persist_tx: tokio::sync::mpsc::UnboundedSender<Persist>,
    /// Turns true once a snapshot is in force (the listeners wait for it).
    pub ready: watch::Sender<bool>,
}

impl Worker {
    /// Switch to a new runtime: store it, start checking its backends, mark the worker ready.
    pub fn switch(&self, rt: Arc<runtime::Runtime>) {
        // A host of each backend (for `Host` and SNI in checks), found in one pass.
        let mut host_of: std::collections::HashMap<Uuid, &str> =
            std::collections::HashMap::with_capacity(rt.config.backends.len());
        for h in &rt.config.hosts {
            if !h.hostname.is_wildcard() {
                host_of.entry(h.backend_id).or_insert(h.hostname.as_str());
            }
        }
        self.health.watch(
            &rt.config.backends,
            |backend| host_of.get(&backend).map(|h| (*h).to_owned()),
            |backend| rt.upstream_tls.get(&backend).map(|u| u.config.clone()),
        );
        self.current.store(rt);
        self.ready.send_replace(true);
    }

    /// Every server's health as this worker sees it, with its upstream HTTP/2 connection
    /// figures where there are any.
    pub fn server_reports(&self) -> Vec<sluice_shared::channel::ServerReport> {
        let mut reports = self.health.report();
        let stats = self.h2pool.stats();
        if stats.is_empty() {
            return reports;
        }
        if let Some(rt) = self.current.load() {
            for r in &mut reports {
                let address = rt
                    .backend(r.backend_id)
                    .and_then(|b| b.servers.iter().find(|s| s.id == r.server_id))
                    .map(|s| s.address.to_string());
                r.upstream = address.and_then(|a| stats.get(&a).cloned());
            }
        }
        reports
    }

    /// Queue an applied snapshot or delta for writing to the state directory (in order).
    pub fn persist(&self, what: Persist) {
        let _ = self.persist_tx.send(what);
    }
}

/// Current time as RFC 3339.
pub fn now_text() -> String {
    sluice_shared::certs::rfc3339(time::OffsetDateTime::now_utc())
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// What to write to the state directory.
#[derive(Debug)]
pub enum Persist {
    /// A full snapshot frame, as the API sent it.
    Full(sluice_shared::ConfigVersion, Frame),
    /// A delta frame, journaled after the last full one; `runtime` is what it produced (for
    /// compacting a long journal into one snapshot). A delta after which a private key is no
    /// longer in force (`forgets_a_key`: a certificate deleted or re-keyed) is written as one
    /// full snapshot at once, so the state directory holds only the keys in force.
    Delta {
        version: sluice_shared::ConfigVersion,
        frame: Frame,
        runtime: Arc<runtime::Runtime>,
        forgets_a_key: bool,
    },
}

/// Journal length at which the state directory gets a full snapshot instead.
const MAX_JOURNAL: usize = 64;

/// Write queued snapshots and deltas to the state directory, in order, off the async threads.
async fn persist_loop(state: StateDir, mut rx: tokio::sync::mpsc::UnboundedReceiver<Persist>) {
    while let Some(what) = rx.recv().await {
        let state = state.clone();
        let saved = tokio::task::spawn_blocking(move || match what {
            Persist::Full(version, frame) => state.save_frame(&frame).map(|()| version),
            Persist::Delta {
                version,
                frame,
                runtime: rt,
                forgets_a_key,
            } => {
                let journal = match forgets_a_key {
                    true => MAX_JOURNAL,
                    false => state.append_delta(version, &frame)?,
                };
                if journal >= MAX_JOURNAL {
                    state.save(&Snapshot {
                        version: rt.version,
                        hash: rt.hash.clone(),
                        config: rt.config_with_keys(),
                    })?;
                    tracing::debug!(%version, forgets_a_key, "delta journal compacted into one snapshot");
                }
                Ok(version)
            }
        })
        .await;
        match saved {
            Ok(Ok(version)) => tracing::debug!(%version, "saved to the state directory"),
            Ok(Err(e)) => tracing::error!(error = %e, "saving the snapshot failed"),
            Err(e) => tracing::error!(error = %e, "saving the snapshot panicked"),
        }
    }
}

/// Load the stored snapshot, if any and valid, so the worker serves before the API answers.
fn load_stored(state: &StateDir, worker: &Worker) {
    match state.load() {
        Ok(None) => tracing::info!("no stored snapshot; waiting for the API"),
        Err(e) => tracing::warn!(error = %e, "ignoring the stored snapshot"),
        Ok(Some(snapshot)) => {
            let version = snapshot.version;
            match runtime::build(snapshot, Source::StateDir, now_text(), None) {
                Ok(rt) => {
                    worker.switch(Arc::new(rt));
                    tracing::info!(%version, "serving the stored snapshot until the API answers");
                }
                Err(e) => tracing::warn!(%version, error = %e, "ignoring the stored snapshot"),
            }
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Run the worker until SIGTERM or Ctrl-C.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let token = std::env::var("SLUICE_WORKER_TOKEN").unwrap_or_default();
    if token.is_empty() {
        anyhow::bail!("SLUICE_WORKER_TOKEN is not set: the worker needs the API's worker token");
    }
    let state = StateDir::open(&args.state_dir)
        .with_context(|| format!("opening state directory {}", args.state_dir.display()))?;
    let id = state
        .worker_id(args.worker_id)
        .context("reading the worker id")?;
    let (persist_tx, persist_rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Metrics::default();
    let worker = Arc::new(Worker {
        id,
        name: args.name.clone().unwrap_or_else(default_name),
        api: args.api.clone(),
        token,
        https_addr: args.https,
        public_https_port: args.public_https_port,
        hello_timeout: std::time::Duration::from_millis(args.hello_timeout_ms),
        header_timeout: std::time::Duration::from_millis(args.header_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(args.idle_timeout_ms),
        response_timeout: std::time::Duration::from_millis(args.response_timeout_ms),
        copy_buffer: args.copy_buffer_kib * 1024,
        pool: Arc::new(pool::Pool::default()),
        plain_pool: Arc::new(pool::Pool::default()),
        h2pool: Arc::new(h2pool::H2Pool::new(
            metrics.h2_server_metrics(),
            args.upstream_h2_window_kib
                .map_or_else(h2pool::Windows::default, h2pool::Windows::from_kib),
        )),
        health: Arc::new(health::Health::default()),
        admin_addr: OnceLock::new(),
        https_bound: OnceLock::new(),
        current: Current::default(),
        connected: AtomicBool::new(false),
        metrics,
        state: state.clone(),
        persist_tx,
        ready: watch::channel(false).0,
    });
    load_stored(&worker.state, &worker);
    if let Some(rt) = worker.current.load() {
        worker.metrics.applied(rt.version);
        worker.ready.send_replace(true);
    }
    tokio::spawn(persist_loop(state, persist_rx));
    tokio::spawn(pool::Pool::sweep_every(Arc::downgrade(&worker.pool)));
    tokio::spawn(pool::Pool::sweep_every(Arc::downgrade(&worker.plain_pool)));

    let admin = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin {}", args.admin))?;
    let admin_addr = admin.local_addr()?;
    let _ = worker.admin_addr.set(admin_addr);
    let https =
        listener::bind(args.https).with_context(|| format!("binding HTTPS {}", args.https))?;
    let https_addr = https.local_addr()?;
    let _ = worker.https_bound.set(https_addr);
    let http = listener::bind(args.http).with_context(|| format!("binding HTTP {}", args.http))?;
    let http_addr = http.local_addr()?;
    tracing::info!(worker_id = %id, name = %worker.name, https = %https_addr, admin = %admin_addr, http = %http_addr, "sluice-worker started");
    listener::check_migrate();
    let (stop_tx, stop_rx) = watch::channel(false);
    let tracker = tokio_util::task::TaskTracker::new();
    // Join the port's listeners only with a snapshot to serve: a new worker (or a replacement)
    // takes no connection it would have to close.
    let edge_task = tokio::spawn({
        let (worker, tracker, mut stop) = (worker.clone(), tracker.clone(), stop_rx.clone());
        async move {
            let mut ready = worker.ready.subscribe();
            tokio::select! {
                r = ready.wait_for(|r| *r) => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            let (https, http) = match (https.listen(), http.listen()) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot listen on the HTTPS or HTTP port");
                    return;
                }
            };
            tracing::info!(https = %https_addr, http = %http_addr, "listening");
            let public = worker.public_https_port.unwrap_or(https_addr.port());
            tokio::join!(
                edge::serve(worker.clone(), https, tracker.clone(), stop.clone()),
                redirect::serve(worker, http, public, tracker, stop),
            );
        }
    });
    let admin_task = tokio::spawn({
        let mut stop = stop_rx.clone();
        let router = admin::router(worker.clone());
        async move {
            http_server::serve(admin, router, async move {
                let _ = stop.changed().await;
            })
            .await;
        }
    });
    let channel_task = tokio::spawn(channel::run(worker.clone(), stop_rx));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = edge_task.await;
    tracker.close();
    if tokio::time::timeout(args.drain_timeout(), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain period over; closing the remaining connections"
        );
    }
    let _ = channel_task.await;
    let _ = admin_task.await;
    Ok(())
}

/// Build the runtime (with `--threads`), set up logging if asked, and run.
pub fn start(args: WorkerArgs) -> std::process::ExitCode {
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if args.threads > 1 {
            b.worker_threads(args.threads);
        }
        b
    };
    // Only a single event loop coalesces: in a multi-thread runtime, a spinning thread can
    // take the core from another runtime thread that has work (see `coalesce.rs`).
    if args.threads == 1 {
        coalesce::install(
            &mut builder,
            std::time::Duration::from_micros(args.coalesce_us),
        );
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-worker: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Logging to stderr, `RUST_LOG` style filter (default `info`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}
