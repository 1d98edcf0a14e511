//! `GET /v1/config/export` and `PUT /v1/config`: round trips, idempotence, one version per
//! document, every problem reported with its JSON path, dry runs, If-Match, and 10,000 hosts.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{self_signed, TestApi, TOKEN};
use serde_json::{json, Value};

fn doc(cert: &(String, String)) -> Value {
    json!({
        "certificates": [{"name": "beerme", "cert_pem": cert.0, "key_pem": cert.1}],
        "backends": [
            {"name": "redmine", "protocol": "http", "servers": [{"address": "10.4.1.11:30080"}, {"address": "10.4.1.12:30080", "weight": 2}]},
            {"name": "odoo", "protocol": "tcp", "servers": [{"address": "10.4.1.11:32036"}]}
        ],
        "hosts": [
            {"hostname": "redmine.beerme", "mode": "terminate", "backend": "redmine", "certificate": "beerme",
             "request_headers": {"set": {"x-env": "prod"}}},
            {"hostname": "odoo.beerme", "mode": "passthrough", "backend": "odoo", "proxy_protocol": "v2"}
        ]
    })
}

fn beerme() -> (String, String) {
    self_signed(&["*.beerme", "redmine.beerme", "odoo.beerme"])
}

#[tokio::test]
async fn export_then_apply_elsewhere_round_trips() {
    let cert = beerme();
    let a = TestApi::new().await;
    let r = a.put("/v1/config", doc(&cert)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.body["version"].as_u64(), r.body["changed"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(r.body["diff"]["created"].as_array().unwrap().len(), 5);
    let exported = a.get("/v1/config/export").await;
    assert_eq!(exported.header("etag"), "\"v2\"");
    let mut document = exported.body.clone();
    assert!(
        document["certificates"][0].get("key_pem").is_none(),
        "keys are never exported"
    );
    assert_eq!(document["hosts"][0]["backend"], "odoo");

    // Another installation: the document plus the key it does not carry.
    document["certificates"][0]["key_pem"] = json!(cert.1);
    let b = TestApi::new().await;
    let r = b.put("/v1/config", document).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(b.get("/v1/config/export").await.body, exported.body);
}

#[tokio::test]
async fn applying_the_same_document_twice_creates_one_version_and_keeps_ids() {
    let api = TestApi::new().await;
    let cert = beerme();
    api.put("/v1/config", doc(&cert)).await;
    let hosts = api.get("/v1/hosts").await.body;
    let backends = api.get("/v1/backends").await.body;
    // The second time without the key: the stored certificate has the same fingerprint.
    let mut again = doc(&cert);
    again["certificates"][0]
        .as_object_mut()
        .unwrap()
        .remove("key_pem");
    let r = api.put("/v1/config", again).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["changed"], false);
    assert_eq!(r.body["version"], 2);
    assert_eq!(api.version().await, 2);
    assert_eq!(api.get("/v1/hosts").await.body, hosts);
    assert_eq!(
        api.get("/v1/backends").await.body,
        backends,
        "server ids and timestamps kept"
    );
}

#[tokio::test]
async fn one_document_can_delete_a_backend_together_with_the_host_that_uses_it() {
    let api = TestApi::new().await;
    let cert = beerme();
    api.put("/v1/config", doc(&cert)).await;
    let mut smaller = doc(&cert);
    smaller["backends"].as_array_mut().unwrap().remove(1);
    smaller["hosts"].as_array_mut().unwrap().remove(1);
    let r = api.put("/v1/config", smaller).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["version"], 3);
    let deleted: Vec<&str> = r.body["diff"]["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["odoo", "odoo.beerme"]);
    let summary = &api.get("/v1/config/versions").await.body[0]["summary"];
    assert_eq!(summary, "deleted backend odoo, deleted host odoo.beerme");
}

#[tokio::test]
async fn a_bad_document_is_refused_whole_with_every_problem_and_its_path() {
    let api = TestApi::new().await;
    let cert = beerme();
    let (other_cert, other_key) = self_signed(&["other.example"]);
    let mut bad = doc(&cert);
    bad["backends"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "redmine", "protocol": "http"}));
    bad["backends"][1]["servers"][0]["address"] = json!("nope");
    bad["hosts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"hostname": "wiki.beerme", "mode": "terminate", "backend": "ghost"}));
    bad["hosts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"hostname": "bad_name", "mode": "terminate", "backend": "redmine"}));
    bad["certificates"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "other", "cert_pem": other_cert}));
    let r = api.put("/v1/config", bad).await;
    r.assert_problem(422, "");
    let mut fields = r.fields();
    fields.sort();
    assert_eq!(
        fields,
        [
            "backends[1].servers[0].address",
            "backends[2].name",
            "certificates[1].key_pem",
            "hosts[2].backend",
            "hosts[3].hostname",
        ],
        "{}",
        r.body
    );
    // A certificate that does not cover its host is found by the shared validation, by path.
    let mut uncovered = doc(&cert);
    uncovered["certificates"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "other", "cert_pem": other_cert, "key_pem": other_key}));
    uncovered["hosts"][0]["certificate"] = json!("other");
    let r = api.put("/v1/config", uncovered).await;
    r.assert_problem(422, "hosts[0].certificate_id");
    assert!(
        r.body["detail"].as_str().unwrap().contains("other.example"),
        "{}",
        r.body
    );
    assert_eq!(api.version().await, 1, "nothing stored");
    assert_eq!(api.get("/v1/backends").await.body, json!([]));
}

