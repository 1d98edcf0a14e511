//! Harness for the end-to-end tests: start real `sluice-api` and worker processes on free
//! loopback ports, talk to them over HTTP, wait on probes (never on fixed sleeps), and kill
//! every process when a test ends, however it ends.

pub mod h2;
pub mod net;
pub mod tunnel;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const ADMIN_TOKEN: &str = "e2e-admin-token";
pub const WORKER_TOKEN: &str = "e2e-worker-token";

/// The `sluice-api` program to run: `$SLUICE_BIN` when set (the benchmarks point it at the
/// release build), else this package's `sluice-e2e` binary, which cargo builds before running
/// the package's integration tests.
pub fn sluice_api_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let bin = dir.join("sluice-e2e");
    assert!(
        bin.exists(),
        "{} is missing: run the tests through cargo",
        bin.display()
    );
    bin
}

/// A child process, killed (SIGKILL) when dropped; its stderr is kept for failure messages.
pub struct Proc {
    child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
    what: String,
}

impl Proc {
    /// Start `sluice-api` with `args` and wait for the log line holding `key=<addr>`. Standard
    /// output lines are kept in the log too.
    pub fn spawn(
        what: &str,
        args: &[String],
        envs: &[(&str, &str)],
        key: &str,
        marker: &str,
    ) -> (Proc, SocketAddr) {
        let mut cmd = Command::new(sluice_api_bin());
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting sluice-api");
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let out_sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out_sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let (key, marker) = (format!("{key}="), marker.to_owned());
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                if !sent && line.contains(&marker) {
                    if let Some(addr) = line
                        .split(&key)
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                    {
                        if let Ok(addr) = addr.parse::<SocketAddr>() {
                            let _ = tx.send(addr);
                            sent = true;
                        }
                    }
                }
            }
        });
        let proc = Proc {
            child: Some(child),
            log,
            what: what.to_owned(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => (proc, addr),
            Err(_) => panic!(
                "{what} did not report its address; log:\n{}",
                proc.log_text()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The process's peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc status")
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc status")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Does the log hold a line containing `needle`?
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.what, self.log_text());
        }
        // SIGTERM first, so an API stops its managed workers instead of orphaning them; SIGKILL
        // if it has not exited within a few seconds.
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `sluice-api`.
pub struct Api {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub http: Http,
}

impl Api {
    /// Start an API on `listen` (use port 0 for a free one) with `extra` flags.
    pub fn start(data_dir: &Path, listen: &str, extra: &[&str]) -> Api {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (proc, addr) = Proc::spawn(
            "sluice-api",
            &args,
            &[
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_WORKER_TOKEN", WORKER_TOKEN),
            ],
            "addr",
            "sluice-api listening",
        );
        Api {
            proc,
            addr,
            data_dir: data_dir.to_path_buf(),
            http: Http::new(format!("http://{addr}"), Some(ADMIN_TOKEN)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The newest committed version.
    /// POST `body` to `path` as the admin, expect 201, and return the new object's id.
    pub async fn create(&self, path: &str, body: Value) -> String {
        let (status, reply) = self.http.post(path, body).await;
        assert_eq!(status, 201, "POST {path}: {reply}");
        reply["id"].as_str().expect("an id").to_owned()
    }

    pub async fn version(&self) -> u64 {
        self.http.get("/v1/config").await.1["version"]
            .as_u64()
            .expect("version")
    }

    pub async fn workers(&self) -> Vec<Value> {
        self.http
            .get("/v1/workers")
            .await
            .1
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until `count` connected workers all applied `version` (or newer).
    pub async fn wait_applied(&self, count: usize, version: u64) -> Vec<Value> {
        let found = wait_for(Duration::from_secs(30), || async {
            let ws: Vec<Value> = self
                .workers()
                .await
                .into_iter()
                .filter(|w| {
                    w["connected"] == true && w["applied_version"].as_u64().unwrap_or(0) >= version
                })
                .collect();
            (ws.len() >= count).then_some(ws)
        })
        .await;
        match found {
            Some(ws) => ws,
            None => panic!(
                "{count} workers did not apply version {version}: {:?}",
                self.workers().await
            ),
        }
    }
}

/// A running standalone worker (`sluice-api worker`, the same code as `sluice-worker`).
pub struct Worker {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub https: SocketAddr,
    /// The plain HTTP (redirect) listener.
    pub plain: SocketAddr,
    pub http: Http,
}

impl Worker {
    pub fn start(api_url: &str, state_dir: &Path, name: &str, token: &str) -> Worker {
        Worker::start_with(api_url, state_dir, name, token, &[])
    }

    /// Start with extra environment (worker flags as `SLUICE_*` variables).
    pub fn start_with(
        api_url: &str,
        state_dir: &Path,
        name: &str,
        token: &str,
        env: &[(&str, &str)],
    ) -> Worker {
        let args: Vec<String> = [
            "worker",
            "--api",
            api_url,
            "--name",
            name,
            "--https",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--state-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([state_dir.display().to_string()])
        .collect();
        let (proc, admin) = Proc::spawn(
            name,
            &args,
            &[&[("SLUICE_WORKER_TOKEN", token)][..], env].concat(),
            "admin",
            "sluice-worker started",
        );
        let logged = |key: &str| -> SocketAddr {
            proc.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("sluice-worker started"))
                .find_map(|l| {
                    l.split(key)
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                        .and_then(|a| a.parse().ok())
                })
                .expect("worker logged its addresses")
        };
        let (https, plain) = (logged(" https="), logged(" http="));
        Worker {
            proc,
            admin,
            https,
            plain,
            http: Http::new(format!("http://{admin}"), None),
        }
    }

    pub async fn status(&self) -> Value {
        self.http.get("/status").await.1
    }

    /// Wait until this worker serves `version`.
    pub async fn wait_version(&self, version: u64) -> Value {
        wait_for(Duration::from_secs(30), || async {
            let s = self.status().await;
            (s["applied_version"].as_u64() == Some(version)).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("worker did not reach version {version}"))
    }
}

/// A small HTTP/1.1 client with an optional bearer token.
#[derive(Clone)]
pub struct Http {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(base: String, token: Option<&str>) -> Http {
        Http {
            base,
            token: token.map(str::to_owned),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Send a request; `(0, Null)` when the server cannot be reached.
    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let Ok(resp) = self
            .client
            .request(req.body(Full::new(body)).expect("request"))
            .await
        else {
            return (0, Value::Null);
        };
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "a response leaked a private key"
        );
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::String(text.into_owned())),
        )
    }

    /// Send with an explicit `Host` header; returns the status and the `Location` header.
    pub async fn send_with_host(
        &self,
        method: &str,
        path: &str,
        host: &str,
    ) -> (u16, Option<String>) {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        match self.client.request(req).await {
            Ok(resp) => (
                resp.status().as_u16(),
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            ),
            Err(_) => (0, None),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, Some(body)).await
    }
}

/// Poll `probe` every 20 ms until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A self-signed certificate and key (PEM) for these names.
pub fn self_signed(sans: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    (
        params.self_signed(&key).expect("cert").pem(),
        key.serialize_pem(),
    )
}
