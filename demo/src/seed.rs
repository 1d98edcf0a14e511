//! The seed scenario as one declarative document (`PUT /v1/config`), and the curl commands
//! that exercise it — the same scenario `examples/seed.sh` loads into the compose stack.

use serde_json::{json, Value};

use crate::certs::{DemoCerts, GRPC, ODOO, REDMINE};

/// Where the demo backends listen (`host:port` as the proxy should reach them).
#[derive(Debug, Clone)]
pub struct Addresses {
    pub redmine: Vec<String>,
    pub odoo: Vec<String>,
    pub grpc: Vec<String>,
}

fn servers(addrs: &[String]) -> Vec<Value> {
    addrs.iter().map(|a| json!({"address": a})).collect()
}

/// `redmine.beerme` terminated and balanced over two HTTP/1.1 backends (HTTP checks);
/// `odoo.beerme` passed through by SNI to two backends holding their own certificate;
/// `grpc.beerme` terminated with an `h2c` backend, one shared HTTP/2 connection.
pub fn document(certs: &DemoCerts, at: &Addresses) -> Value {
    json!({
        "certificates": [
            {"name": "beerme", "cert_pem": certs.edge_chain, "key_pem": certs.edge_key}
        ],
        "backends": [
            {"name": "redmine", "protocol": "http", "balance": "round_robin",
             "servers": servers(&at.redmine),
             "health_check": {"kind": "http", "path": "/", "interval_ms": 2000}},
            {"name": "odoo", "protocol": "tcp", "servers": servers(&at.odoo)},
            {"name": "grpc", "protocol": "h2c", "servers": servers(&at.grpc)}
        ],
        "hosts": [
            {"hostname": REDMINE, "mode": "terminate", "backend": "redmine", "certificate": "beerme"},
            {"hostname": ODOO, "mode": "passthrough", "backend": "odoo"},
            {"hostname": GRPC, "mode": "terminate", "backend": "grpc", "certificate": "beerme"}
        ]
    })
}

/// Curl commands, one per pattern, that work as printed against a worker on `https_port` of
/// this machine, trusting the demo CA at `ca_path`.
pub fn curl_commands(ca_path: &str, https_port: u16) -> String {
    let curl = |name: &str, extra: &str| {
        format!(
            "curl --cacert {ca_path} --resolve {name}:{https_port}:127.0.0.1{extra} https://{name}:{https_port}/"
        )
    };
    format!(
        "  # TLS terminated, HTTP/2 to you, round robin over two HTTP/1.1 backends that echo the\n  \
         # headers they received (run it twice):\n  {}\n\n  \
         # TLS passed through by SNI: the backend terminated your TLS (\"tls\": true), and the\n  \
         # certificate you see is its own:\n  {}\n  \
         openssl s_client -connect 127.0.0.1:{https_port} -servername {ODOO} </dev/null 2>/dev/null | grep -E '^(subject|issuer)='\n\n  \
         # TLS terminated, requests multiplexed on one shared HTTP/2 (h2c) backend connection:\n  {}\n",
        curl(REDMINE, " --http2"),
        curl(ODOO, ""),
        curl(GRPC, " --http2"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_pattern() {
        let certs = DemoCerts::generate().unwrap();
        let at = Addresses {
            redmine: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            odoo: vec!["127.0.0.1:3".into(), "127.0.0.1:4".into()],
            grpc: vec!["127.0.0.1:5".into()],
        };
        let doc = document(&certs, &at);
        let modes: Vec<(&str, &str)> = doc["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["hostname"].as_str().unwrap(), h["mode"].as_str().unwrap()))
            .collect();
        assert_eq!(
            modes,
            [
                (REDMINE, "terminate"),
                (ODOO, "passthrough"),
                (GRPC, "terminate")
            ]
        );
        assert_eq!(doc["backends"][2]["protocol"], "h2c");
        let text = curl_commands("/tmp/ca.pem", 8443);
        assert!(text.contains("--resolve redmine.beerme:8443:127.0.0.1"));
        assert!(text.contains("https://grpc.beerme:8443/"));
    }
}
