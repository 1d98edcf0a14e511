//! The snapshot channel with real processes: push on commit, Ack/Nack and rollout, serving
//! through API outages from memory and from the state directory, managed workers, bad tokens.

use std::time::Duration;

use serde_json::json;
use sluice_tests::{self_signed, wait_for, Api, Worker, WORKER_TOKEN};

/// Short heartbeats so disconnections show quickly.
const HEARTBEAT: &[&str] = &["--workers", "0", "--heartbeat-ms", "200"];

async fn create_backend(api: &Api, name: &str) -> u64 {
    let (status, body) = api
        .http
        .post(
            "/v1/backends",
            json!({"name": name, "protocol": "http", "servers": [{"address": "127.0.0.1:9"}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    api.version().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_pushed_to_two_workers_and_rollout_shows_both_applied() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", HEARTBEAT);
    let w1 = Worker::start(&api.url(), &dir.path().join("w1"), "edge-1", WORKER_TOKEN);
    let w2 = Worker::start(&api.url(), &dir.path().join("w2"), "edge-2", WORKER_TOKEN);
    api.wait_applied(2, 1).await;

    let v = create_backend(&api, "redmine").await;
    assert_eq!(v, 2);
    for w in [&w1, &w2] {
        let s = w.wait_version(v).await;
        assert_eq!(s["api_connected"], true);
        assert_eq!(s["source"], "api");
    }
    api.wait_applied(2, v).await;
    let (status, rollout) = api
        .http
        .get(&format!("/v1/config/versions/{v}/rollout"))
        .await;
    assert_eq!(status, 200);
    let workers = rollout["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert_eq!(w["status"], "applied", "{rollout}");
        assert!(w["at"].is_string());
        assert_eq!(w["managed"], false);
    }
    // The worker's readiness and metrics follow.
    assert_eq!(w1.http.get("/readyz").await.0, 200);
    let metrics = w1.http.get("/metrics").await.1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("sluice_worker_config_version 2"),
        "{metrics}"
    );
}

/// A TLS backend for `app.example` with its own CA, and a passthrough host routing to it.
async fn passthrough_app(api: &Api) -> (sluice_tests::net::TestCa, sluice_tests::net::TlsBackend) {
    let ca = sluice_tests::net::TestCa::new();
    let (chain, key) = ca.leaf(&["app.example"]);
    let backend = sluice_tests::net::TlsBackend::start("app", &chain, &key, false).await;
    let (status, b) = api
        .http
        .post("/v1/backends", json!({"name": "app", "protocol": "tcp", "servers": [{"address": backend.addr.to_string()}]}))
        .await;
    assert_eq!(status, 201, "{b}");
    let (status, h) = api
        .http
        .post(
            "/v1/hosts",
            json!({"hostname": "app.example", "mode": "passthrough", "backend_id": b["id"]}),
        )
        .await;
    assert_eq!(status, 201, "{h}");
    (ca, backend)
}

/// A TLS request for `app.example` through a worker, passed through to the test backend.
async fn request_through(worker: &Worker, ca: &sluice_tests::net::TestCa) -> u16 {
    use sluice_tests::net::{tls_connect, H1};
    match tls_connect(worker.https, "app.example", ca.der(), &[b"http/1.1"]).await {
        Ok(tls) => H1::new(tls).await.get("app.example", "/", &[]).await.status,
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_outlive_the_api_and_serve_from_their_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let api_dir = dir.path().join("api");
    let mut api = Api::start(&api_dir, "127.0.0.1:0", HEARTBEAT);
    let port = api.addr.port();
    let w1 = Worker::start(&api.url(), &dir.path().join("w1"), "edge-1", WORKER_TOKEN);
    let w2 = Worker::start(&api.url(), &dir.path().join("w2"), "edge-2", WORKER_TOKEN);
    let (ca, _backend) = passthrough_app(&api).await;
    let v = api.version().await;
    api.wait_applied(2, v).await;
    // Workers settled on a version get the next change as a delta (and journal it: the
    // restart below replays the journal).
    let v = create_backend(&api, "extra").await;
    api.wait_applied(2, v).await;
    let metrics = w1.http.get("/metrics").await.1;
    let deltas: u64 = metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("sluice_worker_snapshot_deltas_applied_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(deltas >= 1, "changes arrived as deltas: {metrics}");

    // kill -9 the API: both workers notice and keep serving their snapshot.
    api.proc.kill9();
    for w in [&w1, &w2] {
        let s = wait_for(Duration::from_secs(10), || async {
            let s = w.status().await;
            (s["api_connected"] == false).then_some(s)
        })
        .await
        .expect("worker noticed the API is gone");
        assert_eq!(s["applied_version"], v);
        assert_eq!(w.http.get("/readyz").await.0, 200);
        assert_eq!(
            request_through(w, &ca).await,
            200,
            "traffic flows with the API gone"
        );
    }

    // A worker restarted while the API is down serves from its state directory.
    let w1_dir = dir.path().join("w1");
    drop(w1);
    let w1 = Worker::start(
        &format!("http://127.0.0.1:{port}"),
        &w1_dir,
        "edge-1",
        WORKER_TOKEN,
    );
    let s = w1.status().await;
    assert_eq!(s["applied_version"], v, "{s}");
    assert_eq!(s["source"], "state_dir");
    assert_eq!(w1.http.get("/readyz").await.0, 200);
    assert_eq!(
        request_through(&w1, &ca).await,
        200,
        "serves from its state directory"
    );

    // The API comes back on the same address: both reconnect and converge on a newer version.
    let api = Api::start(&api_dir, &format!("127.0.0.1:{port}"), HEARTBEAT);
    api.wait_applied(2, v).await;
    let v2 = create_backend(&api, "odoo").await;
    assert_eq!(v2, v + 1);
    w1.wait_version(v2).await;
    w2.wait_version(v2).await;
    assert_eq!(w1.status().await["source"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_snapshot_is_recorded_and_not_resent_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", HEARTBEAT);
    let w = Worker::start(&api.url(), &dir.path().join("w"), "edge-1", WORKER_TOKEN);
    let (cert, key) = self_signed(&["a.example"]);
    let (status, _) = api
        .http
        .post(
            "/v1/certificates",
            json!({"name": "a", "cert_pem": cert, "key_pem": key}),
        )
        .await;
    assert_eq!(status, 201);
    let good = api.version().await;
    w.wait_version(good).await;

    // Corrupt the stored key behind the API's back: the next snapshot carries a key that does
    // not match its certificate's key_sha256, which the worker's validation refuses.
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        api.data_dir.join("sluice.db").display()
    ))
    .await
    .unwrap();
    let (_, other_key) = self_signed(&["a.example"]);
    let original: String = sqlx::query_scalar("SELECT key_pem FROM private_keys")
        .fetch_one(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE private_keys SET key_pem = ?")
        .bind(&other_key)
        .execute(&db)
        .await
        .unwrap();
    let bad = create_backend(&api, "b1").await;

    let rollout = wait_for(Duration::from_secs(10), || async {
        let r = api
            .http
            .get(&format!("/v1/config/versions/{bad}/rollout"))
            .await
            .1;
        (r["workers"][0]["status"] == "rejected").then_some(r)
    })
    .await
    .expect("the worker's Nack is recorded");
    let error = rollout["workers"][0]["error"].as_str().unwrap();
    assert!(error.contains("key_pem"), "{error}");
    let worker = &api.workers().await[0];
    assert_eq!(worker["last_error_version"], bad);
    assert_eq!(worker["applied_version"], good);
    assert_eq!(
        w.status().await["applied_version"],
        good,
        "the old version keeps serving"
    );

    // Several heartbeats later the worker has still been sent that version only once.
    let (_, first) = w.http.get("/metrics").await;
    assert!(
        first
            .as_str()
            .unwrap()
            .contains("sluice_worker_snapshots_rejected_total 1"),
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, later) = w.http.get("/metrics").await;
    assert!(
        later
            .as_str()
            .unwrap()
            .contains("sluice_worker_snapshots_rejected_total 1"),
        "resent: {later}"
    );

    // Repaired, the next version goes through.
    sqlx::query("UPDATE private_keys SET key_pem = ?")
        .bind(&original)
        .execute(&db)
        .await
        .unwrap();
    let fixed = create_backend(&api, "b2").await;
    w.wait_version(fixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_wrong_token_is_refused_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", HEARTBEAT);
    let w = Worker::start(
        &api.url(),
        &dir.path().join("w"),
        "intruder",
        "not-the-token",
    );
    let logged = wait_for(Duration::from_secs(10), || async {
        api.proc.logged("worker channel refused").then_some(())
    })
    .await;
    assert!(logged.is_some(), "refusal logged with the peer address");
    assert!(
        api.proc.logged("peer=Some(127.0.0.1:"),
        "{}",
        api.proc.log_text()
    );
    assert!(api.workers().await.is_empty());
    assert_eq!(w.http.get("/readyz").await.0, 503);
    assert_eq!(w.status().await["api_connected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_workers_are_restarted_replaced_and_stopped_with_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut api = Api::start(
        &dir.path().join("api"),
        "127.0.0.1:0",
        &[
            "--workers",
            "2",
            "--heartbeat-ms",
            "200",
            "--worker-https",
            "127.0.0.1:0",
            "--worker-http",
            "127.0.0.1:0",
        ],
    );
    let workers = api.wait_applied(2, 1).await;
    assert!(workers.iter().all(|w| w["managed"] == true));

    // SIGKILL one managed worker: it comes back (same id, same state) and converges.
    let victim = workers[0]["id"].as_str().unwrap().to_owned();
    let admin = workers[0]["admin_address"].as_str().unwrap().to_owned();
    let status = sluice_tests::Http::new(format!("http://{admin}"), None)
        .get("/status")
        .await
        .1;
    let pid = status["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let v = create_backend(&api, "after-kill").await;
    let back = api.wait_applied(2, v).await;
    assert!(
        back.iter().any(|w| w["id"] == victim.as_str()),
        "restarted with the same id"
    );

    // Replace the other one: the new one has applied the current version before the old stops.
    let other = workers[1]["id"].as_str().unwrap();
    let (status, replaced) = api
        .http
        .post(&format!("/v1/workers/{other}/restart"), json!(null))
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["replaced"], other);
    assert_eq!(replaced["worker"]["applied_version"], v);
    assert_eq!(replaced["worker"]["connected"], true);
    let ids: Vec<String> = api
        .workers()
        .await
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !ids.contains(&other.to_owned()),
        "the replaced worker is forgotten"
    );

    // Remote workers cannot be restarted by the API; unknown ones are 404.
    let (status, _) = api
        .http
        .post(
            "/v1/workers/00000000-0000-0000-0000-000000000001/restart",
            json!(null),
        )
        .await;
    assert_eq!(status, 404);

    // Stopping the API stops its workers, and it exits 0.
    let pids: Vec<i32> = {
        let mut pids = Vec::new();
        for w in api.workers().await {
            let admin = w["admin_address"].as_str().unwrap().to_owned();
            let s = sluice_tests::Http::new(format!("http://{admin}"), None)
                .get("/status")
                .await
                .1;
            pids.push(s["pid"].as_u64().unwrap() as i32);
        }
        pids
    };
    let exit = api.proc.terminate().unwrap();
    assert!(exit.success(), "{exit:?}");
    for pid in pids {
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
        assert!(gone, "managed worker {pid} outlived the API");
    }
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn migrate_req_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_managed_workers_refuses_no_connection() {
    use sluice_tests::net::{tls_connect, H1};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let https: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let api = Api::start(
        &dir.path().join("api"),
        "127.0.0.1:0",
        &[
            "--workers",
            "2",
            "--heartbeat-ms",
            "200",
            "--worker-https",
            &https.to_string(),
            "--worker-http",
            &http,
        ],
    );
    let (ca, _backend) = passthrough_app(&api).await;
    let v = api.version().await;
    let workers = api.wait_applied(2, v).await;

    // A steady stream of new connections, each a full TLS exchange through a worker.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failed, root) = (stop.clone(), ok.clone(), failed.clone(), ca.der());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let good = match tls_connect(https, "app.example", root.clone(), &[b"http/1.1"])
                    .await
                {
                    Ok(tls) => H1::new(tls).await.get("app.example", "/", &[]).await.status == 200,
                    Err(_) => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed)
                } else {
                    failed.fetch_add(1, Ordering::Relaxed)
                };
            }
        }));
    }
    for w in &workers {
        let id = w["id"].as_str().unwrap();
        let (status, replaced) = api
            .http
            .post(&format!("/v1/workers/{id}/restart"), json!(null))
            .await;
        assert_eq!(status, 200, "{replaced}");
    }
    let before = ok.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(10), || async {
        (ok.load(Ordering::Relaxed) > before + 20).then_some(())
    })
    .await
    .expect("traffic flows through the replacements");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 20, "only {ok} connections served");
    if migrate_req_on() {
        assert_eq!(
            failed,
            0,
            "{failed} of {} connections failed during the rolling restart",
            ok + failed
        );
    } else {
        // Without net.ipv4.tcp_migrate_req the kernel resets connections queued on a closing
        // listener; .ci/run turns it on. Report what happened here.
        eprintln!(
            "tcp_migrate_req is off: {failed} of {} connections failed",
            ok + failed
        );
    }
    let now: Vec<String> = api
        .workers()
        .await
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(now.len(), 2);
    assert!(
        workers
            .iter()
            .all(|w| !now.contains(&w["id"].as_str().unwrap().to_owned())),
        "both replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hosts_and_a_thousand_certificates_reach_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", HEARTBEAT);
    let w1 = Worker::start(&api.url(), &dir.path().join("w1"), "edge-1", WORKER_TOKEN);
    let w2 = Worker::start(&api.url(), &dir.path().join("w2"), "edge-2", WORKER_TOKEN);
    let certificates: Vec<_> = (0..1000)
        .map(|i| {
            let (cert, key) = self_signed(&[&format!("*.s{i}.example")]);
            json!({"name": format!("c{i}"), "cert_pem": cert, "key_pem": key})
        })
        .collect();
    let backends: Vec<_> = (0..100)
        .map(|i| json!({"name": format!("b{i}"), "protocol": "http", "servers": [{"address": format!("127.1.0.{}:9", i + 1)}]}))
        .collect();
    let hosts: Vec<_> = (0..10_000)
        .map(|i| {
            json!({"hostname": format!("h{i}.s{}.example", i % 1000), "mode": "terminate",
                   "backend": format!("b{}", i % 100), "certificate": format!("c{}", i % 1000)})
        })
        .collect();
    let doc = json!({"certificates": certificates, "backends": backends, "hosts": hosts});
    let (status, applied) = api.http.send("PUT", "/v1/config", Some(doc)).await;
    assert_eq!(status, 200, "{applied}");
    let v = applied["version"].as_u64().unwrap();
    for w in [&w1, &w2] {
        let s = w.wait_version(v).await;
        assert_eq!(s["hosts"], 10_000);
    }
    api.wait_applied(2, v).await;
}