#[tokio::test]
async fn dry_run_changes_nothing_and_stale_if_match_is_412() {
    let api = TestApi::new().await;
    let cert = beerme();
    let r = api.put("/v1/config?dry_run=true", doc(&cert)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        (
            r.body["dry_run"].as_bool(),
            r.body["changed"].as_bool(),
            r.body["version"].as_u64()
        ),
        (Some(true), Some(true), Some(2))
    );
    assert_eq!(api.version().await, 1);
    let etag = api.get("/v1/config").await.header("etag");
    let ok = api
        .call_with(
            Method::PUT,
            "/v1/config",
            Some(doc(&cert)),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let stale = api
        .call_with(
            Method::PUT,
            "/v1/config",
            Some(json!({})),
            &[("if-match", &etag)],
        )
        .await;
    stale.assert_problem(412, "");
    assert_eq!(api.version().await, 2);
}

#[tokio::test]
async fn bodies_over_the_configured_limit_are_413() {
    let mut api = TestApi::new().await;
    api.state.config_body_limit = 8 * 1024 * 1024;
    let body = format!(
        r#"{{"hosts": [], "padding": "{}"}}"#,
        "a".repeat(50 * 1024 * 1024)
    );
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/v1/config")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let r = api.raw(req).await;
    r.assert_problem(413, "");
    assert!(
        r.body["detail"].as_str().unwrap().contains("8388608"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn ten_thousand_hosts_round_trip() {
    let api = TestApi::new().await;
    let (c, k) = self_signed(&["*.beerme"]);
    let backends: Vec<Value> = (0..100)
        .map(|i| json!({"name": format!("b{i}"), "protocol": "http", "servers": [{"address": format!("10.0.{}.{}:80", i / 250, i % 250 + 1)}]}))
        .collect();
    let hosts: Vec<Value> = (0..10_000)
        .map(|i| json!({"hostname": format!("h{i}.beerme"), "mode": "terminate", "backend": format!("b{}", i % 100), "certificate": "beerme"}))
        .collect();
    let document = json!({"certificates": [{"name": "beerme", "cert_pem": c, "key_pem": k}], "backends": backends, "hosts": hosts});
    let r = api.put("/v1/config", document).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["diff"]["created"].as_array().unwrap().len(), 10_101);
    let exported = api.get("/v1/config/export").await.body;
    assert_eq!(exported["hosts"].as_array().unwrap().len(), 10_000);
    let mut again = exported.clone();
    again["certificates"][0]["key_pem"] = json!(k);
    let r = api.put("/v1/config", again).await;
    assert_eq!(
        r.body["changed"], false,
        "the export applies back as no change"
    );
    assert_eq!(
        api.get("/v1/config/versions")
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn one_document_can_move_a_host_to_a_new_backend_and_certificate_and_drop_the_old_ones() {
    let api = TestApi::new().await;
    let cert = beerme();
    api.put("/v1/config", doc(&cert)).await;
    let host_id = api
        .get("/v1/hosts")
        .await
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hostname"] == "redmine.beerme")
        .unwrap()["id"]
        .clone();
    let other = self_signed(&["redmine.beerme"]);
    let moved = json!({
        "certificates": [{"name": "redmine-only", "cert_pem": other.0, "key_pem": other.1}],
        "backends": [{"name": "redmine-v2", "protocol": "http", "servers": [{"address": "10.4.1.21:30080"}]}],
        "hosts": [{"hostname": "redmine.beerme", "mode": "terminate", "backend": "redmine-v2", "certificate": "redmine-only"}]
    });
    let r = api.put("/v1/config", moved).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let hosts = api.get("/v1/hosts").await.body;
    assert_eq!(hosts.as_array().unwrap().len(), 1);
    assert_eq!(hosts[0]["id"], host_id, "the host keeps its id");
    let names: Vec<String> = api
        .get("/v1/backends")
        .await
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["redmine-v2"]);
    assert_eq!(
        api.get("/v1/certificates")
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
