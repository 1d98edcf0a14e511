//! Durability: `kill -9` a real `sluice-api` process in the middle of a write loop, restart it,
//! and check that the database is intact and every acknowledged write is there.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TOKEN: &str = "crash-test-token";

/// A child process killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `sluice-api` on a free port; returns the child and its address (read from its log).
fn start(data_dir: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-api"))
        .args(["--listen", "127.0.0.1:0", "--workers", "0", "--data-dir"])
        .arg(data_dir)
        .env("SLUICE_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(addr) = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                {
                    if line.contains("listening") {
                        let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                        sent = true;
                    }
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("sluice-api reported its address");
    (Proc(child), addr)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn request(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Option<(u16, String)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&bytes).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let (child, addr) = start(dir.path());

    // Four concurrent writers create backends until the process dies under them.
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let name = format!("w{w}-{i}");
                let body = format!(r#"{{"name":"{name}","protocol":"http","servers":[{{"address":"127.0.{w}.{}:9"}}]}}"#, i % 250 + 1);
                match request(&client, addr, "POST", "/v1/backends", Some(body)).await {
                    Some((201, _)) => acked.push(name),
                    Some((status, body)) => panic!("write {name} answered {status}: {body}"),
                    None => break, // the process is gone
                }
            }
            acked
        }));
    }
    // Let a good number of writes be acknowledged, then kill -9 while writes are in flight.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, body) = request(&client, addr, "GET", "/v1/config", None)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["version"].as_u64().unwrap() > 150 {
            break;
        }
    }
    drop(child); // SIGKILL
    let mut acked = BTreeSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    // Over 150 versions were committed; up to one write per writer was committed but still
    // unanswered when the process died, so at least 146 were acknowledged.
    assert!(
        acked.len() >= 146,
        "only {} writes acknowledged",
        acked.len()
    );

    let (child, addr) = start(dir.path());
    let (status, body) = request(&client, addr, "GET", "/v1/backends", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let stored: BTreeSet<String> = serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // Each stored backend is exactly one version after the initial one: none half-applied.
    let (_, body) = request(&client, addr, "GET", "/v1/config", None)
        .await
        .unwrap();
    let version = serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"]
        .as_u64()
        .unwrap();
    assert_eq!(version, 1 + stored.len() as u64);
    drop(child);

    let db = sluice_api::db::Db::open(&dir.path().join("sluice.db"))
        .await
        .unwrap();
    assert_eq!(db.integrity_check().await.unwrap(), "ok");
}
