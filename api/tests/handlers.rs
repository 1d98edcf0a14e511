//! Handler tests: every validation rule, malformed requests, auth, ETags, dry runs, versioning
//! and concurrency, each on a fresh database, through the real router without a socket.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::{cert_body, self_signed, TestApi, TOKEN};
use serde_json::{json, Value};

fn host_body(hostname: &str, mode: &str, backend: &str) -> Value {
    json!({"hostname": hostname, "mode": mode, "backend_id": backend})
}

// ---------------------------------------------------------------- certificates

#[tokio::test]
async fn certificate_pem_that_does_not_parse_is_422() {
    let api = TestApi::new().await;
    let r = api
        .post(
            "/v1/certificates",
            json!({"name": "x", "cert_pem": "junk", "key_pem": "junk"}),
        )
        .await;
    r.assert_problem(422, "cert_pem");
}

#[tokio::test]
async fn certificate_key_that_does_not_match_is_422() {
    let api = TestApi::new().await;
    let (cert, _) = self_signed(&["a.example"]);
    let (_, other_key) = self_signed(&["a.example"]);
    let r = api
        .post(
            "/v1/certificates",
            json!({"name": "x", "cert_pem": cert, "key_pem": other_key}),
        )
        .await;
    r.assert_problem(422, "key_pem");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn certificate_without_key_is_422() {
    let api = TestApi::new().await;
    let (cert, _) = self_signed(&["a.example"]);
    api.post("/v1/certificates", json!({"name": "x", "cert_pem": cert}))
        .await
        .assert_problem(422, "key_pem");
}

#[tokio::test]
async fn expired_certificate_is_422() {
    let api = TestApi::new().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["old.example".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let cert = params.self_signed(&key).unwrap().pem();
    let r = api
        .post(
            "/v1/certificates",
            json!({"name": "old", "cert_pem": cert, "key_pem": key.serialize_pem()}),
        )
        .await;
    r.assert_problem(422, "cert_pem");
    assert!(
        r.body["detail"].as_str().unwrap().contains("expired"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn chain_out_of_order_is_422() {
    let api = TestApi::new().await;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["a.example".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let body = |pem: String| json!({"name": "c", "cert_pem": pem, "key_pem": key.serialize_pem()});
    api.post(
        "/v1/certificates",
        body(format!("{}{}", ca.pem(), leaf.pem())),
    )
    .await
    .assert_problem(422, "cert_pem");
    let ok = api
        .post(
            "/v1/certificates",
            body(format!("{}{}", leaf.pem(), ca.pem())),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
}

#[tokio::test]
async fn certificate_shows_facts_and_single_label_wildcard_warning_but_never_the_key() {
    let api = TestApi::new().await;
    let r = api
        .post(
            "/v1/certificates",
            cert_body("beerme", &["*.beerme", "redmine.beerme"]),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["sans"], json!(["*.beerme", "redmine.beerme"]));
    assert_eq!(r.body["fingerprint_sha256"].as_str().unwrap().len(), 64);
    assert!(
        r.body["warnings"][0]
            .as_str()
            .unwrap()
            .contains("single-label"),
        "{}",
        r.body
    );
    assert!(r.body.get("key_pem").is_none());
    let listed = api.get("/v1/certificates").await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    let version = api.get("/v1/config/versions/2").await;
    assert_eq!(version.status, StatusCode::OK);
    assert!(version.body["config"]["certificates"][0]
        .get("key_pem")
        .is_none());
    assert_eq!(
        version.body["config"]["certificates"][0]["key_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
}

#[tokio::test]
async fn certificate_update_without_key_keeps_the_stored_key_only_when_it_matches() {
    let api = TestApi::new().await;
    let (cert, key) = self_signed(&["a.example"]);
    let id = api
        .post(
            "/v1/certificates",
            json!({"name": "a", "cert_pem": cert, "key_pem": key}),
        )
        .await
        .id();
    // Rename, same certificate, no key: fine.
    let r = api
        .put(
            &format!("/v1/certificates/{id}"),
            json!({"name": "renamed", "cert_pem": cert}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["name"], "renamed");
    // A different leaf without its key: refused.
    let (other, _) = self_signed(&["a.example"]);
    api.put(
        &format!("/v1/certificates/{id}"),
        json!({"name": "renamed", "cert_pem": other}),
    )
    .await
    .assert_problem(422, "key_pem");
}

#[tokio::test]
async fn duplicate_certificate_name_is_409() {
    let api = TestApi::new().await;
    api.post("/v1/certificates", cert_body("same", &["a.example"]))
        .await;
    api.post("/v1/certificates", cert_body("same", &["b.example"]))
        .await
        .assert_problem(409, "name");
}

// ---------------------------------------------------------------- hosts

#[tokio::test]
async fn bad_hostname_syntax_is_422() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let long = format!("{}.beerme", "a".repeat(64));
    for bad in [
        "",
        "a..beerme",
        "a.*.beerme",
        "*a.beerme",
        "*",
        "a_b.beerme",
        "-a.beerme",
        long.as_str(),
    ] {
        let r = api
            .post("/v1/hosts", host_body(bad, "terminate", &redmine))
            .await;
        r.assert_problem(422, "hostname");
    }
    assert_eq!(
        api.version().await,
        4,
        "no failed write committed a version"
    );
}

#[tokio::test]
async fn duplicate_hostname_is_409() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let r = api
        .post(
            "/v1/hosts",
            host_body("redmine.beerme", "terminate", &redmine),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    api.post(
        "/v1/hosts",
        host_body("Redmine.Beerme", "terminate", &redmine),
    )
    .await
    .assert_problem(409, "hostname");
}

#[tokio::test]
async fn terminate_host_needs_a_covering_certificate_and_the_error_names_the_sans() {
    let api = TestApi::new().await;
    let (cert, redmine, _) = api.seed().await;
    let mut body = host_body("redmine.example", "terminate", &redmine);
    body["certificate_id"] = json!(cert);
    let r = api.post("/v1/hosts", body).await;
    r.assert_problem(422, "certificate_id");
    let msg = r.body["errors"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("*.beerme, redmine.beerme, odoo.beerme"),
        "{msg}"
    );
    // Without certificate_id nothing covers it either.
    api.post(
        "/v1/hosts",
        host_body("redmine.example", "terminate", &redmine),
    )
    .await
    .assert_problem(422, "certificate_id");
    // With certificate_id omitted, the covering one is chosen.
    let ok = api
        .post(
            "/v1/hosts",
            host_body("other.beerme", "terminate", &redmine),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
}

#[tokio::test]
async fn mode_and_backend_protocol_must_fit() {
    let api = TestApi::new().await;
    let (_, redmine, odoo) = api.seed().await;
    api.post("/v1/hosts", host_body("odoo.beerme", "terminate", &odoo))
        .await
        .assert_problem(422, "backend_id");
    api.post(
        "/v1/hosts",
        host_body("odoo.beerme", "passthrough", &redmine),
    )
    .await
    .assert_problem(422, "backend_id");
    let ok = api
        .post("/v1/hosts", host_body("odoo.beerme", "passthrough", &odoo))
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    assert_eq!(ok.body["proxy_protocol"], "none");
}

#[tokio::test]
async fn unknown_backend_and_certificate_ids_are_422() {
    let api = TestApi::new().await;
    let missing = "00000000-0000-0000-0000-000000000001";
    let mut body = host_body("a.beerme", "terminate", missing);
    body["certificate_id"] = json!(missing);
    let r = api.post("/v1/hosts", body).await;
    r.assert_problem(422, "backend_id");
    r.assert_problem(422, "certificate_id");
}

#[tokio::test]
async fn header_rules_are_validated_and_stored_lower_case() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let mut body = host_body("redmine.beerme", "terminate", &redmine);
    body["request_headers"] = json!({"set": {"Transfer-Encoding": "chunked"}});
    api.post("/v1/hosts", body.clone())
        .await
        .assert_problem(422, "request_headers.set.transfer-encoding");
    body["request_headers"] = json!({"set": {"X-Env": "prod"}, "remove": ["X-Debug"]});
    let ok = api.post("/v1/hosts", body).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    assert_eq!(
        ok.body["request_headers"],
        json!({"set": {"x-env": "prod"}, "remove": ["x-debug"]})
    );
}

// ---------------------------------------------------------------- backends

#[tokio::test]
async fn bad_server_address_or_port_is_422() {
    let api = TestApi::new().await;
    for (addr, field) in [
        ("10.0.0.1", "servers[0].address"),
        ("10.0.0.1:0", "servers[0].address"),
        ("10.0.0.1:99999", "servers[0].address"),
        ("a b:80", "servers[0].address"),
    ] {
        let r = api
            .post(
                "/v1/backends",
                json!({"name": "b", "protocol": "http", "servers": [{"address": addr}]}),
            )
            .await;
        r.assert_problem(422, field);
    }
}

#[tokio::test]
async fn health_check_values_out_of_range_are_422() {
    let api = TestApi::new().await;
    for (hc, field) in [
        (
            json!({"interval_ms": 1000, "timeout_ms": 1000}),
            "health_check.timeout_ms",
        ),
        (json!({"rise": 0}), "health_check.rise"),
        (json!({"fall": 11}), "health_check.fall"),
        (
            json!({"interval_ms": 10, "timeout_ms": 5}),
            "health_check.interval_ms",
        ),
        (json!({"kind": "http", "path": "nope"}), "health_check.path"),
        (
            json!({"kind": "http", "expect_status": "700"}),
            "health_check.expect_status",
        ),
    ] {
        let r = api
            .post(
                "/v1/backends",
                json!({"name": "b", "protocol": "http", "health_check": hc}),
            )
            .await;
        r.assert_problem(422, field);
    }
    let r = api
        .post(
            "/v1/backends",
            json!({"name": "b", "protocol": "http", "servers": [{"address": "a:1", "weight": 0}]}),
        )
        .await;
    r.assert_problem(422, "servers[0].weight");
    let r = api
        .post(
            "/v1/backends",
            json!({"name": "b", "protocol": "http", "tls": {"verify": false}}),
        )
        .await;
    r.assert_problem(422, "tls");
}

#[tokio::test]
async fn backend_defaults_follow_haproxy_and_server_ids_survive_updates() {
    let api = TestApi::new().await;
    let r = api
        .post(
            "/v1/backends",
            json!({"name": "b", "protocol": "http", "servers": [{"address": "10.0.0.1:80"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let hc = &r.body["health_check"];
    assert_eq!(
        (
            hc["interval_ms"].as_u64(),
            hc["rise"].as_u64(),
            hc["fall"].as_u64()
        ),
        (Some(2000), Some(2), Some(3))
    );
    assert_eq!(r.body["balance"], "round_robin");
    let server_id = r.body["servers"][0]["id"].clone();
    let id = r.id();
    let u = api
        .put(
            &format!("/v1/backends/{id}"),
            json!({"name": "b", "protocol": "http",
        "servers": [{"address": "10.0.0.1:80", "weight": 5}, {"address": "10.0.0.2:80"}]}),
        )
        .await;
    assert_eq!(u.status, StatusCode::OK, "{}", u.body);
    assert_eq!(u.body["servers"][0]["id"], server_id);
    assert_eq!(u.body["servers"][0]["weight"], 5);
    assert_ne!(u.body["servers"][1]["id"], server_id);
}

#[tokio::test]
async fn deleting_a_referenced_backend_or_certificate_is_409_naming_the_hosts() {
    let api = TestApi::new().await;
    let (cert, redmine, _) = api.seed().await;
    let mut body = host_body("redmine.beerme", "terminate", &redmine);
    body["certificate_id"] = json!(cert);
    api.post("/v1/hosts", body).await;
    let r = api.delete(&format!("/v1/backends/{redmine}")).await;
    r.assert_problem(409, "hosts[redmine.beerme]");
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("redmine.beerme"));
    api.delete(&format!("/v1/certificates/{cert}"))
        .await
        .assert_problem(409, "hosts[redmine.beerme]");
}

#[tokio::test]
async fn deleting_the_only_certificate_that_covers_a_host_is_409() {
    let api = TestApi::new().await;
    let (cert, redmine, _) = api.seed().await;
    // The host names no certificate: the wildcard is chosen for it.
    api.post(
        "/v1/hosts",
        host_body("redmine.beerme", "terminate", &redmine),
    )
    .await;
    let r = api.delete(&format!("/v1/certificates/{cert}")).await;
    r.assert_problem(409, "hosts[redmine.beerme].certificate_id");
}

// ---------------------------------------------------------------- malformed requests

#[tokio::test]
async fn malformed_requests_get_clear_answers() {
    let api = TestApi::new().await;
    let auth = format!("Bearer {TOKEN}");
    let send = |ct: Option<&'static str>, body: Vec<u8>| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/v1/backends")
            .header("authorization", auth.clone());
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Body::from(body)).unwrap()
    };
    api.raw(send(Some("application/json"), b"{not json".to_vec()))
        .await
        .assert_problem(400, "");
    let r = api
        .raw(send(
            Some("application/json"),
            br#"{"name":"b","protocol":"http","colour":"red"}"#.to_vec(),
        ))
        .await;
    r.assert_problem(400, "");
    assert!(
        r.body["detail"].as_str().unwrap().contains("colour"),
        "{}",
        r.body
    );
    let r = api
        .raw(send(
            Some("application/json"),
            br#"{"name":"b","protocol":"gopher"}"#.to_vec(),
        ))
        .await;
    r.assert_problem(400, "protocol");
    let r = api
        .raw(send(
            Some("application/json"),
            br#"{"name":"b","protocol":"http","servers":[{"address":"a:1","weight":"x"}]}"#
                .to_vec(),
        ))
        .await;
    r.assert_problem(400, "servers[0].weight");
    api.raw(send(Some("text/plain"), b"{}".to_vec()))
        .await
        .assert_problem(415, "");
    api.raw(send(None, b"{}".to_vec()))
        .await
        .assert_problem(415, "");
    let big = format!(
        r#"{{"name":"{}","protocol":"http"}}"#,
        "a".repeat(1024 * 1024 + 10)
    );
    api.raw(send(Some("application/json"), big.into_bytes()))
        .await
        .assert_problem(413, "");
    api.get("/v1/hosts/00000000-0000-0000-0000-00000000abcd")
        .await
        .assert_problem(404, "");
    api.get("/v1/hosts/not-a-uuid")
        .await
        .assert_problem(400, "id");
    api.get("/v1/config/versions/0")
        .await
        .assert_problem(400, "version");
    api.get("/v1/config/versions/999")
        .await
        .assert_problem(404, "");
    api.get("/v1/config/versions?limit=abc")
        .await
        .assert_problem(400, "");
    api.get("/v1/nothing-here").await.assert_problem(404, "");
    api.call(Method::PATCH, "/v1/hosts", None)
        .await
        .assert_problem(400, "");
    api.post("/v1/hosts?dry_run=maybe", json!({}))
        .await
        .assert_problem(400, "dry_run");
    assert_eq!(api.version().await, 1);
}

#[tokio::test]
async fn every_v1_route_needs_the_admin_token() {
    let api = TestApi::new().await;
    for (token, path) in [
        (None, "/v1/hosts"),
        (Some("Bearer wrong"), "/v1/hosts"),
        (Some("Basic abc"), "/v1/config"),
    ] {
        let mut b = Request::builder().uri(path);
        if let Some(t) = token {
            b = b.header("authorization", t);
        }
        let r = api.raw(b.body(Body::empty()).unwrap()).await;
        r.assert_problem(401, "");
        assert_eq!(r.header("www-authenticate"), r#"Bearer realm="sluice""#);
    }
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = api
            .raw(Request::builder().uri(open).body(Body::empty()).unwrap())
            .await;
        assert_eq!(r.status, StatusCode::OK, "{open}");
    }
}

// ---------------------------------------------------------------- ETags, dry run, versions

/// Every kind of object answers its writes alike: 201 with `Location`, `ETag` and the new
/// version; 200 on a replace; a dry-run delete 200 with no result and nothing removed; 204 with
/// the new version on a delete, after which it is a 404 naming it.
#[tokio::test]
async fn each_kind_of_object_is_created_replaced_and_deleted_with_location_etag_and_version() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let spare = |n: u32| {
        json!({"name": format!("spare{n}"), "protocol": "http",
            "servers": [{"address": "10.4.1.13:30080"}]})
    };
    let mut cert2 = cert_body("other", &["other.example"]);
    cert2["name"] = json!("other2");
    let cases = [
        (
            "certificates",
            "certificate",
            cert_body("other", &["other.example"]),
            cert2,
        ),
        ("backends", "backend", spare(1), spare(2)),
        (
            "hosts",
            "host",
            host_body("spare.beerme", "terminate", &redmine),
            host_body("spare2.beerme", "terminate", &redmine),
        ),
    ];
    for (collection, singular, body, replacement) in cases {
        let before = api.version().await;
        let created = api.post(&format!("/v1/{collection}"), body).await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        let id = created.id();
        let path = format!("/v1/{collection}/{id}");
        assert_eq!(created.header("location"), path);
        assert_eq!(
            created.header("sluice-config-version"),
            (before + 1).to_string()
        );
        assert_eq!(created.header("etag"), api.get(&path).await.header("etag"));

        let replaced = api.put(&path, replacement).await;
        assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.body);
        assert_eq!(replaced.header("location"), "");
        assert_eq!(
            replaced.header("sluice-config-version"),
            (before + 2).to_string()
        );
        assert_eq!(replaced.body["id"], json!(id));
        assert_eq!(replaced.header("etag"), api.get(&path).await.header("etag"));

        let dry = api.delete(&format!("{path}?dry_run=true")).await;
        assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
        assert_eq!(dry.body["dry_run"], true);
        assert_eq!(dry.body["result"], Value::Null);
        assert_eq!(api.get(&path).await.status, StatusCode::OK);
        assert_eq!(api.version().await, before + 2);

        let deleted = api.delete(&path).await;
        assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
        assert_eq!(
            deleted.header("sluice-config-version"),
            (before + 3).to_string()
        );
        let gone = api.get(&path).await;
        gone.assert_problem(404, "");
        assert_eq!(gone.body["detail"], format!("no {singular} has id {id}"));
    }
}

#[tokio::test]
async fn stale_if_match_is_412_and_current_one_succeeds() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let path = format!("/v1/backends/{redmine}");
    let etag = api.get(&path).await.header("etag");
    assert!(etag.starts_with('"'), "{etag}");
    let body =
        json!({"name": "redmine", "protocol": "http", "servers": [{"address": "10.4.1.11:30080"}]});
    let first = api
        .call_with(
            Method::PUT,
            &path,
            Some(body.clone()),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_ne!(first.header("etag"), etag);
    let stale = api
        .call_with(Method::PUT, &path, Some(body), &[("if-match", &etag)])
        .await;
    stale.assert_problem(412, "");
    api.call_with(Method::DELETE, &path, None, &[("if-match", &etag)])
        .await
        .assert_problem(412, "");
}

#[tokio::test]
async fn dry_run_validates_and_diffs_without_committing() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let before = api.version().await;
    let r = api
        .post(
            "/v1/hosts?dry_run=true",
            host_body("redmine.beerme", "terminate", &redmine),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["dry_run"], true);
    assert_eq!(r.body["version"], before + 1);
    assert_eq!(r.body["diff"]["created"][0]["name"], "redmine.beerme");
    assert_eq!(r.body["result"]["hostname"], "redmine.beerme");
    assert_eq!(api.version().await, before);
    assert_eq!(api.get("/v1/hosts").await.body, json!([]));
    // A dry run still validates.
    api.post(
        "/v1/hosts?dry_run=true",
        host_body("x.example", "terminate", &redmine),
    )
    .await
    .assert_problem(422, "certificate_id");
    let d = api
        .call(
            Method::DELETE,
            &format!("/v1/backends/{redmine}?dry_run=true"),
            None,
        )
        .await;
    assert_eq!(d.body["diff"]["deleted"][0]["name"], "redmine");
    assert_eq!(
        api.get(&format!("/v1/backends/{redmine}")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_write_is_one_version_and_history_summarizes_it() {
    let api = TestApi::new().await;
    assert_eq!(api.version().await, 1);
    let (_, redmine, odoo) = api.seed().await;
    let h = api
        .post(
            "/v1/hosts",
            host_body("redmine.beerme", "terminate", &redmine),
        )
        .await;
    assert_eq!(h.header("sluice-config-version"), "5");
    api.post("/v1/hosts", host_body("odoo.beerme", "passthrough", &odoo))
        .await;
    assert_eq!(api.version().await, 6);
    let history = api.get("/v1/config/versions").await.body;
    let summaries: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["summary"].as_str().unwrap())
        .collect();
    assert_eq!(
        summaries,
        [
            "created host odoo.beerme",
            "created host redmine.beerme",
            "created backend odoo",
            "created backend redmine",
            "created certificate beerme",
            "initial configuration",
        ]
    );
    let page = api.get("/v1/config/versions?limit=2&before=5").await.body;
    assert_eq!(
        page.as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 3]
    );
}

#[tokio::test]
async fn an_update_that_changes_nothing_commits_no_version() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let before = api.version().await;
    let stored = api.get(&format!("/v1/backends/{redmine}")).await.body;
    let body = json!({"name": "redmine", "protocol": "http", "servers": stored["servers"]});
    let r = api.put(&format!("/v1/backends/{redmine}"), body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("sluice-config-version"), before.to_string());
    assert_eq!(r.body["updated_at"], stored["updated_at"]);
    assert_eq!(api.version().await, before);
}

#[tokio::test]
async fn restore_commits_a_new_version_equal_to_the_old_one() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let v4 = api.get("/v1/config").await.body;
    let host = api
        .post(
            "/v1/hosts",
            host_body("redmine.beerme", "terminate", &redmine),
        )
        .await
        .id();
    api.delete(&format!(
        "/v1/backends/{}",
        api.seed_backend_named("odoo").await
    ))
    .await;
    assert_eq!(api.version().await, 6);
    let dry = api
        .post("/v1/config/versions/4/restore?dry_run=true", json!(null))
        .await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    assert_eq!(api.version().await, 6);
    let r = api
        .call(Method::POST, "/v1/config/versions/4/restore", None)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["version"], 7);
    assert_eq!(r.body["restored_from"], 4);
    assert_eq!(api.get("/v1/config").await.body["hash"], v4["hash"]);
    assert_eq!(
        api.get(&format!("/v1/hosts/{host}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get("/v1/backends").await.body.as_array().unwrap().len(),
        2
    );
    // Restoring what is already current changes nothing.
    let again = api
        .call(Method::POST, "/v1/config/versions/7/restore", None)
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(api.version().await, 7);
}

/// Keys left behind by a deleted certificate and by a certificate given a new key are listed
/// by a dry run (which removes nothing) and then pruned, with no new version; the current
/// certificate's key stays and the worker snapshot still carries it; restoring a version that
/// needed a pruned key is 409 naming that certificate; the pruned keys' text is gone from
/// every database file while the kept key's is still found there.
#[tokio::test]
async fn unused_private_keys_are_pruned_and_scrubbed_from_the_database_files() {
    let api = TestApi::new().await;
    let a_body = cert_body("a", &["a.example"]);
    let a = api.post("/v1/certificates", a_body.clone()).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let b_body = cert_body("b", &["b.example"]);
    let b = api.post("/v1/certificates", b_body.clone()).await.id();
    let with_both = api.version().await;
    let first_a_key = api
        .get(&format!("/v1/config/versions/{with_both}"))
        .await
        .body["config"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key_sha256"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    // `a` gets a new key (and certificate); `b` is deleted.
    let a2_body = cert_body("a", &["a.example"]);
    let r = api
        .put(&format!("/v1/certificates/{}", a.id()), a2_body.clone())
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        api.delete(&format!("/v1/certificates/{b}")).await.status,
        StatusCode::NO_CONTENT
    );
    let version = api.version().await;
    let current_key = api
        .get(&format!("/v1/config/versions/{version}"))
        .await
        .body["config"]["certificates"][0]["key_sha256"]
        .as_str()
        .unwrap()
        .to_owned();

    let anonymous = api
        .raw(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/config/prune-keys")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    anonymous.assert_problem(401, "");
    let dry = api
        .post("/v1/config/prune-keys?dry_run=true", json!(null))
        .await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.body);
    let mut listed: Vec<String> = serde_json::from_value(dry.body["removed"].clone()).unwrap();
    listed.sort();
    let mut expected = first_a_key.clone();
    expected.sort();
    assert_eq!(
        listed, expected,
        "the keys of `a` before its replacement and of `b`"
    );
    assert_eq!(dry.body["kept"], 1);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["scrubbed"], false);
    let restorable = api
        .post(
            &format!("/v1/config/versions/{with_both}/restore?dry_run=true"),
            json!(null),
        )
        .await;
    assert_eq!(
        restorable.status,
        StatusCode::OK,
        "a dry run removed nothing: {}",
        restorable.body
    );

    let pruned = api.post("/v1/config/prune-keys", json!(null)).await;
    assert_eq!(pruned.status, StatusCode::OK, "{}", pruned.body);
    assert_eq!(pruned.body["removed"].as_array().unwrap().len(), 2);
    assert_eq!(pruned.body["kept"], 1);
    assert_eq!(pruned.body["dry_run"], false);
    assert_eq!(pruned.body["scrubbed"], true);
    assert_eq!(
        api.version().await,
        version,
        "pruning keys makes no version"
    );
    let again = api.post("/v1/config/prune-keys", json!(null)).await;
    assert_eq!(again.body["removed"], json!([]));
    assert_eq!(again.body["kept"], 1);

    // What is in force is untouched: the worker snapshot still carries the current key.
    let snap = api
        .state
        .db
        .snapshot_with_keys(sluice_shared::ConfigVersion::try_from(version).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snap.config.certificates[0].key_sha256, current_key);
    assert!(snap.config.certificates[0].key_pem.is_some());
    // A version that needed a pruned key cannot be restored.
    let r = api
        .call(
            Method::POST,
            &format!("/v1/config/versions/{with_both}/restore"),
            None,
        )
        .await;
    r.assert_problem(409, "");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(detail.contains("is no longer stored"), "{detail}");
    assert_eq!(api.version().await, version);

    // The bytes: a line from the middle of each key's PEM, searched in every database file.
    let files: Vec<Vec<u8>> = std::fs::read_dir(api.dir())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let found = |body: &Value| {
        let pem = body["key_pem"].as_str().unwrap();
        let line = pem.lines().nth(2).unwrap().as_bytes().to_vec();
        files
            .iter()
            .any(|f| f.windows(line.len()).any(|w| w == line))
    };
    assert!(
        found(&a2_body),
        "the kept key is in the database (the search works)"
    );
    assert!(!found(&a_body), "the replaced key is gone from the files");
    assert!(
        !found(&b_body),
        "the deleted certificate's key is gone from the files"
    );
}

impl TestApi {
    async fn seed_backend_named(&self, name: &str) -> String {
        let all = self.get("/v1/backends").await.body;
        all.as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

#[tokio::test]
async fn fifty_concurrent_writers_each_commit_exactly_one_version_or_fail_cleanly() {
    let api = TestApi::new().await;
    let (_, redmine, _) = api.seed().await;
    let before = api.version().await;
    let path = format!("/v1/backends/{redmine}");
    let etag = api.get(&path).await.header("etag");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let state = api.state.clone();
        let redmine = redmine.clone();
        let etag = etag.clone();
        tasks.push(tokio::spawn(async move {
            let api = TestApi::from_state(state);
            match i % 3 {
                // New hosts: all succeed.
                0 => api.post("/v1/hosts", host_body(&format!("h{i}.beerme"), "terminate", &redmine)).await.status,
                // The same hostname from many writers: one wins, the rest get 409.
                1 => api.post("/v1/hosts", host_body("contended.beerme", "terminate", &redmine)).await.status,
                // Updates guarded by the same ETag: one wins, the rest get 412.
                _ => {
                    let body = json!({"name": "redmine", "protocol": "http", "servers": [{"address": format!("10.9.0.{i}:80")}]});
                    api.call_with(Method::PUT, &format!("/v1/backends/{redmine}"), Some(body), &[("if-match", &etag)]).await.status
                }
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(
            [
                StatusCode::OK,
                StatusCode::CREATED,
                StatusCode::CONFLICT,
                StatusCode::PRECONDITION_FAILED
            ]
            .contains(&status),
            "unexpected {status}"
        );
        if status.is_success() {
            ok += 1;
        }
    }
    assert_eq!(
        ok,
        17 + 1 + 1,
        "17 new hosts, one contended host, one guarded update"
    );
    assert_eq!(api.version().await, before + ok);
}

impl TestApi {
    fn from_state(state: sluice_api::AppState) -> TestApi {
        TestApi::wrap(state)
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route() {
    let api = TestApi::new().await;
    api.get("/v1/hosts").await;
    let r = api
        .raw(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let text = r.body.as_str().unwrap().to_owned();
    assert!(
        text.contains(
            r#"sluice_api_http_requests_total{method="GET",route="/v1/hosts",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("sluice_api_config_version 1"), "{text}");
}