/// A change that deletes a certificate (or gives one a new key) leaves the worker's state
/// directory with only the keys in force: the delta is written as one full snapshot at once,
/// where other deltas are journaled beside the last snapshot until 64 of them pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_certificates_key_leaves_the_workers_state_dir_with_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", HEARTBEAT);
    let state = dir.path().join("w");
    let w = Worker::start(&api.url(), &state, "edge-1", WORKER_TOKEN);
    let add = |name: &'static str| {
        let api = &api;
        async move {
            let (cert, key) = self_signed(&[&format!("{name}.example")]);
            let body = json!({"name": name, "cert_pem": cert, "key_pem": key});
            let (status, out) = api.http.post("/v1/certificates", body).await;
            assert_eq!(status, 201, "{out}");
            (out["id"].as_str().unwrap().to_owned(), key)
        }
    };
    let stored = || {
        let journal = std::fs::read_dir(&state)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("delta-")
            })
            .count();
        let snapshot = sluice_worker::state::StateDir::open(&state)
            .unwrap()
            .load()
            .unwrap();
        (journal, snapshot)
    };
    let (a, _) = add("a").await;
    w.wait_version(api.version().await).await;
    // The next change reaches the settled worker as a delta, journaled.
    let (_, key_b) = add("b").await;
    let v = api.version().await;
    w.wait_version(v).await;
    let journaled = wait_for(Duration::from_secs(10), || async {
        (stored().0 == 1).then_some(())
    })
    .await;
    assert!(journaled.is_some(), "the delta adding `b` was journaled");

    let (status, _) = api
        .http
        .send("DELETE", &format!("/v1/certificates/{a}"), None)
        .await;
    assert_eq!(status, 204);
    let v = api.version().await;
    w.wait_version(v).await;
    let snapshot = wait_for(Duration::from_secs(10), || async {
        match stored() {
            (0, Some(s)) if s.version.get() == v => Some(s),
            _ => None,
        }
    })
    .await
    .expect("one full snapshot of the new version and no journal");
    let certificates = &snapshot.config.certificates;
    assert_eq!(certificates.len(), 1, "{certificates:?}");
    assert_eq!(certificates[0].name, "b");
    assert_eq!(certificates[0].key_pem.as_deref(), Some(key_b.as_str()));
}
