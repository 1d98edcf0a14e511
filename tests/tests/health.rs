//! Health checking end to end: a server killed under steady traffic is routed around without a
//! failed request and shown down by the worker, the API and the events stream, then comes back;
//! a disabled server drains; `tls` checks report the certificate a passthrough server presents.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sluice_tests::net::{backend_of, tls_connect, EchoBackend, TestCa, TlsBackend, H1};
use sluice_tests::{wait_for, Api, Worker, ADMIN_TOKEN, WORKER_TOKEN};

async fn post(api: &Api, path: &str, body: Value) -> Value {
    let (status, reply) = api.http.post(path, body).await;
    assert_eq!(status, 201, "POST {path}: {reply}");
    reply
}

/// Events received on `GET /v1/events`, as (type, data).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// Open the events stream and collect what arrives, in order.
async fn subscribe(api: &Api) -> Received {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("{}/v1/events", api.url()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("events stream");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let received: Received = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut text = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            text.push_str(&String::from_utf8_lossy(&data));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_owned())
                };
                if let (Some(kind), Some(data)) = (field("event:"), field("data:")) {
                    let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                    sink.lock().unwrap().push((kind, data));
                }
            }
        }
    });
    received
}

/// An API (fast heartbeats) and one worker that drains quickly on SIGTERM.
fn start() -> (tempfile::TempDir, Api, Worker) {
    let (dir, api) = start_api();
    let worker = start_worker(&dir, &api);
    (dir, api, worker)
}

fn start_api() -> (tempfile::TempDir, Api) {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        &dir.path().join("api"),
        "127.0.0.1:0",
        &["--workers", "0", "--heartbeat-ms", "200"],
    );
    (dir, api)
}

fn start_worker(dir: &tempfile::TempDir, api: &Api) -> Worker {
    Worker::start_with(
        &api.url(),
        &dir.path().join("w"),
        "edge-1",
        WORKER_TOKEN,
        &[("SLUICE_DRAIN_MS", "500")],
    )
}

/// The worker's own verdict on a server.
async fn verdict(worker: &Worker, server: &str) -> Value {
    worker.http.get("/health").await.1[server].clone()
}

