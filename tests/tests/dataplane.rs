//! The data plane end to end: a real API and worker process, rcgen certificates, in-process
//! backends that record what reached them, and HTTP/1.1 and HTTP/2 clients over real TLS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sluice_tests::net::{
    backend_of, tls_connect, EchoBackend, SilentBackend, TestCa, TlsBackend, WsBackend, H1, H2,
};
use sluice_tests::{Api, Worker, WORKER_TOKEN};

struct Seed {
    api: Api,
    worker: Worker,
    ca: TestCa,
    odoo_ca: TestCa,
    redmine: Vec<EchoBackend>,
    odoo: Vec<TlsBackend>,
    ids: HashMap<String, String>,
    _ws: WsBackend,
    _silent: SilentBackend,
    _dir: tempfile::TempDir,
}

/// The seed scenario of DESIGN.md on loopback, plus hosts for the error cases.
async fn seed() -> Seed {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(
        &dir.path().join("api"),
        "127.0.0.1:0",
        &["--workers", "0", "--heartbeat-ms", "200"],
    );
    // A short upstream response timeout, so the 504 case is quick.
    let worker = Worker::start_with(
        &api.url(),
        &dir.path().join("w"),
        "edge-1",
        WORKER_TOKEN,
        &[
            ("SLUICE_RESPONSE_TIMEOUT_MS", "1500"),
            ("SLUICE_HELLO_TIMEOUT_MS", "500"),
            ("SLUICE_HEADER_TIMEOUT_MS", "1500"),
        ],
    );
    let ca = TestCa::new();
    let odoo_ca = TestCa::new();
    let redmine = vec![
        EchoBackend::start("redmine-1").await,
        EchoBackend::start("redmine-2").await,
    ];
    let (odoo_chain, odoo_key) = odoo_ca.leaf(&["odoo.beerme", "pp.beerme"]);
    let odoo = vec![
        TlsBackend::start("odoo-1", &odoo_chain, &odoo_key, false).await,
        TlsBackend::start("odoo-2", &odoo_chain, &odoo_key, false).await,
        TlsBackend::start("odoo-pp", &odoo_chain, &odoo_key, true).await,
    ];
    let mut ids = HashMap::new();
    let (chain, key) = ca.leaf(&[
        "*.beerme",
        "redmine.beerme",
        "down.beerme",
        "empty.beerme",
        "secure.beerme",
        "badca.beerme",
        "ws.beerme",
        "slow.beerme",
        "legacy.beerme",
        "closing.beerme",
        "mute.beerme",
    ]);
    let ws = WsBackend::start().await;
    let silent = SilentBackend::start().await;
    ids.insert(
        "cert".into(),
        api.create(
            "/v1/certificates",
            json!({"name": "beerme", "cert_pem": chain, "key_pem": key}),
        )
        .await,
    );
    let (chain2, key2) = ca.leaf(&["other.beerme"]);
    ids.insert(
        "cert2".into(),
        api.create(
            "/v1/certificates",
            json!({"name": "other", "cert_pem": chain2, "key_pem": key2}),
        )
        .await,
    );
    let servers = |addrs: Vec<String>| {
        addrs
            .into_iter()
            .map(|a| json!({"address": a}))
            .collect::<Vec<_>>()
    };
    ids.insert(
        "redmine".into(),
        api.create(
            "/v1/backends",
            json!({"name": "redmine", "protocol": "http",
        "servers": servers(redmine.iter().map(|b| b.addr.to_string()).collect())}),
        )
        .await,
    );
    ids.insert(
        "odoo".into(),
        api.create(
            "/v1/backends",
            json!({"name": "odoo", "protocol": "tcp",
        "servers": servers(odoo[..2].iter().map(|b| b.addr.to_string()).collect())}),
        )
        .await,
    );
    ids.insert(
        "pp".into(),
        api.create(
            "/v1/backends",
            json!({"name": "pp", "protocol": "tcp",
        "servers": servers(vec![odoo[2].addr.to_string()])}),
        )
        .await,
    );
    // Nothing listens on port 1: connects are refused.
    ids.insert(
        "dead".into(),
        api.create(
            "/v1/backends",
            json!({"name": "dead", "protocol": "http",
        "servers": [{"address": "127.0.0.1:1"}]}),
        )
        .await,
    );
    ids.insert(
        "empty".into(),
        api.create(
            "/v1/backends",
            json!({"name": "empty", "protocol": "http", "servers": []}),
        )
        .await,
    );
    // TLS to the server, verified against the backend's own CA and name.
    let secure = |name: &str, ca_pem: &str| {
        json!({"name": name, "protocol": "https",
        "servers": [{"address": odoo[0].addr.to_string()}],
        "tls": {"verify": true, "ca_pem": ca_pem, "server_name": "odoo.beerme"}})
    };
    ids.insert(
        "secure".into(),
        api.create("/v1/backends", secure("secure", &odoo_ca.pem))
            .await,
    );
    ids.insert(
        "badca".into(),
        api.create("/v1/backends", secure("badca", &ca.pem)).await,
    );
    let plain = |name: &str, addr: std::net::SocketAddr| json!({"name": name, "protocol": "http", "servers": [{"address": addr.to_string()}]});
    ids.insert(
        "ws".into(),
        api.create("/v1/backends", plain("ws", ws.addr)).await,
    );
    ids.insert(
        "slow".into(),
        api.create("/v1/backends", plain("slow", silent.addr)).await,
    );
    let backend_ids = ids.clone();
    let host = |name: &str, mode: &str, backend: &str| json!({"hostname": name, "mode": mode, "backend_id": backend_ids[backend]});
    let mut redmine_host = host("redmine.beerme", "terminate", "redmine");
    redmine_host["request_headers"] = json!({"set": {"x-env": "prod"}, "remove": ["x-debug"]});
    ids.insert(
        "redmine.beerme".into(),
        api.create("/v1/hosts", redmine_host).await,
    );
    api.create("/v1/hosts", host("odoo.beerme", "passthrough", "odoo"))
        .await;
    let mut pp = host("pp.beerme", "passthrough", "pp");
    pp["proxy_protocol"] = json!("v1");
    api.create("/v1/hosts", pp).await;
    let mut other = host("other.beerme", "terminate", "redmine");
    other["certificate_id"] = json!(ids["cert2"]);
    api.create("/v1/hosts", other).await;
    api.create("/v1/hosts", host("down.beerme", "terminate", "dead"))
        .await;
    api.create("/v1/hosts", host("empty.beerme", "terminate", "empty"))
        .await;
    for name in ["secure", "badca", "ws", "slow"] {
        api.create(
            "/v1/hosts",
            host(&format!("{name}.beerme"), "terminate", name),
        )
        .await;
    }
    let v = api.version().await;
    worker.wait_version(v).await;
    Seed {
        api,
        worker,
        ca,
        odoo_ca,
        redmine,
        odoo,
        ids,
        _ws: ws,
        _silent: silent,
        _dir: dir,
    }
}

