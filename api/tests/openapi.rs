//! The committed `openapi/openapi.json` must equal what the code generates.
//! Regenerate with `cargo run -p sluice-api -- openapi > openapi/openapi.json`
//! (or run this test with `UPDATE_OPENAPI=1`).

use std::path::PathBuf;

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let generated = sluice_api::openapi::document_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `cargo run -p sluice-api -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn document_declares_bearer_auth_operation_ids_and_problem_responses() {
    let doc: serde_json::Value =
        serde_json::from_str(&sluice_api::openapi::document_json()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            assert!(
                op["operationId"].is_string(),
                "{method} {path} has no operationId"
            );
            if path.starts_with("/v1/") {
                assert!(
                    op["security"].is_array(),
                    "{method} {path} declares no security"
                );
                let problems = op["responses"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(code, _)| code.starts_with('4'))
                    .all(|(_, r)| r["content"]["application/problem+json"].is_object());
                assert!(problems, "{method} {path}: every 4xx is a problem document");
            }
        }
    }
}
