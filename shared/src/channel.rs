//! Messages of the API <-> worker channel and their wire encoding.
//!
//! The channel is one WebSocket per worker. Small messages travel as JSON text frames; a
//! [`ApiMessage::Snapshot`], which can be megabytes (10,000 hosts, 1,000 certificates), travels
//! as a binary frame holding gzip-compressed JSON. Decoding never trusts sizes: a message over
//! [`MAX_MESSAGE_BYTES`] (compressed or not) is an error, reported, never dropped silently.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::Config;
use crate::types::ConfigVersion;

/// Version of this protocol; a Hello with another one is refused with a reason.
pub const PROTOCOL_VERSION: u32 = 2;

/// Path of the channel on the API's listener.
pub const CHANNEL_PATH: &str = "/worker/v1/channel";

/// Largest message either side accepts, before or after decompression.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// What a worker says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// First message on every connection.
    Hello {
        worker_id: Uuid,
        name: String,
        applied_version: Option<ConfigVersion>,
        applied_hash: Option<String>,
        protocol_version: u32,
        /// The worker's HTTPS listener, for the registry.
        #[serde(default)]
        address: Option<String>,
        /// The worker's admin listener (`/status`, `/metrics`).
        #[serde(default)]
        admin_address: Option<String>,
    },
    /// The worker switched to this version.
    Ack {
        version: ConfigVersion,
        hash: String,
    },
    /// The worker refused this version and keeps serving its previous one.
    Nack {
        version: ConfigVersion,
        error: String,
    },
    /// The worker could not apply a delta (it is not on its base): send the whole snapshot.
    Resync {
        version: ConfigVersion,
    },
    /// The state of every server this worker checks (sent when one changes, and every few
    /// seconds, so an API that reconnects rebuilds its view).
    HealthReport {
        servers: Vec<ServerReport>,
    },
    Heartbeat,
}

/// One server's health as one worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerReport {
    pub backend_id: Uuid,
    pub server_id: Uuid,
    /// `unknown`, `up` or `down`.
    pub status: String,
    /// When the status last changed (RFC 3339).
    pub since: String,
    pub last_check: Option<String>,
    pub latency_ms: Option<f64>,
    /// Consecutive successes and failures.
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
    /// Multiplexed upstream connections to this server (HTTP/2 backends only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStats>,
    /// The certificate the server presented to the last `tls` check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CheckedCertificate>,
    /// Something wrong that does not make the server down (a certificate that does not cover
    /// the host name, or has expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// What a `tls` health check saw of the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckedCertificate {
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// The name the check sent as SNI.
    pub checked_name: String,
    /// Whether the certificate covers `checked_name`.
    pub covers_name: bool,
}

/// A worker's connections to one server, for backends it talks HTTP/2 to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamStats {
    /// `h2`.
    pub protocol: String,
    /// Connections open now.
    pub connections: u64,
    /// Streams in flight now.
    pub streams_in_flight: u64,
    /// Requests sent since the worker started.
    pub requests: u64,
    /// Connections opened since the worker started.
    pub connections_opened: u64,
    /// `requests / connections_opened`: how many requests each connection carried.
    pub reuse_ratio: Option<f64>,
}

/// What the API says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiMessage {
    /// Answer to Hello: the heartbeat interval both sides keep.
    Welcome {
        heartbeat_ms: u64,
    },
    /// A configuration to apply, private keys included.
    Snapshot {
        version: ConfigVersion,
        hash: String,
        body: Config,
    },
    /// The change from `base` (which the worker applied) to `version`, private keys of new or
    /// changed certificates included.
    Delta {
        base: ConfigVersion,
        base_hash: String,
        version: ConfigVersion,
        hash: String,
        body: crate::delta::ConfigDelta,
    },
    Heartbeat,
    /// The connection is refused (bad protocol version and the like); do not retry quickly.
    Refused {
        reason: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("compressed message is corrupt: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("message is not valid: {0}")]
    Json(#[from] serde_json::Error),
}

/// A frame on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// Encode a message: snapshots gzip-compressed in a binary frame, the rest as JSON text.
pub fn encode<T: Serialize>(msg: &T, compress: bool) -> Frame {
    let json = serde_json::to_vec(msg).unwrap_or_default();
    if !compress {
        return Frame::Text(String::from_utf8(json).unwrap_or_default());
    }
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 3),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&json);
    Frame::Binary(enc.finish().unwrap_or_default())
}

/// Encode an API message, compressing snapshots.
pub fn encode_api(msg: &ApiMessage) -> Frame {
    encode(
        msg,
        matches!(msg, ApiMessage::Snapshot { .. } | ApiMessage::Delta { .. }),
    )
}

/// Decode a text (JSON) or binary (gzip JSON) frame.
pub fn decode<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T, DecodeError> {
    match frame {
        Frame::Text(t) => {
            if t.len() > MAX_MESSAGE_BYTES {
                return Err(DecodeError::TooLarge);
            }
            Ok(serde_json::from_str(t)?)
        }
        Frame::Binary(b) => {
            let mut out = Vec::new();
            let limit = MAX_MESSAGE_BYTES as u64 + 1;
            flate2::read::GzDecoder::new(&b[..])
                .take(limit)
                .read_to_end(&mut out)
                .map_err(DecodeError::Gzip)?;
            if out.len() > MAX_MESSAGE_BYTES {
                return Err(DecodeError::TooLarge);
            }
            Ok(serde_json::from_slice(&out)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_compressed_and_the_rest_as_text() {
        let snap = ApiMessage::Snapshot {
            version: ConfigVersion::FIRST,
            hash: "ab".repeat(32),
            body: Config::default(),
        };
        let frame = encode_api(&snap);
        assert!(matches!(frame, Frame::Binary(_)));
        assert_eq!(decode::<ApiMessage>(&frame).unwrap(), snap);
        let hb = encode_api(&ApiMessage::Heartbeat);
        assert_eq!(hb, Frame::Text(r#"{"type":"heartbeat"}"#.into()));
        let hello = WorkerMessage::Hello {
            worker_id: Uuid::nil(),
            name: "edge-1".into(),
            applied_version: None,
            applied_hash: None,
            protocol_version: PROTOCOL_VERSION,
            address: None,
            admin_address: None,
        };
        assert_eq!(
            decode::<WorkerMessage>(&encode(&hello, false)).unwrap(),
            hello
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<ApiMessage>(&Frame::Binary(vec![1, 2, 3])).is_err());
        assert!(decode::<ApiMessage>(&Frame::Text("{}".into())).is_err());
        assert!(decode::<WorkerMessage>(&Frame::Text(r#"{"type":"ack"}"#.into())).is_err());
    }
}
