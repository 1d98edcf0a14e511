//! The ways users first meet Sluice, run for real: `sluice-api --demo` (its printed curl
//! commands are executed as printed), and `examples/seed.sh` — the compose stack's init job —
//! against a stack of the same binaries (API, worker, echo backends as processes).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use sluice_tests::net::{tls_connect, H1, H2};
use sluice_tests::{sluice_api_bin, wait_for, Api, Proc, Worker, ADMIN_TOKEN, WORKER_TOKEN};

fn first_cert(pem_file: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(pem_file)
        .expect("pem file")
        .next()
        .expect("a certificate")
        .expect("valid pem")
}

/// A loopback port nobody listens on right now (for a managed worker, which cannot report a
/// port the system chose).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The seed scenario's three patterns through the worker at `https`, trusting `certs/ca.pem`.
async fn check_patterns(https: SocketAddr, certs: &Path) {
    let ca = first_cert(&certs.join("ca.pem"));

    // Terminated, HTTP/2 to the client, round robin over two HTTP/1.1 backends.
    let tls = tls_connect(https, "redmine.beerme", ca.clone(), &[b"h2"])
        .await
        .expect("tls to redmine");
    let mut h2 = H2::new(tls).await;
    let mut names = Vec::new();
    for _ in 0..2 {
        let r = h2.get("redmine.beerme", "/issues", &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["version"], "HTTP/1.1");
        assert_eq!(r.body["headers"]["x-forwarded-proto"], "https");
        assert_eq!(r.body["headers"]["host"], "redmine.beerme");
        names.push(r.body["backend"].as_str().unwrap().to_owned());
    }
    names.sort();
    assert_eq!(names, ["redmine-1", "redmine-2"], "round robin");

    // Passed through: the client sees the backend's own certificate.
    let tls = tls_connect(https, "odoo.beerme", ca.clone(), &[b"http/1.1"])
        .await
        .expect("tls to odoo");
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, first_cert(&certs.join("odoo.pem")));
    let mut h1 = H1::new(tls).await;
    let r = h1.get("odoo.beerme", "/web", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["tls"], true);
    assert!(r.body["backend"].as_str().unwrap().starts_with("odoo-"));

    // Terminated with an h2c backend.
    let tls = tls_connect(https, "grpc.beerme", ca, &[b"h2"])
        .await
        .expect("tls to grpc");
    let r = H2::new(tls).await.get("grpc.beerme", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.body["backend"].as_str(), r.body["version"].as_str()),
        (Some("grpc-1"), Some("HTTP/2.0"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_every_pattern_and_its_curl_commands_work_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[
            "--demo",
            "--workers",
            "1",
            "--worker-https",
            &format!("127.0.0.1:{port}"),
            "--worker-http",
            "127.0.0.1:0",
        ],
    );
    wait_for(Duration::from_secs(30), || async {
        api.proc.logged("Try the three patterns").then_some(())
    })
    .await
    .expect("the demo printed its instructions");
    let version = api.version().await;
    api.wait_applied(1, version).await;
    let https: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    check_patterns(https, &dir.path().join("data/demo")).await;

    let text = api.proc.log_text();
    assert!(text.contains(ADMIN_TOKEN), "the admin token is printed");
    let commands: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl --cacert"))
        .collect();
    assert_eq!(commands.len(), 3, "one curl per pattern:\n{text}");
    for command in commands {
        let out = Command::new("sh")
            .arg("-c")
            .arg(command)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: Value = serde_json::from_slice(&out.stdout).expect("JSON from the backend");
        assert!(body["backend"].is_string(), "{command}: {body}");
    }
}

fn echo(name: &str, protocol: &str, certs: &Path) -> (Proc, SocketAddr) {
    let args: Vec<String> = [
        "echo",
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--protocol",
        protocol,
        "--cert-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([certs.display().to_string()])
    .collect();
    Proc::spawn(name, &args, &[], "addr", "echo backend listening")
}

fn seed(api: &Api, certs: &Path, servers: [&str; 3]) -> std::process::Output {
    Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/seed.sh"))
        .env("SLUICE_API", api.url())
        .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CERT_DIR", certs)
        .env("REDMINE_SERVERS", servers[0])
        .env("ODOO_SERVERS", servers[1])
        .env("GRPC_SERVERS", servers[2])
        .output()
        .expect("running seed.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_init_script_loads_the_seed_scenario_into_a_live_stack() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = Command::new(sluice_api_bin())
        .args(["demo-certs", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", &["--workers", "0"]);
    let worker = Worker::start(&api.url(), &dir.path().join("w"), "edge-1", WORKER_TOKEN);
    let backends = [
        echo("redmine-1", "http", &certs),
        echo("redmine-2", "http", &certs),
        echo("odoo-1", "tls", &certs),
        echo("odoo-2", "tls", &certs),
        echo("grpc-1", "h2c", &certs),
    ];
    let at = |range: std::ops::Range<usize>| {
        backends[range]
            .iter()
            .map(|(_, a)| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let servers = [at(0..2), at(2..4), at(4..5)];
    let servers = [
        servers[0].as_str(),
        servers[1].as_str(),
        servers[2].as_str(),
    ];

    let out = seed(&api, &certs, servers);
    assert!(
        out.status.success(),
        "seed.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = api.version().await;
    // Idempotent: the init job may run again; nothing changes.
    let again = seed(&api, &certs, servers);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(api.version().await, version, "a second run commits nothing");

    worker.wait_version(version).await;
    check_patterns(worker.https, &certs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_control_plane_says_how_to_add_the_first_host() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("data"), "127.0.0.1:0", &["--workers", "0"]);
    wait_for(Duration::from_secs(10), || async {
        api.proc.logged("no hosts yet").then_some(())
    })
    .await
    .expect("the first-run hint");
    assert!(api.proc.logged("/v1/backends"), "{}", api.proc.log_text());
    assert!(api.proc.logged("--demo"));
}
