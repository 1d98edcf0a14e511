//! Shared helpers for the handler tests: a fresh database per test, requests through the
//! router without a socket, and certificates made with rcgen.

#![allow(dead_code)]

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sluice_api::auth::Token;
use sluice_api::db::Db;
use sluice_api::AppState;
use tower::ServiceExt;

pub const TOKEN: &str = "test-admin-token";

/// One API over a fresh database in a temporary directory.
pub struct TestApi {
    pub state: AppState,
    _dir: Option<tempfile::TempDir>,
}

/// A response, decoded.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The `field` of every entry of a problem's `errors`.
    pub fn fields(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["field"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .expect("response has an id")
            .to_owned()
    }

    /// Assert the status and that a problem names `field`.
    pub fn assert_problem(&self, status: u16, field: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.header("content-type"), "application/problem+json");
        assert_eq!(self.body["status"], status);
        if !field.is_empty() {
            assert!(
                self.fields().iter().any(|f| f == field),
                "expected field `{field}` in {:?}: {}",
                self.fields(),
                self.body
            );
        }
    }
}

impl TestApi {
    pub async fn new() -> TestApi {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        sluice_api::commit::ensure_initial_version(&db)
            .await
            .unwrap();
        let state = AppState::new(db, Token::new(TOKEN), Token::new("worker"));
        TestApi {
            state,
            _dir: Some(dir),
        }
    }

    /// The directory that holds the database files.
    pub fn dir(&self) -> &std::path::Path {
        self._dir
            .as_ref()
            .expect("the first handle owns the directory")
            .path()
    }

    /// Another handle on the same API (the first one keeps the directory alive).
    pub fn wrap(state: AppState) -> TestApi {
        TestApi { state, _dir: None }
    }

    /// Send a raw request; every response body is checked for private keys.
    pub async fn raw(&self, req: Request<Body>) -> Reply {
        let resp = sluice_api::app(self.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("PRIVATE KEY"),
            "a response leaked a private key: {text}"
        );
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(text.into_owned()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.call_with(method, path, body, &[]).await
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        self.raw(req.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None).await
    }

    pub async fn version(&self) -> u64 {
        self.get("/v1/config").await.body["version"]
            .as_u64()
            .unwrap()
    }

    /// Create the seed scenario; returns (certificate, redmine backend, odoo backend) ids.
    pub async fn seed(&self) -> (String, String, String) {
        let cert = self
            .post(
                "/v1/certificates",
                cert_body("beerme", &["*.beerme", "redmine.beerme", "odoo.beerme"]),
            )
            .await;
        assert_eq!(cert.status, StatusCode::CREATED, "{}", cert.body);
        let redmine = self
            .post(
                "/v1/backends",
                json!({"name": "redmine", "protocol": "http",
            "servers": [{"address": "10.4.1.11:30080"}, {"address": "10.4.1.12:30080"}]}),
            )
            .await;
        assert_eq!(redmine.status, StatusCode::CREATED, "{}", redmine.body);
        let odoo = self
            .post(
                "/v1/backends",
                json!({"name": "odoo", "protocol": "tcp",
            "servers": [{"address": "10.4.1.11:32036"}, {"address": "10.4.1.12:32036"}]}),
            )
            .await;
        assert_eq!(odoo.status, StatusCode::CREATED, "{}", odoo.body);
        (cert.id(), redmine.id(), odoo.id())
    }
}

/// A self-signed certificate and key (PEM) for these names.
pub fn self_signed(sans: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// A create-certificate body.
pub fn cert_body(name: &str, sans: &[&str]) -> Value {
    let (cert, key) = self_signed(sans);
    json!({"name": name, "cert_pem": cert, "key_pem": key})
}