async fn wait_verdict(worker: &Worker, server: &str, want: &str, within: Duration) -> Value {
    wait_for(within, || async {
        let v = verdict(worker, server).await;
        (v["status"] == want).then_some(v)
    })
    .await
    .unwrap_or_else(|| {
        panic!("server {server} did not become {want} within {within:?}");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_routed_around_shown_down_and_back_up_in_order() {
    // Subscribed before the worker starts, so its connection is among the events.
    let (dir, api) = start_api();
    let events = subscribe(&api).await;
    let worker = start_worker(&dir, &api);
    let ca = TestCa::new();
    let (chain, key) = ca.leaf(&["redmine.beerme"]);
    post(
        &api,
        "/v1/certificates",
        json!({"name": "redmine", "cert_pem": chain, "key_pem": key}),
    )
    .await;
    let one = EchoBackend::start("redmine-1").await;
    let two = EchoBackend::start("redmine-2").await;
    let (interval, timeout, rise, fall) = (300u64, 200u64, 2u64, 2u64);
    let backend = post(
        &api,
        "/v1/backends",
        json!({"name": "redmine", "protocol": "http",
            "servers": [{"address": one.addr.to_string()}, {"address": two.addr.to_string()}],
            "health_check": {"kind": "tcp", "interval_ms": interval, "timeout_ms": timeout, "rise": rise, "fall": fall}}),
    )
    .await;
    let backend_id = backend["id"].as_str().unwrap().to_owned();
    let victim = backend["servers"][1]["id"].as_str().unwrap().to_owned();
    post(
        &api,
        "/v1/hosts",
        json!({"hostname": "redmine.beerme", "mode": "terminate", "backend_id": backend_id}),
    )
    .await;
    worker.wait_version(api.version().await).await;
    wait_verdict(&worker, &victim, "up", Duration::from_secs(5)).await;

    // Steady traffic from two keep-alive clients for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let tls = tls_connect(worker.https, "redmine.beerme", ca.der(), &[b"http/1.1"])
            .await
            .expect("tls");
        let mut h1 = H1::new(tls).await;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                statuses.push(h1.get("redmine.beerme", "/", &[]).await.status);
            }
            statuses
        }));
    }

    // Kill one server: down within fall x interval + timeout (+ 1 s), in the worker and the API.
    tokio::time::sleep(Duration::from_millis(200)).await; // let traffic run on both first
    let two_addr = two.addr;
    let killed = Instant::now();
    drop(two);
    let limit = Duration::from_millis(fall * interval + timeout + 1000);
    let down = wait_verdict(&worker, &victim, "down", limit).await;
    assert!(
        down["last_error"].as_str().unwrap().contains("connect"),
        "{down}"
    );
    let seen_down = killed.elapsed();
    let path = format!("/v1/backends/{backend_id}/health");
    wait_for(Duration::from_secs(1), || async {
        let v = api.http.get(&path).await.1;
        (v["servers"][1]["status"] == "down").then_some(())
    })
    .await
    .expect("the API shows it down within a second of the worker");

    // Bring it back on the same address: up again after `rise` checks.
    let two = EchoBackend::start_on("redmine-2", two_addr).await;
    let up = wait_verdict(&worker, &victim, "up", Duration::from_secs(5)).await;
    assert!(up["successes"].as_u64().unwrap() >= rise, "{up}");
    // Traffic reaches it again.
    let back = wait_for(Duration::from_secs(5), || async {
        (!two.requests().is_empty()).then_some(())
    })
    .await;
    assert!(back.is_some(), "the restarted server gets traffic again");

    stop.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }
    let failed: Vec<u16> = statuses.iter().copied().filter(|s| *s != 200).collect();
    let worker_log = worker.proc.log_text();
    let errors: Vec<&str> = worker_log
        .lines()
        .filter(|l| l.contains("status=5") || l.contains("WARN") || l.contains("DEBUG"))
        .collect();
    assert!(
        failed.is_empty(),
        "no client saw a failed request ({} requests): {failed:?}\n{}",
        statuses.len(),
        errors.join("\n")
    );
    assert!(
        statuses.len() > 20,
        "traffic was steady: {}",
        statuses.len()
    );
    eprintln!(
        "down seen after {seen_down:?} (limit {limit:?}); {} requests, none failed",
        statuses.len()
    );

    // The events stream shows the victim's transitions in order.
    let transitions = wait_for(Duration::from_secs(5), || async {
        let t: Vec<(String, String)> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, d)| k == "health" && d["server_id"] == victim.as_str())
            .map(|(_, d)| {
                (
                    d["from"].as_str().unwrap().to_owned(),
                    d["to"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (t.len() >= 3).then_some(t)
    })
    .await
    .expect("three health events for the victim");
    let pairs: Vec<(&str, &str)> = transitions
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("unknown", "up"), ("up", "down"), ("down", "up")],
        "in order"
    );
    let kinds: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    for kind in ["worker", "committed", "applied"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "a {kind} event in {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_server_finishes_its_in_flight_request_and_gets_no_new_ones() {
    let (_dir, api, worker) = start();
    let ca = TestCa::new();
    let (chain, key) = ca.leaf(&["redmine.beerme"]);
    post(
        &api,
        "/v1/certificates",
        json!({"name": "redmine", "cert_pem": chain, "key_pem": key}),
    )
    .await;
    let backends = [
        EchoBackend::start("redmine-1").await,
        EchoBackend::start("redmine-2").await,
    ];
    let servers: Vec<Value> = backends
        .iter()
        .map(|b| json!({"address": b.addr.to_string()}))
        .collect();
    let backend = post(
        &api,
        "/v1/backends",
        json!({"name": "redmine", "protocol": "http", "servers": servers}),
    )
    .await;
    let backend_id = backend["id"].as_str().unwrap().to_owned();
    post(
        &api,
        "/v1/hosts",
        json!({"hostname": "redmine.beerme", "mode": "terminate", "backend_id": backend_id}),
    )
    .await;
    worker.wait_version(api.version().await).await;

    // A long upload: the body is sent in pieces, the request stays in flight until the end.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let tls = tls_connect(worker.https, "redmine.beerme", ca.der(), &[b"http/1.1"])
        .await
        .expect("tls");
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, sluice_tests::net::BoxBody>(TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let req = http::Request::post("/upload")
        .header("host", "redmine.beerme")
        .header("content-length", "30000")
        .body(body.boxed())
        .unwrap();
    let in_flight = tokio::spawn(async move { send.send_request(req).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![b'a'; 10000]))))
        .await
        .unwrap();
    // Which server took it?
    let busy = wait_for(Duration::from_secs(5), || async {
        backends.iter().position(|b| !b.requests().is_empty())
    })
    .await
    .expect("the upload reached a server");
    let other = 1 - busy;

    // Disable that server while its request is in flight.
    let mut servers = backend["servers"].clone();
    servers[busy]["enabled"] = json!(false);
    let (status, reply) = api
        .http
        .send(
            "PUT",
            &format!("/v1/backends/{backend_id}"),
            Some(json!({"name": "redmine", "protocol": "http", "servers": servers})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    worker.wait_version(api.version().await).await;

    // New requests all go to the other server.
    let tls = tls_connect(worker.https, "redmine.beerme", ca.der(), &[b"http/1.1"])
        .await
        .expect("tls");
    let mut h1 = H1::new(tls).await;
    for _ in 0..6 {
        let r = h1.get("redmine.beerme", "/", &[]).await;
        assert_eq!(
            (r.status, backend_of(&r)),
            (200, backends[other].name.clone())
        );
    }
    assert_eq!(
        backends[busy].requests().len(),
        1,
        "no new request to the disabled server"
    );

    // The in-flight upload completes on the disabled server.
    for _ in 0..2 {
        tx.send(Ok(Frame::data(Bytes::from(vec![b'b'; 10000]))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = in_flight.await.unwrap().expect("the upload's response");
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["backend"], backends[busy].name.as_str());
    assert_eq!(body["body_bytes"], 30000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_checks_show_the_certificate_and_warn_when_it_does_not_cover_the_host() {
    let (_dir, api, worker) = start();
    let ca = TestCa::new();
    let (good_chain, good_key) = ca.leaf(&["odoo.beerme"]);
    let (bad_chain, bad_key) = ca.leaf(&["intranet.example"]);
    let good = TlsBackend::start("odoo-1", &good_chain, &good_key, false).await;
    let bad = TlsBackend::start("odoo-2", &bad_chain, &bad_key, false).await;
    let backend = post(
        &api,
        "/v1/backends",
        json!({"name": "odoo", "protocol": "tcp",
            "servers": [{"address": good.addr.to_string()}, {"address": bad.addr.to_string()}],
            "health_check": {"kind": "tls", "interval_ms": 300, "timeout_ms": 200}}),
    )
    .await;
    let backend_id = backend["id"].as_str().unwrap().to_owned();
    let (good_id, bad_id) = (
        backend["servers"][0]["id"].as_str().unwrap().to_owned(),
        backend["servers"][1]["id"].as_str().unwrap().to_owned(),
    );
    post(
        &api,
        "/v1/hosts",
        json!({"hostname": "odoo.beerme", "mode": "passthrough", "backend_id": backend_id}),
    )
    .await;
    worker.wait_version(api.version().await).await;

    // Both are up (the handshake works); the mismatched one carries a warning.
    let g = wait_verdict(&worker, &good_id, "up", Duration::from_secs(5)).await;
    assert_eq!(g["certificate"]["checked_name"], "odoo.beerme", "{g}");
    assert_eq!(g["certificate"]["covers_name"], true);
    assert_eq!(g["warning"], Value::Null);
    let b = wait_verdict(&worker, &bad_id, "up", Duration::from_secs(5)).await;
    assert_eq!(b["certificate"]["sans"], json!(["intranet.example"]), "{b}");
    assert_eq!(b["certificate"]["covers_name"], false);
    assert!(
        b["warning"]
            .as_str()
            .unwrap()
            .contains("does not cover odoo.beerme"),
        "{b}"
    );
    assert!(b["certificate"]["not_after"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // The API's view shows the same facts for each worker.
    let path = format!("/v1/backends/{backend_id}/health");
    let view = wait_for(Duration::from_secs(10), || async {
        let v = api.http.get(&path).await.1;
        let w = v["servers"][1]["workers"][0].clone();
        w["warning"].is_string().then_some(v)
    })
    .await
    .expect("the warning reaches the API");
    let verdict = &view["servers"][1]["workers"][0];
    assert_eq!(verdict["status"], "up");
    assert!(verdict["certificate"]["subject"]
        .as_str()
        .unwrap()
        .contains("intranet.example"));
    assert_eq!(
        view["servers"][0]["workers"][0]["certificate"]["covers_name"],
        true
    );
}
