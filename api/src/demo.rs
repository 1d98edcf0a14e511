//! What `sluice-api` prints on a first run, and the `--demo` start-up: demo certificates in
//! `<data-dir>/demo`, in-process demo backends, the seed scenario applied through the API's own
//! `PUT /v1/config` (the same validation and versioning as any client), then curl commands
//! that work as printed.

use std::net::SocketAddr;

use anyhow::Context;
use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sluice_demo::certs::DemoCerts;
use sluice_demo::DemoBackends;
use tower::ServiceExt;

use crate::cli::ServeArgs;
use crate::AppState;

/// Start the demo backends and load the seed scenario; keep the returned value alive.
pub async fn start(
    state: &AppState,
    args: &ServeArgs,
    listen: SocketAddr,
) -> anyhow::Result<DemoBackends> {
    let dir = args.data_dir.join("demo");
    let certs = DemoCerts::load_or_create(&dir)
        .with_context(|| format!("demo certificates in {}", dir.display()))?;
    let backends = DemoBackends::start(&certs)
        .await
        .context("starting the demo backends")?;
    let document = sluice_demo::seed::document(&certs, &backends.addresses);
    let request = Request::put("/v1/config")
        .header(
            "authorization",
            format!("Bearer {}", state.admin_token.expose()),
        )
        .header("content-type", "application/json")
        .body(Body::from(document.to_string()))
        .context("building the seed request")?;
    let response = crate::app(state.clone())
        .oneshot(request)
        .await
        .context("applying the seed scenario")?;
    let status = response.status();
    if status != StatusCode::OK {
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::bail!(
            "the seed scenario was refused ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    let ca = dir.join("ca.pem");
    println!(
        "\nSluice demo is running: API on http://{listen}, one worker on port {port}.\n\
         Admin token: {token}\n\n\
         Try the three patterns (the demo CA is {ca}):\n\n{commands}\n\
         Watch it from the API:\n  \
         curl -H 'Authorization: Bearer {token}' http://{listen}/v1/workers\n  \
         curl -H 'Authorization: Bearer {token}' http://{listen}/v1/health\n",
        port = args.worker_https.port(),
        token = state.admin_token.expose(),
        ca = ca.display(),
        commands =
            sluice_demo::seed::curl_commands(&ca.display().to_string(), args.worker_https.port()),
    );
    Ok(backends)
}

/// On a control plane without hosts, print how to add the first one.
pub async fn first_run_hint(state: &AppState, args: &ServeArgs, listen: SocketAddr) {
    let Ok(hosts) = state.db.list_hosts().await else {
        return;
    };
    if !hosts.is_empty() {
        return;
    }
    let token_file = args.data_dir.join("admin.token");
    println!(
        "\nSluice is running with no hosts yet: API on http://{listen}, {workers} worker(s) on port {port}.\n\
         Add a certificate, a backend and a host (README.md, \"Build the seed scenario with curl\"):\n  \
         TOKEN=$(cat {token})\n  \
         curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n    \
         http://{listen}/v1/backends -d '{{\"name\":\"app\",\"protocol\":\"http\",\"servers\":[{{\"address\":\"127.0.0.1:3000\"}}]}}'\n\
         Or see everything working at once: cargo run --release -- --demo\n",
        workers = args.workers,
        port = args.worker_https.port(),
        token = token_file.display(),
    );
}
