//! Bearer-token authentication for `/v1`, and loading or generating the tokens.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// A secret token. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn new(value: impl Into<String>) -> Token {
        Token(value.into())
    }

    /// The secret text, for handing to a child process's environment or printing on request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compare in constant time (over hashes, so the length does not leak either).
    pub fn matches(&self, given: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(given.as_bytes());
        a.ct_eq(&b).into()
    }
}

/// Where a token came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Environment,
    File,
    Generated,
}

/// Use `from_env` when set; else read `dir/file`; else generate one and write it there (0600).
pub fn load_or_create(
    from_env: Option<String>,
    dir: &Path,
    file: &str,
) -> std::io::Result<(Token, TokenSource)> {
    if let Some(t) = from_env.filter(|t| !t.is_empty()) {
        return Ok((Token(t), TokenSource::Environment));
    }
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            return Ok((Token(t.trim().to_owned()), TokenSource::File))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok((Token(token), TokenSource::Generated))
}

/// Middleware: every `/v1` request needs `Authorization: Bearer <admin token>`.
pub async fn require_admin(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    match given {
        Some(t) if app.admin_token.matches(t.trim()) => next.run(req).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}