impl Seed {
    /// A new backend and a terminate host on it (the seed's certificate), applied by the
    /// worker; returns the backend's id.
    async fn serve(&self, hostname: &str, backend: Value) -> String {
        let id = self.api.create("/v1/backends", backend).await;
        self.api
            .create(
                "/v1/hosts",
                json!({"hostname": hostname, "mode": "terminate", "backend_id": id,
                "certificate_id": self.ids["cert"]}),
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
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        H1::new(tls).await
    }

    async fn h2(&self, sni: &str) -> H2 {
        let tls = tls_connect(self.worker.https, sni, self.ca.der(), &[b"h2", b"http/1.1"])
            .await
            .expect("tls");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "h2 negotiated"
        );
        H2::new(tls).await
    }

    /// A second worker on the same API with these settings (as `SLUICE_*` variables), serving
    /// the current version; keep the directory alive as long as the worker.
    async fn own_worker(&self, name: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, Worker) {
        let dir = tempfile::tempdir().unwrap();
        let worker = Worker::start_with(&self.api.url(), dir.path(), name, WORKER_TOKEN, env);
        worker.wait_version(self.api.version().await).await;
        (dir, worker)
    }

    fn seen(&self) -> Vec<sluice_tests::net::Seen> {
        self.redmine.iter().flat_map(|b| b.requests()).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_http1_and_http2_reach_the_backend_with_forwarded_headers() {
    let s = seed().await;
    let port = s.worker.https.port().to_string();
    let spoof = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-port", "1"),
        ("x-forwarded-host", "evil.example"),
        ("x-debug", "1"),
    ];

    let mut h1 = s.h1("redmine.beerme").await;
    let r = h1.get("redmine.beerme", "/issues?page=2", &spoof).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut h2 = s.h2("redmine.beerme").await;
    let r2 = h2.get("redmine.beerme", "/projects", &spoof).await;
    assert_eq!(r2.status, 200, "{:?}", r2.body);

    let seen = s.seen();
    assert_eq!(seen.len(), 2);
    for (req, path) in seen.iter().zip(["/issues?page=2", "/projects"]) {
        assert_eq!(req.path, path);
        assert_eq!(req.version, "HTTP/1.1");
        assert_eq!(req.header("host"), Some("redmine.beerme"));
        assert_eq!(
            req.header("x-forwarded-for"),
            Some("6.6.6.6, 127.0.0.1"),
            "client address appended"
        );
        assert_eq!(req.header("x-forwarded-proto"), Some("https"));
        assert_eq!(req.header("x-forwarded-port"), Some(port.as_str()));
        assert_eq!(req.header("x-forwarded-host"), Some("redmine.beerme"));
        assert_eq!(req.header("x-env"), Some("prod"), "host rule set");
        assert_eq!(req.header("x-debug"), None, "host rule removed");
        assert_eq!(req.headers[0].0, "host", "Host first (RFC 9110 7.2)");
        // Each replaced or added field once: the client's values never ride along.
        for name in [
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-host",
            "x-env",
        ] {
            let count = req.headers.iter().filter(|(k, _)| k == name).count();
            assert_eq!(count, 1, "{name} in {:?}", req.headers);
        }
    }
    let metrics = s.worker.http.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics
            .contains(r#"sluice_worker_http_requests_total{host="redmine.beerme",status="200"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_worker_upstream_response_seconds_count 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_worker_open_connections"),
        "{metrics}"
    );
    // One access-log line per request, like HAProxy's httplog (read from the worker's stderr,
    // which arrives asynchronously).
    let count = || {
        s.worker
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("sluice_worker::access") && l.contains("host=redmine.beerme"))
            .count()
    };
    let access = sluice_tests::wait_for(std::time::Duration::from_secs(5), || async {
        (count() >= 2).then(count)
    })
    .await;
    assert_eq!(access, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_exactly_and_upstream_connections_are_kept_alive() {
    let s = seed().await;
    let mut h2 = s.h2("redmine.beerme").await;
    let mut order = Vec::new();
    for _ in 0..8 {
        let r = h2.get("redmine.beerme", "/", &[]).await;
        assert_eq!(r.status, 200);
        order.push(backend_of(&r));
    }
    assert_eq!(order, ["redmine-1", "redmine-2"].repeat(4));
    let conns: usize = s
        .redmine
        .iter()
        .map(|b| b.connections.load(Ordering::SeqCst))
        .sum();
    assert_eq!(conns, 2, "one kept-alive upstream connection per server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_host_the_certificate_does_not_serve_is_421_and_unknown_sni_is_closed() {
    let s = seed().await;
    let mut h2 = s.h2("redmine.beerme").await;
    // other.beerme is a terminate host, but with another certificate: misdirected.
    assert_eq!(h2.get("other.beerme", "/", &[]).await.status, 421);
    assert_eq!(h2.get("nowhere.example", "/", &[]).await.status, 421);
    // The passthrough name is not served by this connection either.
    assert_eq!(h2.get("odoo.beerme", "/", &[]).await.status, 421);
    assert_eq!(h2.get("redmine.beerme", "/", &[]).await.status, 200);
    // On its own connection, other.beerme is served.
    let mut other = s.h2("other.beerme").await;
    assert_eq!(other.get("other.beerme", "/", &[]).await.status, 200);
    // Unknown SNI: the connection is closed, no certificate is sent.
    assert!(
        tls_connect(s.worker.https, "unknown.example", s.ca.der(), &[b"h2"])
            .await
            .is_err()
    );
    let metrics = s.worker.http.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains(r#"sluice_worker_connections_closed_total{reason="UnknownSni"} 1"#),
        "{metrics}"
    );
    // Requests no host took are counted under `-`, never under the name the client sent (that
    // would let clients grow the metric without bound).
    assert!(
        metrics.contains(r#"sluice_worker_http_requests_total{host="-",status="421"} 3"#),
        "{metrics}"
    );
    assert!(!metrics.contains("nowhere.example"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_reaches_backends_that_hold_their_own_certificate() {
    let s = seed().await;
    let mut order = Vec::new();
    for _ in 0..4 {
        // Trusting only the backend's CA proves the handshake is with the backend.
        let tls = tls_connect(
            s.worker.https,
            "odoo.beerme",
            s.odoo_ca.der(),
            &[b"h2", b"http/1.1"],
        )
        .await
        .expect("tls to backend");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN negotiated end to end"
        );
        let mut h2 = H2::new(tls).await;
        let r = h2.get("odoo.beerme", "/web", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["h2"], true);
        order.push(backend_of(&r));
    }
    assert_eq!(order, ["odoo-1", "odoo-2", "odoo-1", "odoo-2"]);
    // Per host: four connections, none open once the clients are gone, bytes both ways
    // counted as they passed (exact counts: the unit tests of `copy`).
    let closed = sluice_tests::wait_for(std::time::Duration::from_secs(5), || async {
        let metrics = s.worker.http.get("/metrics").await.1;
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        let open = r#"sluice_worker_passthrough_open_connections{host="odoo.beerme"}"#;
        (metric(&metrics, open) == Some(0.0)).then_some(metrics)
    })
    .await
    .expect("the passthrough connections are counted closed");
    let started = r#"sluice_worker_passthrough_connections_total{host="odoo.beerme"}"#;
    assert_eq!(metric(&closed, started), Some(4.0), "{closed}");
    for direction in ["ClientToServer", "ServerToClient"] {
        let series = format!(
            r#"sluice_worker_passthrough_bytes_total{{host="odoo.beerme",direction="{direction}"}}"#
        );
        // At least a ClientHello one way and a certificate the other, four times.
        let bytes = metric(&closed, &series).unwrap_or_default();
        assert!(bytes > 4.0 * 200.0, "{series} = {bytes}: {closed}");
    }
    // A passthrough host whose only server refuses connections: a failure of that host.
    let backend = s
        .api
        .create(
            "/v1/backends",
            json!({"name": "refusing", "protocol": "tcp", "servers": [{"address": "127.0.0.1:1"}]}),
        )
        .await;
    s.api
        .create(
            "/v1/hosts",
            json!({"hostname": "gone.beerme", "mode": "passthrough", "backend_id": backend}),
        )
        .await;
    s.worker.wait_version(s.api.version().await).await;
    assert!(
        tls_connect(s.worker.https, "gone.beerme", s.odoo_ca.der(), &[b"h2"])
            .await
            .is_err()
    );
    let metrics = s.worker.http.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    // Connect when the server was tried; NoServer if the health check had marked it down.
    let failed: f64 = ["Connect", "NoServer"]
        .iter()
        .filter_map(|kind| {
            let series = format!(
                r#"sluice_worker_passthrough_failures_total{{host="gone.beerme",kind="{kind}"}}"#
            );
            metric(metrics, &series)
        })
        .sum();
    assert_eq!(failed, 1.0, "{metrics}");
    // The proxy's own certificate is not what odoo.beerme presents.
    assert!(
        tls_connect(s.worker.https, "odoo.beerme", s.ca.der(), &[b"h2"])
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_sends_the_proxy_protocol_header_when_asked() {
    let s = seed().await;
    let tls = tls_connect(s.worker.https, "pp.beerme", s.odoo_ca.der(), &[b"http/1.1"])
        .await
        .expect("tls");
    let local = tls.get_ref().0.local_addr().unwrap();
    let mut h1 = H1::new(tls).await;
    assert_eq!(h1.get("pp.beerme", "/", &[]).await.status, 200);
    let lines = s.odoo[2].proxy_lines.lock().unwrap().clone();
    assert_eq!(
        lines,
        [format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}",
            local.port(),
            s.worker.https.port()
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_are_502_and_no_server_is_503() {
    let s = seed().await;
    let mut h1 = s.h1("down.beerme").await;
    let r = h1.get("down.beerme", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert!(
        !r.body.to_string().contains("127.0.0.1"),
        "no internals in the body: {:?}",
        r.body
    );
    let mut h2 = s.h2("empty.beerme").await;
    assert_eq!(h2.get("empty.beerme", "/", &[]).await.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_is_retried_on_the_other_server() {
    let s = seed().await;
    let live = s.redmine[0].addr.to_string();
    let body = json!({"name": "redmine", "protocol": "http",
        "servers": [{"address": "127.0.0.1:1"}, {"address": live}]});
    let (status, _) = s
        .api
        .http
        .send(
            "PUT",
            &format!("/v1/backends/{}", s.ids["redmine"]),
            Some(body),
        )
        .await;
    assert_eq!(status, 200);
    s.worker.wait_version(s.api.version().await).await;
    let mut h2 = s.h2("redmine.beerme").await;
    for _ in 0..4 {
        let r = h2.get("redmine.beerme", "/", &[]).await;
        assert_eq!((r.status, backend_of(&r)), (200, "redmine-1".to_owned()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_snapshot_switches_during_load_fail_no_request() {
    let s = Arc::new(seed().await);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..4 {
        let (s, stop, failures, done) = (s.clone(), stop.clone(), failures.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut h1 = if i % 2 == 0 {
                Some(s.h1("redmine.beerme").await)
            } else {
                None
            };
            let mut h2 = if i % 2 == 1 {
                Some(s.h2("redmine.beerme").await)
            } else {
                None
            };
            while !stop.load(Ordering::Relaxed) {
                let r = match (&mut h1, &mut h2) {
                    (Some(c), _) => c.get("redmine.beerme", "/", &[]).await,
                    (_, Some(c)) => c.get("redmine.beerme", "/", &[]).await,
                    _ => unreachable!(),
                };
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let host = s.ids["redmine.beerme"].clone();
    for i in 0..50 {
        let body = json!({"hostname": "redmine.beerme", "mode": "terminate", "backend_id": s.ids["redmine"],
            "request_headers": {"set": {"x-switch": i.to_string()}}});
        let (status, reply) = s
            .api
            .http
            .send("PUT", &format!("/v1/hosts/{host}"), Some(body))
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    let v = s.api.version().await;
    s.worker.wait_version(v).await;
    // Keep the load going until requests after the last switch have been served.
    let after = done.load(Ordering::Relaxed);
    sluice_tests::wait_for(std::time::Duration::from_secs(10), || async {
        (done.load(Ordering::Relaxed) > after + 20).then_some(())
    })
    .await
    .expect("load continued");
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {} requests",
        done.load(Ordering::Relaxed)
    );
    assert!(
        s.seen().iter().any(|r| r.header("x-switch") == Some("49")),
        "the newest rules are in force"
    );
    assert!(done.load(Ordering::Relaxed) > 50);
    // The backend did not change: its kept-alive connections served through every switch (at
    // most one per concurrent request per server: 4 clients, 2 servers).
    let opened: usize = s
        .redmine
        .iter()
        .map(|b| b.connections.load(Ordering::SeqCst))
        .sum();
    assert!(opened <= 8, "{opened} upstream connections for 4 clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_redirects_terminate_hosts_to_https_and_404s_the_rest() {
    let s = seed().await;
    let plain = sluice_tests::Http::new(format!("http://{}", s.worker.plain), None);
    let port = s.worker.https.port();
    let get = |host: &'static str| {
        let plain = plain.clone();
        async move { plain.send_with_host("GET", "/issues?x=1", host).await }
    };
    let (status, location) = get("redmine.beerme").await;
    assert_eq!(status, 308);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://redmine.beerme:{port}/issues?x=1").as_str())
    );
    assert_eq!(
        get("odoo.beerme").await.0,
        404,
        "passthrough hosts have no cleartext side"
    );
    assert_eq!(get("nowhere.example").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_are_verified_against_their_ca_and_name() {
    let s = seed().await;
    let mut h2 = s.h2("secure.beerme").await;
    let r = h2.get("secure.beerme", "/", &[]).await;
    assert_eq!(
        (r.status, backend_of(&r)),
        (200, "odoo-1".to_owned()),
        "{:?}",
        r.body
    );
    assert_eq!(
        r.body["h2"], true,
        "HTTP/2 to the backend: its ALPN offered h2"
    );

    // A backend that offers only http/1.1 gets HTTP/1.1.
    let (chain, key) = s.odoo_ca.leaf(&["legacy.internal"]);
    let legacy = TlsBackend::start_alpn("legacy", &chain, &key, false, &[b"http/1.1"]).await;
    let backend = s
        .api
        .create(
            "/v1/backends",
            json!({"name": "legacy", "protocol": "https",
            "servers": [{"address": legacy.addr.to_string()}],
            "tls": {"verify": true, "ca_pem": s.odoo_ca.pem, "server_name": "legacy.internal"}}),
        )
        .await;
    s.api
        .create(
            "/v1/hosts",
            json!({"hostname": "legacy.beerme", "mode": "terminate", "backend_id": backend}),
        )
        .await;
    s.worker.wait_version(s.api.version().await).await;
    let mut client = s.h2("legacy.beerme").await;
    for _ in 0..3 {
        let r = client.get("legacy.beerme", "/", &[]).await;
        assert_eq!((r.status, backend_of(&r)), (200, "legacy".to_owned()));
        assert_eq!(r.body["h2"], false, "HTTP/1.1 to an http/1.1-only backend");
    }
    let mut bad = s.h2("badca.beerme").await;
    assert_eq!(
        bad.get("badca.beerme", "/", &[]).await.status,
        502,
        "a certificate from another CA is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_work_after_termination() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let s = seed().await;
    let tls = tls_connect(s.worker.https, "ws.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://ws.beerme/chat", tls)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "sluice"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.send(Message::Binary(vec![0u8, 1, 2, 255].into()))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        &[0u8, 1, 2, 255]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_does_not_answer_is_504() {
    let s = seed().await;
    let started = std::time::Instant::now();
    let mut h1 = s.h1("slow.beerme").await;
    assert_eq!(h1.get("slow.beerme", "/", &[]).await.status, 504);
    assert!(started.elapsed() >= std::time::Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431_and_smuggled_requests_never_reach_the_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = seed().await;
    let mut h1 = s.h1("redmine.beerme").await;
    let big = "a".repeat(20 * 1024);
    assert_eq!(
        h1.get("redmine.beerme", "/", &[("x-big", big.as_str())])
            .await
            .status,
        431
    );

    // Both Content-Length and Transfer-Encoding (the request-smuggling shape), in either
    // order, first on its connection or pipelined behind a request with a sized or a chunked
    // body, and written a few bytes at a time: refused with 400 and the connection closed, so
    // neither it nor the request hidden behind it reaches the backend.
    let before = s.seen().len();
    let smuggled: &[u8] = b"POST /x HTTP/1.1\r\nHost: redmine.beerme\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: redmine.beerme\r\n\r\n";
    let cases: [(&[u8], &[&str]); 4] = [
        (smuggled, &["400"]),
        (
            b"POST / HTTP/1.1\r\nHost: redmine.beerme\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: redmine.beerme\r\n\r\n",
            &["400"],
        ),
        (
            b"POST /first-sized HTTP/1.1\r\nHost: redmine.beerme\r\nContent-Length: 5\r\n\r\nhello",
            &["200", "400"],
        ),
        (
            b"POST /first-chunked HTTP/1.1\r\nHost: redmine.beerme\r\nTransfer-Encoding: chunked\r\n\r\n11\r\nContent-Length: 5\r\n0\r\n\r\n",
            &["200", "400"],
        ),
    ];
    for (i, (first, statuses)) in cases.into_iter().enumerate() {
        let mut stream = first.to_vec();
        if i >= 2 {
            stream.extend_from_slice(smuggled);
        }
        let mut tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
            .await
            .unwrap();
        for piece in stream.chunks(7) {
            tls.write_all(piece).await.unwrap();
            tls.flush().await.unwrap();
        }
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tls.read_to_end(&mut reply),
        )
        .await;
        let reply = String::from_utf8_lossy(&reply);
        let answered: Vec<&str> = reply
            .match_indices("HTTP/1.1 ")
            .map(|(at, _)| &reply[at + 9..at + 12])
            .collect();
        assert_eq!(
            answered, statuses,
            "one answer per request up to the refused one, then the connection closed: {reply}"
        );
    }
    let seen = s.seen();
    let passed: Vec<&str> = seen[before..].iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        passed,
        ["/first-sized", "/first-chunked"],
        "only the requests before the refused ones reached the backend"
    );

    // Requests with only one of the two pass, one connection serving both in turn.
    let mut tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let mut reply = Vec::new();
    for (i, req) in [
        &b"POST /chunked HTTP/1.1\r\nHost: redmine.beerme\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        &b"POST /sized HTTP/1.1\r\nHost: redmine.beerme\r\nContent-Length: 5\r\n\r\nhello"[..],
    ]
    .into_iter()
    .enumerate()
    {
        tls.write_all(req).await.unwrap();
        while String::from_utf8_lossy(&reply).matches("HTTP/1.1 200 ").count() <= i {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&reply));
            reply.extend_from_slice(&buf[..n]);
        }
    }
    let seen = s.seen();
    assert_eq!(seen.len(), before + 4);
    assert!(seen.iter().any(|r| r.path == "/chunked"));
    assert!(seen
        .iter()
        .any(|r| r.path == "/sized" && r.header("content-length") == Some("5")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_streams_both_ways_with_bounded_worker_memory() {
    use sluice_tests::net::stream_both;
    let s = seed().await;
    const GIB: u64 = 1 << 30;
    // Up: the backend reads it all before answering (longer than the response timeout, which
    // only starts once the request body has been sent).
    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let (status, _, echoed) = stream_both(tls, "redmine.beerme", GIB, 0, "/").await;
    assert_eq!(status, 200);
    assert!(echoed > 0);
    let uploaded: u64 = s
        .redmine
        .iter()
        .map(|b| b.uploaded.load(Ordering::SeqCst))
        .sum();
    assert_eq!(uploaded, GIB, "the backend received the whole upload");
    // Down.
    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let (status, _, received) = stream_both(tls, "redmine.beerme", 0, GIB, "/big").await;
    assert_eq!((status, received), (200, GIB));
    let peak_kb = s.worker.proc.peak_rss_kib();
    assert!(
        peak_kb < 128 * 1024,
        "worker peak RSS {peak_kb} kB while streaming 2 GiB"
    );
}

/// Every server state in the worker's `/health`, by server id.
async fn health_of(s: &Seed) -> Value {
    s.worker.http.get("/health").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_is_checked_down_and_skipped_then_comes_back() {
    let s = seed().await;
    let addrs: Vec<String> = s.redmine.iter().map(|b| b.addr.to_string()).collect();
    let body = json!({"name": "redmine", "protocol": "http", "servers": [{"address": addrs[0]}, {"address": addrs[1]}],
        "health_check": {"kind": "http", "path": "/health", "expect_status": "200-399", "interval_ms": 200, "timeout_ms": 100, "rise": 2, "fall": 2}});
    let (status, backend) = s
        .api
        .http
        .send(
            "PUT",
            &format!("/v1/backends/{}", s.ids["redmine"]),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{backend}");
    s.worker.wait_version(s.api.version().await).await;
    let sick = backend["servers"][1]["id"].as_str().unwrap().to_owned();
    let healthy = backend["servers"][0]["id"].as_str().unwrap().to_owned();
    let state = |h: &Value, id: &str| h[id]["status"].as_str().unwrap_or("unknown").to_owned();
    let wait_state = |id: String, want: &'static str| {
        let s = &s;
        async move {
            sluice_tests::wait_for(std::time::Duration::from_secs(5), || {
                let id = id.clone();
                async move { (state(&health_of(s).await, &id) == want).then_some(()) }
            })
            .await
            .unwrap_or_else(|| panic!("server {id} never became {want}"))
        }
    };
    wait_state(sick.clone(), "up").await;

    // An HTTP check that gets a 500 marks the server down (fall 2 x 200 ms + timeout, plus a
    // second of slack); clients then never see it.
    s.redmine[1].status.store(500, Ordering::SeqCst);
    let started = std::time::Instant::now();
    wait_state(sick.clone(), "down").await;
    assert!(started.elapsed() < std::time::Duration::from_millis(2 * 200 + 100 + 1000));
    let h = health_of(&s).await;
    assert_eq!(h[&sick]["last_error"], "status 500", "{h}");
    assert_eq!(state(&h, &healthy), "up");
    // The API shows it too, within a second: overall status and this worker's own verdict.
    let path = format!("/v1/backends/{}/health", s.ids["redmine"]);
    let found = sluice_tests::wait_for(std::time::Duration::from_secs(1), || async {
        let v = s.api.http.get(&path).await.1;
        let statuses: Vec<String> = v["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| x["status"].as_str().unwrap_or("").to_owned())
            .collect();
        (statuses == ["up", "down"]).then_some(v)
    })
    .await;
    let view = match found {
        Some(v) => v,
        None => panic!(
            "the API's health view follows the worker: {}",
            s.api.http.get(&path).await.1
        ),
    };
    let verdict = &view["servers"][1]["workers"][0];
    assert_eq!(
        (verdict["worker_name"].as_str(), verdict["status"].as_str()),
        (Some("edge-1"), Some("down")),
        "{view}"
    );
    assert_eq!(verdict["last_error"], "status 500");
    assert!(verdict["failures"].as_u64().unwrap() >= 2);
    let summary = s.api.http.get("/v1/health").await.1;
    let redmine = summary
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "redmine")
        .unwrap();
    assert_eq!(
        (redmine["up"].as_u64(), redmine["down"].as_u64()),
        (Some(1), Some(1)),
        "{summary}"
    );
    let mut h2 = s.h2("redmine.beerme").await;
    for _ in 0..6 {
        let r = h2.get("redmine.beerme", "/", &[]).await;
        assert_eq!((r.status, backend_of(&r)), (200, "redmine-1".to_owned()));
    }

    // Healthy again: up after `rise` checks, and traffic alternates again.
    s.redmine[1].status.store(200, Ordering::SeqCst);
    wait_state(sick.clone(), "up").await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(backend_of(&h2.get("redmine.beerme", "/", &[]).await));
    }
    assert_eq!(seen.len(), 2, "both servers serve again");

    // Every server down: 503 at once, not a hang.
    s.redmine[0].status.store(500, Ordering::SeqCst);
    s.redmine[1].status.store(500, Ordering::SeqCst);
    wait_state(sick.clone(), "down").await;
    wait_state(healthy.clone(), "down").await;
    let started = std::time::Instant::now();
    assert_eq!(h2.get("redmine.beerme", "/", &[]).await.status, 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_with_its_hello_or_not_speaking_tls_is_closed() {
    use tokio::io::AsyncWriteExt;
    let s = seed().await;
    // Half a ClientHello, then silence: closed after the hello timeout (500 ms here).
    let mut slow = tokio::net::TcpStream::connect(s.worker.https)
        .await
        .unwrap();
    slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    closed_without_an_answer(&mut slow, 5).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(450));
    // Plain HTTP on the TLS port: closed at once.
    let mut plain = tokio::net::TcpStream::connect(s.worker.https)
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: redmine.beerme\r\n\r\n")
        .await
        .unwrap();
    closed_without_an_answer(&mut plain, 2).await;
    let metrics = s.worker.http.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains(r#"sluice_worker_connections_closed_total{reason="HelloTimeout"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_worker_connections_closed_total{reason="NotTls"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_and_says_nothing_is_left_to_the_kernel_for_the_defer_period() {
    let s = seed().await;
    let connected = std::time::Instant::now();
    let mut mute = tokio::net::TcpStream::connect(s.worker.https)
        .await
        .unwrap();
    // A client that speaks is served meanwhile. With its connection open the worker counts one
    // connection: the mute one (queued first) is still held by the kernel, not accepted.
    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let mut h1 = H1::new(tls).await;
    assert_eq!(h1.get("redmine.beerme", "/", &[]).await.status, 200);
    let metrics = s.worker.http.get("/metrics").await.1;
    let metrics = metrics.as_str().unwrap();
    assert_eq!(
        metric(metrics, "sluice_worker_open_connections"),
        Some(1.0),
        "{metrics}"
    );
    // The kernel hands it over after the defer period (1 s, its first SYN-ACK retransmission);
    // then the hello timeout (500 ms here) closes it. Without deferring: after 500 ms.
    closed_without_an_answer(&mut mute, 6).await;
    let elapsed = connected.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(1300),
        "closed {elapsed:?} after connecting"
    );
    let metrics = s.worker.http.get("/metrics").await.1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(r#"sluice_worker_connections_closed_total{reason="HelloTimeout"} 1"#),
        "{metrics}"
    );
}

/// Wait up to `secs` seconds for the worker to close `stream`, which must get no answer first.
async fn closed_without_an_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, secs: u64) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(secs), stream.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
}

/// The value of one series (name and labels exactly as rendered) in a metrics text.
fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

/// Wait until the worker counts `n` handshaken connections that have sent nothing yet (and so
/// hold no HTTP state).
async fn awaiting_first_request(s: &Seed, n: u64) {
    let line = format!("sluice_worker_connections_awaiting_first_request {n}\n");
    let seen = sluice_tests::wait_for(std::time::Duration::from_secs(5), || async {
        let metrics = s.worker.http.get("/metrics").await.1;
        metrics
            .as_str()
            .is_some_and(|m| m.contains(&line))
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "never saw {line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_its_handshake_is_served_when_it_speaks_and_closed_if_it_never_does(
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = seed().await;
    // Both handshake and then wait; the worker has set up no HTTP state for them yet.
    let mut silent = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let late = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    awaiting_first_request(&s, 2).await;
    // One speaks up after a while (within the 1.5 s header timeout) and is answered.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let mut late = H1::new(late).await;
    let reply = late.get("redmine.beerme", "/late", &[]).await;
    assert_eq!(reply.status, 200);
    awaiting_first_request(&s, 1).await;
    assert!(
        s.redmine
            .iter()
            .any(|b| b.requests().iter().any(|r| r.path == "/late")),
        "the request reached a backend"
    );
    // The other never does: closed once the header timeout has passed, without an answer.
    closed_without_an_answer(&mut silent, 5).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(1400));
    awaiting_first_request(&s, 0).await;
    // Writing to it now fails or is never answered: the connection is gone.
    let _ = silent
        .write_all(b"GET / HTTP/1.1\r\nHost: redmine.beerme\r\n\r\n")
        .await;
    let n = silent.read(&mut [0u8; 64]).await.unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_body_shorter_than_its_content_length_never_completes_upstream() {
    let s = seed().await;
    let uploaded_before: u64 = s
        .redmine
        .iter()
        .map(|b| b.uploaded.load(Ordering::SeqCst))
        .sum();
    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"h2"])
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post("https://redmine.beerme/upload")
        .header("content-length", "100")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(req, false).unwrap();
    // 10 bytes, then END_STREAM: 90 short of what the header promised.
    body.send_data(bytes::Bytes::from_static(b"0123456789"), true)
        .unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), response)
        .await
        .expect("an answer or a reset, not a hang");
    eprintln!(
        "short body answered with: {:?}",
        answer.as_ref().map(|r| r.status())
    );
    match answer {
        Ok(resp) => assert_ne!(
            resp.status(),
            200,
            "a short body is not answered as complete"
        ),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e}"),
    }
    // The backend never read a complete 100-byte body (HTTP/1.1 framing tells it the request
    // was cut short), and the worker still serves.
    let uploaded: u64 = s
        .redmine
        .iter()
        .map(|b| b.uploaded.load(Ordering::SeqCst))
        .sum();
    assert!(uploaded - uploaded_before < 100, "uploaded {uploaded}");
    let mut h2c = s.h2("redmine.beerme").await;
    assert_eq!(h2c.get("redmine.beerme", "/", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_while_a_request_is_in_flight() {
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::time::{Duration, Instant};
    let s = seed().await;
    // A worker of its own, with an idle timeout shorter than the upstream response timeout.
    let (_dir, worker) = s
        .own_worker(
            "edge-idle",
            &[
                ("SLUICE_IDLE_TIMEOUT_MS", "800"),
                ("SLUICE_RESPONSE_TIMEOUT_MS", "1500"),
            ],
        )
        .await;
    let tls = tls_connect(worker.https, "slow.beerme", s.ca.der(), &[b"h2"])
        .await
        .expect("tls");
    let (mut send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let closed = tokio::spawn(connection);
    // The backend never answers: the request is in flight for the whole response timeout,
    // longer than the idle timeout, and the connection stays open for its 504.
    let asked = Instant::now();
    let req = http::Request::get("https://slow.beerme/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 504);
    assert!(asked.elapsed() >= Duration::from_millis(1500));
    let answered = Instant::now();
    assert!(!closed.is_finished(), "closed with a request in flight");
    // Then nothing is in flight: the worker says GOAWAY after the idle timeout and closes.
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the idle connection was closed")
        .expect("connection task")
        .expect("a clean GOAWAY close");
    // The worker counts from when the answer left it (in whole milliseconds), a little before
    // the client had it: a few milliseconds' slack, not a close on the spot.
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(750), "closed after {idle:?}");
}

/// A request head read byte by byte (nothing behind it is consumed); `None` if the connection
/// ends first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// A backend that answers the first request of each connection (chunked, with a trailer) and
/// closes the connection when the next one arrives, unanswered: every reused upstream
/// connection fails before any response, the shape of a server whose keep-alive timeout ran
/// out just as the request was sent. Counts (answered, dropped).
async fn closing_backend() -> (std::net::SocketAddr, Arc<(AtomicUsize, AtomicUsize)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nfre\r\n2\r\nsh\r\n0\r\nx-checksum: abc\r\n\r\n";
                // Counted before the answer goes out, so the client never sees an answer
                // that is not counted yet.
                c.0.fetch_add(1, Ordering::SeqCst);
                if s.write_all(answer).await.is_err() {
                    return;
                }
                // The next request arrives; the connection closes without an answer.
                if s.read(&mut [0u8; 1]).await.unwrap_or(0) > 0 {
                    c.1.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, counts)
}

/// A server that reads each request head and closes the connection unanswered (one dying as
/// it accepts). Counts the heads it dropped, by method.
async fn mute_backend() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let d = dropped.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let d = d.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return; // a health check's connect
                };
                let method = String::from_utf8_lossy(&head);
                let method = method.split(' ').next().unwrap_or_default().to_owned();
                d.lock().unwrap().push(method);
            });
        }
    });
    (addr, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_a_server_closed_unanswered_goes_to_another_server() {
    let s = seed().await;
    let (mute, dropped) = mute_backend().await;
    let answering = EchoBackend::start("answering").await;
    // Weight 3 to 1: the balancer's next pick after the mute server is, more often than not,
    // the mute server again, so a request sent again reaches the other server only because
    // the retry avoids the server that did not answer.
    s.serve(
        "mute.beerme",
        json!({"name": "half-mute", "protocol": "http", "servers": [
            {"address": mute.to_string(), "weight": 3},
            {"address": answering.addr.to_string(), "weight": 1}]}),
    )
    .await;

    // Each try of the mute server is on a fresh connection (nothing is ever pooled there).
    let mut h1 = s.h1("mute.beerme").await;
    for i in 0..6 {
        let r = h1.get("mute.beerme", "/", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    let gets = |d: &Vec<String>| d.iter().filter(|m| *m == "GET").count();
    assert!(
        gets(&dropped.lock().unwrap()) >= 3,
        "most GETs tried the mute server first: {:?}",
        dropped.lock().unwrap()
    );
    assert_eq!(answering.requests().len(), 6, "each GET answered once");

    // A POST is not idempotent: the first that reaches the mute server fails, unsent again.
    let tried_post = || dropped.lock().unwrap().iter().any(|m| m == "POST");
    let mut statuses = Vec::new();
    while !tried_post() && statuses.len() < 8 {
        statuses.push(h1.send("POST", "mute.beerme", "/", &[]).await.status);
    }
    let (last, before) = statuses.split_last().expect("a POST was sent");
    assert_eq!(*last, 502, "{statuses:?}");
    assert!(before.iter().all(|s| *s == 200), "{statuses:?}");
    let posts = answering
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, before.len(), "the failed POST was not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_kept_alive_connection_the_backend_just_closed_is_sent_again() {
    let s = seed().await;
    let (addr, counts) = closing_backend().await;
    s.serve(
        "closing.beerme",
        json!({"name": "closing", "protocol": "http", "servers": [{"address": addr.to_string()}]}),
    )
    .await;

    let mut h1 = s.h1("closing.beerme").await;
    let mut h2 = s.h2("closing.beerme").await;
    for i in 0..6 {
        let r = if i % 2 == 0 {
            h1.get("closing.beerme", "/", &[]).await
        } else {
            h2.get("closing.beerme", "/", &[]).await
        };
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        assert_eq!(r.body, "fresh", "request {i}: the chunked body, decoded");
    }
    assert_eq!(
        counts.0.load(Ordering::SeqCst),
        6,
        "each request answered once"
    );
    // Requests 2-6 each found the previous connection kept alive, sent on it, got no answer
    // and were sent again on a new one. (The last close may still be in flight.)
    let dropped = sluice_tests::wait_for(std::time::Duration::from_secs(5), || async {
        let n = counts.1.load(Ordering::SeqCst);
        (n >= 5).then_some(n)
    })
    .await;
    assert_eq!(dropped, Some(5), "every reused connection was tried first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways_between_http2_or_http1_clients_and_an_http1_backend() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use sluice_tests::net::BoxBody;
    let s = seed().await;
    let empty = || -> BoxBody { http_body_util::Empty::new().map_err(|n| match n {}).boxed() };
    // A body with a trailer, declared in `Trailer` as RFC 9110 6.6.2 asks of senders (an
    // HTTP/1.1 hop carries only declared trailer fields).
    let with_trailer = |value: &'static str| -> BoxBody {
        let mut fields = http::HeaderMap::new();
        fields.insert("x-client-sum", http::HeaderValue::from_static(value));
        let frames = [
            Ok(Frame::data(Bytes::from_static(b"payload"))),
            Ok(Frame::trailers(fields)),
        ];
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    };
    let checksum = |trailers: Option<&http::HeaderMap>| {
        trailers
            .and_then(|t| t.get("x-checksum"))
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"h2"])
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake::<_, _, BoxBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let tls = tls_connect(s.worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake::<_, BoxBody>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);

    for (i, (client, method)) in [("h2", "GET"), ("h2", "POST"), ("h1", "GET"), ("h1", "POST")]
        .into_iter()
        .enumerate()
    {
        let case = format!("{client} {method}");
        let value: &'static str = ["1", "2", "3", "4"][i];
        let mut req = http::Request::builder().method(method);
        req = if client == "h2" {
            req.uri("https://redmine.beerme/trailers")
        } else {
            // An HTTP/1.1 client gets trailers only when it says it takes them.
            req.uri("/trailers")
                .header("host", "redmine.beerme")
                .header("te", "trailers")
        };
        let req = if method == "POST" {
            req.header("trailer", "x-client-sum")
                .body(with_trailer(value))
        } else {
            req.body(empty())
        }
        .unwrap();
        let resp = if client == "h2" {
            h2.ready().await.unwrap();
            h2.send_request(req).await
        } else {
            h1.ready().await.unwrap();
            h1.send_request(req).await
        }
        .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(resp.status(), 200, "{case}");
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(
            checksum(got.trailers()).as_deref(),
            Some("abc"),
            "{case}: the backend's trailer reached the client"
        );
        assert_eq!(got.to_bytes(), "ok", "{case}");
        let seen = s.seen();
        let reached = seen
            .iter()
            .rev()
            .find(|r| r.path == "/trailers" && r.method == method)
            .unwrap();
        assert_eq!(reached.header("te"), Some("trailers"), "{case}");
        assert_eq!(
            reached.header("connection"),
            Some("te"),
            "{case}: TE is named in Connection (RFC 9110 10.1.4)"
        );
        if method == "POST" {
            let reached = s
                .redmine
                .iter()
                .flat_map(|b| b.trailers.lock().unwrap().clone())
                .any(|(k, v)| k == "x-client-sum" && v == value);
            assert!(reached, "{case}: the client's trailer reached the backend");
        }
    }
}

/// Read one HTTP/1.1 response with a `Content-Length` from a raw stream; returns its status.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if got.len() >= end + 4 + length {
                return head[9..12].parse().expect("a status");
            }
        }
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_waits_the_idle_timeout_and_a_begun_head_only_the_header_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = seed().await;
    let (_dir, worker) = s
        .own_worker(
            "edge-keepalive",
            &[
                ("SLUICE_HEADER_TIMEOUT_MS", "500"),
                ("SLUICE_IDLE_TIMEOUT_MS", "1500"),
            ],
        )
        .await;
    let (header, idle) = (Duration::from_millis(500), Duration::from_millis(1500));
    let get = b"GET / HTTP/1.1\r\nHost: redmine.beerme\r\n\r\n";
    let connect = || tls_connect(worker.https, "redmine.beerme", s.ca.der(), &[b"http/1.1"]);
    // Waits until the worker closes the connection; returns how long that took.
    let closed = |mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
        let from = Instant::now();
        closed_without_an_answer(&mut tls, 5).await;
        from.elapsed()
    };

    let mut tls = connect().await.unwrap();
    tls.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut tls).await, 200);
    // Quiet for twice the header timeout, within the idle timeout: the connection is kept.
    // (The scenario is a span of time; the test waits it out.)
    tokio::time::sleep(header * 2).await;
    tls.write_all(get).await.unwrap();
    assert_eq!(
        read_response(&mut tls).await,
        200,
        "kept alive past the header timeout"
    );
    // A head begun and left incomplete: closed after the header timeout, not the idle one.
    tls.write_all(b"GET / HTTP/1.1\r\nHost: redm")
        .await
        .unwrap();
    let waited = closed(tls).await;
    assert!(
        waited >= header - Duration::from_millis(100) && waited < idle,
        "an incomplete head closed after {waited:?}"
    );
    // Served once, then silent: closed after the idle timeout.
    let mut tls = connect().await.unwrap();
    tls.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut tls).await, 200);
    let waited = closed(tls).await;
    assert!(
        waited >= idle - Duration::from_millis(100),
        "an idle connection closed after {waited:?}"
    );
    // A WebSocket is no longer HTTP/1.1: a pause longer than both timeouts does not end it.
    let tls = tls_connect(worker.https, "ws.beerme", s.ca.der(), &[b"http/1.1"])
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://ws.beerme/chat", tls)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    for text in ["before", "after"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
        if text == "before" {
            tokio::time::sleep(idle + header).await;
        }
    }
}
