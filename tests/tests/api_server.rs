//! The API's HTTP server as clients see it: a client that holds a connection open without
//! finishing its request head is closed after the header timeout, while others are served.

use std::time::{Duration, Instant};

use sluice_tests::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir.path().join("api"), "127.0.0.1:0", &["--workers", "0"]);
    let mut slow = TcpStream::connect(api.addr).await.expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET /v1/hosts HTTP/1.1\r\nHost: sluice\r\n")
        .await
        .expect("partial head");
    // Meanwhile the server answers others.
    let (status, body) = api.http.get("/v1/hosts").await;
    assert_eq!(status, 200, "{body}");
    // The slow client is closed (with or without a 408), never served.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut got))
        .await
        .expect("closed after the header timeout, not held open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before the 10 s header timeout"
    );
    let got = String::from_utf8_lossy(&got);
    assert!(
        !got.contains(" 200 "),
        "a partial request was answered: {got}"
    );
}
