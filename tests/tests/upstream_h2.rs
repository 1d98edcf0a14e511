//! Upstream HTTP/2 end to end: many clients (HTTP/1.1 and HTTP/2 over real TLS) through one
//! worker process to in-process HTTP/2 backends that count what reached them — connections,
//! TLS handshakes, requests, resets — so the tests assert on the sharing itself.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sluice_tests::h2::{H2Backend, H2Options};
use sluice_tests::net::{tls_connect, TestCa, H1, H2};
use sluice_tests::{wait_for, Api, Worker, WORKER_TOKEN};

struct Edge {
    api: Api,
    worker: Worker,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

/// An API, one worker, and a `*.beerme` certificate.
async fn edge() -> (Edge, String) {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        &dir.path().join("api"),
        "127.0.0.1:0",
        &["--workers", "0", "--heartbeat-ms", "200"],
    );
    let worker = Worker::start(&api.url(), &dir.path().join("w"), "edge-1", WORKER_TOKEN);
    let ca = TestCa::new();
    // webpki does not match `*.beerme` (one label under the wildcard), so name each host too.
    let (chain, key) = ca.leaf(&[
        "*.beerme",
        "grpc.beerme",
        "secure.beerme",
        "narrow.beerme",
        "leaving.beerme",
        "rpc.beerme",
    ]);
    let cert = api
        .create(
            "/v1/certificates",
            json!({"name": "beerme", "cert_pem": chain, "key_pem": key}),
        )
        .await;
    (
        Edge {
            api,
            worker,
            ca,
            _dir: dir,
        },
        cert,
    )
}

impl Edge {
    /// A terminate host `name` over a backend with these servers; returns the backend id once
    /// the worker serves it.
    async fn host(&self, cert: &str, name: &str, backend: Value) -> String {
        let id = self.api.create("/v1/backends", backend).await;
        self.api.create("/v1/hosts",
            json!({"hostname": name, "mode": "terminate", "backend_id": id, "certificate_id": cert}),
        )
        .await;
        let v = self.api.version().await;
        self.worker.wait_version(v).await;
        id
    }

    async fn h1(&self, sni: &str) -> H1 {
        let tls = tls_connect(self.worker.https, sni, self.ca.der(), &[b"http/1.1"])
            .await
            .expect("tls");
        H1::new(tls).await
    }

    async fn h2(&self, sni: &str) -> H2 {
        let tls = tls_connect(self.worker.https, sni, self.ca.der(), &[b"h2"])
            .await
            .expect("tls");
        H2::new(tls).await
    }

