//! Typed values that cannot hold invalid data: [`Hostname`], [`ServerAddr`], [`ConfigVersion`].
//!
//! Each is built with `TryFrom`/`FromStr`, whose error says what is wrong, and serializes as the
//! plain string or number it was built from.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why a string is not a valid hostname or address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} characters long; at most 253 are allowed")]
    TooLong { len: usize },
    #[error("has an empty label (two dots in a row, or a leading or trailing dot)")]
    EmptyLabel,
    #[error("label `{label}` is longer than 63 characters")]
    LabelTooLong { label: String },
    #[error("label `{label}` may hold only letters, digits and `-`")]
    BadCharacter { label: String },
    #[error("label `{label}` must not start or end with `-`")]
    BadHyphen { label: String },
    #[error("a wildcard is allowed only as the whole left-most label, as in `*.example.com`")]
    MisplacedWildcard,
    #[error("a wildcard needs at least one label after it, as in `*.example.com`")]
    BareWildcard,
    #[error("must be `host:port`")]
    MissingPort,
    #[error("port `{port}` is not a number from 1 to 65535")]
    BadPort { port: String },
    #[error("`{host}` is not an IPv6 address")]
    BadIpv6 { host: String },
}

/// A DNS hostname as used in SNI and `Host`: exact (`redmine.beerme`) or with a wildcard as the
/// whole left-most label (`*.beerme`). Always stored in lower case, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "redmine.beerme")]
pub struct Hostname(String);

impl Hostname {
    /// The hostname as a lower-case string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `*.suffix` names.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// For a wildcard `*.beerme`, the suffix `beerme`; `None` for an exact name.
    pub fn wildcard_suffix(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }

    /// Does this name (exact or wildcard) match the concrete name `name`?
    /// A wildcard covers exactly one label: `*.beerme` matches `a.beerme`, not `a.b.beerme`.
    pub fn matches(&self, name: &str) -> bool {
        match self.wildcard_suffix() {
            None => self.0.eq_ignore_ascii_case(name),
            Some(suffix) => match name.split_once('.') {
                Some((first, rest)) => !first.is_empty() && rest.eq_ignore_ascii_case(suffix),
                None => false,
            },
        }
    }

    /// Validate a single label (not a wildcard).
    fn check_label(label: &str) -> Result<(), NameError> {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(NameError::LabelTooLong {
                label: label.to_owned(),
            });
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(NameError::BadCharacter {
                label: label.to_owned(),
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::BadHyphen {
                label: label.to_owned(),
            });
        }
        Ok(())
    }
}

impl FromStr for Hostname {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 253 {
            return Err(NameError::TooLong { len: s.len() });
        }
        let lower = s.to_ascii_lowercase();
        let mut labels = lower.split('.');
        let first = labels.next().unwrap_or_default();
        let mut rest = 0;
        for label in labels {
            if label.contains('*') {
                return Err(NameError::MisplacedWildcard);
            }
            Self::check_label(label)?;
            rest += 1;
        }
        if first == "*" {
            if rest == 0 {
                return Err(NameError::BareWildcard);
            }
        } else if first.contains('*') {
            return Err(NameError::MisplacedWildcard);
        } else {
            Self::check_label(first)?;
        }
        Ok(Hostname(lower))
    }
}

impl TryFrom<String> for Hostname {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Hostname> for String {
    fn from(h: Hostname) -> String {
        h.0
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host part of a [`ServerAddr`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerHost {
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
    /// A DNS name, resolved by the worker when it connects.
    Name(Hostname),
}

/// An upstream server address, `host:port`, where host is an IPv4 address, a bracketed IPv6
/// address (`[::1]:8080`) or a DNS name (no wildcard). The port is 1-65535.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerAddr {
    host: ServerHost,
    port: u16,
}

impl utoipa::PartialSchema for ServerAddr {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "`host:port`: IPv4, `[IPv6]` or a DNS name, port 1-65535",
            ))
            .examples(["10.4.1.11:30080"])
            .into()
    }
}

impl ToSchema for ServerAddr {}

impl ServerAddr {
    pub fn host(&self) -> &ServerHost {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address when the host is an IP address (no resolver, no text).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            ServerHost::Ipv4(ip) => Some(SocketAddr::from((ip, self.port))),
            ServerHost::Ipv6(ip) => Some(SocketAddr::from((ip, self.port))),
            ServerHost::Name(_) => None,
        }
    }

    /// The host as text, without brackets (what a resolver or SNI wants).
    pub fn host_str(&self) -> String {
        match &self.host {
            ServerHost::Ipv4(ip) => ip.to_string(),
            ServerHost::Ipv6(ip) => ip.to_string(),
            ServerHost::Name(n) => n.to_string(),
        }
    }
}

impl FromStr for ServerAddr {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        let (host, port) = s.rsplit_once(':').ok_or(NameError::MissingPort)?;
        let port_num: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0 && !port.starts_with('+'))
            .ok_or_else(|| NameError::BadPort {
                port: port.to_owned(),
            })?;
        let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            ServerHost::Ipv6(inner.parse().map_err(|_| NameError::BadIpv6 {
                host: inner.to_owned(),
            })?)
        } else if host.contains(':') {
            // An unbracketed IPv6 address: its port cannot be told apart.
            return Err(NameError::BadIpv6 {
                host: host.to_owned(),
            });
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            ServerHost::Ipv4(ip)
        } else {
            let name: Hostname = host.parse()?;
            if name.is_wildcard() {
                return Err(NameError::MisplacedWildcard);
            }
            ServerHost::Name(name)
        };
        Ok(ServerAddr {
            host,
            port: port_num,
        })
    }
}

impl TryFrom<String> for ServerAddr {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ServerAddr> for String {
    fn from(a: ServerAddr) -> String {
        a.to_string()
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            ServerHost::Ipv4(ip) => write!(f, "{ip}:{}", self.port),
            ServerHost::Ipv6(ip) => write!(f, "[{ip}]:{}", self.port),
            ServerHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// A committed configuration version: 1, 2, 3, ... (0 is never committed).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(try_from = "u64", into = "u64")]
#[schema(value_type = u64, example = 7)]
pub struct ConfigVersion(u64);

/// A version number of 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration versions start at 1")]
pub struct ZeroVersion;

impl ConfigVersion {
    pub const FIRST: ConfigVersion = ConfigVersion(1);

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn next(self) -> ConfigVersion {
        ConfigVersion(self.0 + 1)
    }
}

impl TryFrom<u64> for ConfigVersion {
    type Error = ZeroVersion;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        if v == 0 {
            Err(ZeroVersion)
        } else {
            Ok(ConfigVersion(v))
        }
    }
}

impl From<ConfigVersion> for u64 {
    fn from(v: ConfigVersion) -> u64 {
        v.0
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests;