    /// `clients` concurrent clients, every other one HTTP/2, each sending `requests` GETs on
    /// its own TLS connection; returns every reply's (status, body).
    async fn load(&self, host: &str, clients: usize, requests: usize) -> Vec<(u16, Value)> {
        let mut tasks = Vec::new();
        for i in 0..clients {
            let (h1, h2) = if i % 2 == 0 {
                (Some(self.h1(host).await), None)
            } else {
                (None, Some(self.h2(host).await))
            };
            let host = host.to_owned();
            tasks.push(tokio::spawn(async move {
                let (mut h1, mut h2) = (h1, h2);
                let mut out = Vec::new();
                for n in 0..requests {
                    let path = format!("/c{i}/r{n}");
                    let reply = match (&mut h1, &mut h2) {
                        (Some(c), _) => c.get(&host, &path, &[]).await,
                        (_, Some(c)) => c.get(&host, &path, &[]).await,
                        _ => unreachable!(),
                    };
                    out.push((reply.status, reply.body));
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    }
}

fn servers(backends: &[&H2Backend]) -> Vec<Value> {
    backends
        .iter()
        .map(|b| json!({"address": b.addr.to_string()}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_one_h2c_connection_per_server() {
    let (e, cert) = edge().await;
    let b1 = H2Backend::start("grpc-1", H2Options::default()).await;
    let b2 = H2Backend::start("grpc-2", H2Options::default()).await;
    let backend = e
        .host(
            &cert,
            "grpc.beerme",
            json!({"name": "grpc", "protocol": "h2c", "servers": servers(&[&b1, &b2])}),
        )
        .await;
    let replies = e.load("grpc.beerme", 200, 10).await;
    assert_eq!(replies.len(), 2000);
    for (status, body) in &replies {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["version"], "HTTP/2.0", "{body}");
        assert_eq!(body["authority"], "grpc.beerme", "{body}");
    }
    // Exactly one connection per server, every request multiplexed on it.
    assert_eq!(b1.count(|c| &c.connections), 1);
    assert_eq!(b2.count(|c| &c.connections), 1);
    assert_eq!(
        b1.count(|c| &c.requests) + b2.count(|c| &c.requests),
        2000,
        "every request reached a backend once"
    );
    let seen = b1.seen.lock().unwrap().clone();
    let first = &seen[0];
    assert_eq!(first.header("x-forwarded-proto"), Some("https"));
    assert_eq!(first.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(first.header("host"), None, "Host became :authority");
    assert_eq!(first.header("connection"), None);

    // The worker's metrics and the API's health view show the sharing.
    let (_, metrics) = e.worker.http.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    let line = format!(
        "sluice_worker_upstream_h2_connections_opened_total{{server=\"{}\"}} 1",
        b1.addr
    );
    assert!(metrics.contains(&line), "{line} not in metrics:\n{metrics}");
    // The worker reports periodically: a report taken mid-load shows part of the requests, so
    // wait for one that covers everything the first server answered before judging the reuse.
    let served = b1.count(|c| &c.requests) as u64;
    let view = wait_for(Duration::from_secs(15), || async {
        let (_, v) = e
            .api
            .http
            .get(&format!("/v1/backends/{backend}/health"))
            .await;
        let up = v["servers"][0]["workers"][0]["upstream"].clone();
        (up["requests"].as_u64().unwrap_or(0) >= served).then_some(up)
    })
    .await
    .unwrap_or_else(|| panic!("no health report covering the {served} requests of the load"));
    assert_eq!(view["protocol"], "h2");
    assert_eq!(view["connections_opened"], 1);
    assert!(view["reuse_ratio"].as_f64().unwrap() >= 500.0, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_negotiating_h2_gets_one_handshake() {
    let (e, cert) = edge().await;
    let backend_ca = TestCa::new();
    let (chain, key) = backend_ca.leaf(&["api.internal"]);
    let b = H2Backend::start(
        "tls-h2",
        H2Options {
            tls: Some((chain, key)),
            ..H2Options::default()
        },
    )
    .await;
    e.host(
        &cert,
        "secure.beerme",
        json!({"name": "secure", "protocol": "https", "servers": servers(&[&b]),
            "tls": {"verify": true, "ca_pem": backend_ca.pem, "server_name": "api.internal"}}),
    )
    .await;
    let replies = e.load("secure.beerme", 50, 10).await;
    assert!(replies
        .iter()
        .all(|(s, b)| *s == 200 && b["version"] == "HTTP/2.0"));
    assert_eq!(b.count(|c| &c.handshakes), 1, "one TLS handshake in all");
    assert_eq!(b.count(|c| &c.connections), 1);
    assert_eq!(b.count(|c| &c.requests), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_stream_backend_gets_more_connections_and_no_failures() {
    let (e, cert) = edge().await;
    let b = H2Backend::start(
        "narrow",
        H2Options {
            max_streams: Some(1),
            ..H2Options::default()
        },
    )
    .await;
    e.host(
        &cert,
        "narrow.beerme",
        json!({"name": "narrow", "protocol": "h2c", "servers": servers(&[&b])}),
    )
    .await;
    let replies = e.load("narrow.beerme", 50, 4).await;
    assert_eq!(replies.len(), 200);
    assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
    let opened = b.count(|c| &c.connections);
    assert!(opened > 1, "the worker opened more connections ({opened})");
    assert!(
        opened <= 50,
        "no more than one per concurrent client ({opened})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_under_load_fails_no_idempotent_request() {
    let (e, cert) = edge().await;
    let b = H2Backend::start(
        "leaving",
        H2Options {
            goaway_after: Some(40),
            ..H2Options::default()
        },
    )
    .await;
    e.host(
        &cert,
        "leaving.beerme",
        json!({"name": "leaving", "protocol": "h2c", "servers": servers(&[&b])}),
    )
    .await;
    let replies = e.load("leaving.beerme", 20, 10).await;
    let failed: Vec<_> = replies.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(b.count(|c| &c.goaways) >= 1, "the backend sent GOAWAY");
    assert!(
        b.count(|c| &c.connections) >= 2,
        "a fresh connection took over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_round_trip_and_a_client_reset_reaches_the_backend() {
    let (e, cert) = edge().await;
    let b = H2Backend::start("grpc", H2Options::default()).await;
    e.host(
        &cert,
        "rpc.beerme",
        json!({"name": "rpc", "protocol": "h2c", "servers": servers(&[&b])}),
    )
    .await;
    let tls = tls_connect(e.worker.https, "rpc.beerme", e.ca.der(), &[b"h2"])
        .await
        .expect("tls");

    // gRPC style: a body with trailers up, a body with trailers down.
    let (mut send, conn) =
        hyper::client::conn::http2::handshake::<_, _, sluice_tests::net::BoxBody>(
            TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post("https://rpc.beerme/trailers")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let got = collected.trailers().cloned().expect("response trailers");
    assert_eq!(got.get("x-checksum").unwrap(), "abc123");
    assert_eq!(got.get("grpc-status").unwrap(), "0");
    assert_eq!(got.get("x-backend").unwrap(), "grpc");
    let body: Value = serde_json::from_slice(&collected.to_bytes()).unwrap();
    assert_eq!(body["body_bytes"], 5);
    let seen = b.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].header("te"),
        Some("trailers"),
        "te: trailers passed on"
    );

    // A client that resets its stream resets the upstream stream.
    let tls = tls_connect(e.worker.https, "rpc.beerme", e.ca.der(), &[b"h2"])
        .await
        .expect("tls");
    let (client, h2conn) = h2::client::handshake(tls).await.expect("h2");
    tokio::spawn(h2conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::get("https://rpc.beerme/hang")
        .body(())
        .unwrap();
    let (_response, mut stream) = client.send_request(req, false).expect("send");
    // Wait until the request has reached the backend, then reset it.
    wait_for(Duration::from_secs(10), || async {
        b.seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.path.ends_with("/hang"))
            .then_some(())
    })
    .await
    .expect("the request reached the backend");
    stream.send_reset(h2::Reason::CANCEL);
    wait_for(Duration::from_secs(10), || async {
        (b.count(|c| &c.resets) == 1).then_some(())
    })
    .await
    .expect("the backend saw its stream reset");
}
