//! Header rules for terminated requests: hop-by-hop headers are dropped, `X-Forwarded-For` gets
//! the client address appended, `X-Forwarded-Proto`/`-Port`/`-Host` are overwritten (never
//! trusted from the client), `Host` is kept (and made from `:authority` for HTTP/2 clients),
//! then the host's own `request_headers` rules apply ([`Forward`]).

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, FORWARDED, HOST, TE, TRANSFER_ENCODING, UPGRADE,
};
use sluice_shared::RequestHeaders;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus
/// `proxy-connection`. (Names made once: this runs on every request and response.) `Trailer`
/// is not one of them: it declares the message's trailer fields end to end (RFC 9110 6.6.2),
/// and an HTTP/1.1 hop carries only the trailer fields it declares.
fn hop_by_hop() -> [&'static HeaderName; 6] {
    [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ]
}

/// Remove hop-by-hop headers, including every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at each name first: removing means hashing a name, and usually (HTTP/2, most
    // responses) there is nothing to remove, or only `Connection`.
    let hop = hop_by_hop();
    let mut present = [false; 6];
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `Connection: keep-alive` / `close` (nearly every HTTP/1.1 message that has the header)
    // lists only names removed below anyway: nothing to collect or allocate.
    let tokens = || {
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !hop_by_hop()
                        .iter()
                        .any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
    };
    if tokens().next().is_some() {
        let listed: Vec<HeaderName> = tokens()
            .filter_map(|t| HeaderName::from_bytes(t.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (name, present) in hop.into_iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// The forwarded-header values every request of one client connection shares, made once
/// per connection.
#[derive(Debug, Clone)]
pub struct ForwardedValues {
    /// The client address, as appended to `X-Forwarded-For`.
    client: HeaderValue,
    /// `X-Forwarded-Port`: the port clients reached us on.
    port: HeaderValue,
}

impl ForwardedValues {
    pub fn new(client: IpAddr, public_port: u16) -> ForwardedValues {
        ForwardedValues {
            client: HeaderValue::from_str(&client.to_string())
                .expect("an IP address is a valid header value"),
            port: HeaderValue::from(public_port),
        }
    }
}

/// What the forwarded headers say about a request.
#[derive(Debug, Clone)]
pub struct Forwarding<'a> {
    pub connection: &'a ForwardedValues,
    /// The host as the client sent it (`Host` or `:authority`, port included).
    pub host: &'a HeaderValue,
    pub rules: &'a RequestHeaders,
}

/// A request's fields as forwarded, decided once per request. The client's fields are kept
/// in its map, less hop-by-hop ones and those it may not set (`Forwarded`, `X-Real-IP`),
/// removed in place (rare); the fields forwarding replaces or adds are kept here. An upstream
/// HTTP/1.1 head is written straight from [`Forward::fields`] (no map insertions, and no growth
/// of the map h2 decoded the request into); the other upstream paths take the map rewritten
/// by [`Forward::apply`]. Both are the same list.
#[derive(Debug)]
pub struct Forward<'a> {
    host: &'a HeaderValue,
    /// `X-Forwarded-For`: the client's list with the client address appended.
    xff: Cow<'a, HeaderValue>,
    port: &'a HeaderValue,
    /// `TE: trailers` (after the rules: the backend may send trailers the client can take).
    te: bool,
    /// The host's rules, parsed (empty, so not allocated, for most hosts).
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
}

static HTTPS: HeaderValue = HeaderValue::from_static("https");
static TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
static HOST_NAME: HeaderName = HOST;
static TE_NAME: HeaderName = TE;

impl<'a> Forward<'a> {
    /// Strip what is never passed on from `headers`, and decide the forwarded fields
    /// (`te_trailers`: whether the backend is told it may send trailers).
    pub fn new(headers: &mut HeaderMap, f: &Forwarding<'a>, te_trailers: bool) -> Forward<'a> {
        strip_hop_by_hop(headers);
        let (mut forwarded, mut xff) = (false, false);
        for name in headers.keys() {
            forwarded |= name == FORWARDED || name == X_REAL_IP;
            xff |= name == X_FORWARDED_FOR;
        }
        if forwarded {
            headers.remove(FORWARDED);
            headers.remove(&X_REAL_IP);
        }
        let client = &f.connection.client;
        let xff = if xff {
            let mut earlier: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            earlier.push(client.to_str().unwrap_or_default());
            // Visible ASCII joined by ", " is a valid value; were it not, the client's list
            // would be dropped, never passed on unchecked.
            HeaderValue::from_str(&earlier.join(", ")).map_or(Cow::Borrowed(client), Cow::Owned)
        } else {
            Cow::Borrowed(client)
        };
        let rules = f.rules;
        Forward {
            host: f.host,
            xff,
            port: &f.connection.port,
            te: te_trailers,
            remove: rules
                .remove
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
            set: rules
                .set
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::from_bytes(n.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        }
    }

    /// Whether a rule removes or sets `name`.
    fn ruled(&self, name: &HeaderName) -> bool {
        self.remove.contains(name) || self.set.iter().any(|(n, _)| n == name)
    }

    /// Whether a field of the client's is replaced (or removed) on the way.
    fn replaces(&self, name: &HeaderName) -> bool {
        name == HOST
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_PORT
            || name == X_FORWARDED_HOST
            || (self.te && name == TE)
            || self.ruled(name)
    }

    /// `Host`, unless a rule removes or sets it: first, as RFC 9110 7.2 asks of clients.
    fn host(&self) -> Option<(&HeaderName, &HeaderValue)> {
        (!self.ruled(&HOST_NAME)).then_some((&HOST_NAME, self.host))
    }

    /// The fields forwarding adds after the client's: the four forwarded headers (those no
    /// rule removes or sets), the rules' values, then `TE: trailers` when asked.
    fn added(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_FOR, &*self.xff),
            (&X_FORWARDED_PROTO, &HTTPS),
            (&X_FORWARDED_PORT, self.port),
            (&X_FORWARDED_HOST, self.host),
        ]
        .into_iter()
        .filter(|(n, _)| !self.ruled(n))
        .chain(
            self.set
                .iter()
                .filter(|(n, _)| !(self.te && *n == TE))
                .map(|(n, v)| (n, v)),
        )
        .chain(self.te.then_some((&TE_NAME, &TRAILERS)))
    }

    /// The request's fields as forwarded: `Host`, the client's others less those replaced,
    /// then the added ones.
    pub fn fields<'m>(
        &'m self,
        headers: &'m HeaderMap,
    ) -> impl Iterator<Item = (&'m HeaderName, &'m HeaderValue)> {
        self.host()
            .into_iter()
            .chain(headers.iter().filter(|(n, _)| !self.replaces(n)))
            .chain(self.added())
    }

    /// Rewrite `headers` in place to hold [`Forward::fields`] (in another order: that of
    /// fields with different names carries no meaning). The added names are distinct, so
    /// inserting each replaces the client's; the rest of what `fields` leaves out are the
    /// rules' removals. (In place: rebuilding the map cost 1.5% more per request to an h2c backend.)
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (n, v) in self.host().into_iter().chain(self.added()) {
            headers.insert(n.clone(), v.clone());
        }
    }
}

/// The host name of a `Host`/`:authority` value: port removed, lower case, no trailing dot
/// (borrowed when the value is that already, as it mostly is).
pub fn host_name(authority: &str) -> Cow<'_, str> {
    let name = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    let name = name.trim_end_matches('.');
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward_request(h: &mut HeaderMap, f: &Forwarding<'_>) {
        Forward::new(h, f, false).apply(h)
    }

    fn pairs<'m>(fields: impl Iterator<Item = (&'m HeaderName, &'m HeaderValue)>) -> Vec<String> {
        fields
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect()
    }

    #[test]
    fn fields_replace_the_clients_and_add_each_forwarded_one_once() {
        let mut h = map(&[
            ("Host", "redmine.beerme"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("te", "trailers"),
            ("accept", "*/*"),
            ("cookie", "a=b"),
            ("x-env", "client"),
        ]);
        let mut rules = RequestHeaders::default();
        rules.set.insert("x-env".into(), "prod".into());
        rules.set.insert("te".into(), "gzip".into());
        rules.remove.push("X-Forwarded-Host".into());
        rules.remove.push("cookie".into());
        let values = ForwardedValues::new("192.0.2.7".parse().unwrap(), 443);
        let host = HeaderValue::from_static("redmine.beerme");
        let f = Forwarding {
            connection: &values,
            host: &host,
            rules: &rules,
        };
        let forward = Forward::new(&mut h, &f, true);
        let fields = pairs(forward.fields(&h));
        assert_eq!(
            fields,
            [
                "host: redmine.beerme",
                "accept: */*",
                "x-forwarded-for: 1.2.3.4, 192.0.2.7",
                "x-forwarded-proto: https",
                "x-forwarded-port: 443",
                "x-env: prod",
                "te: trailers",
            ],
            "the client's te went as hop-by-hop; the rules' te gives way to trailers"
        );
        // The map the other upstream paths take holds the same fields.
        let mut applied = h.clone();
        forward.apply(&mut applied);
        let (mut applied, mut fields) = (pairs(applied.iter()), fields);
        applied.sort();
        fields.sort();
        assert_eq!(applied, fields);
        // Without trailers, the rules' TE stands.
        let forward = Forward::new(&mut h, &f, false);
        assert!(pairs(forward.fields(&h)).contains(&"te: gzip".to_owned()));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn spoofed_forwarding_headers_are_overwritten_and_xff_appended() {
        let mut h = map(&[
            ("host", "redmine.beerme"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-port", "1"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let rules = RequestHeaders::default();
        forward_request(
            &mut h,
            &Forwarding {
                connection: &ForwardedValues::new("192.0.2.7".parse().unwrap(), 443),
                host: &HeaderValue::from_static("redmine.beerme"),
                rules: &rules,
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h["x-forwarded-host"], "redmine.beerme");
        assert_eq!(h["host"], "redmine.beerme");
        assert!(h.get("forwarded").is_none() && h.get("x-real-ip").is_none());
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut h = map(&[
            ("connection", "Keep-Alive, X-Secret"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("x-keep", "yes"),
            ("trailer", "x-checksum"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["trailer"], "x-checksum", "end to end, not hop by hop");
    }

    #[test]
    fn rules_apply_after_forwarding() {
        let mut rules = RequestHeaders::default();
        rules.set.insert("x-env".into(), "prod".into());
        rules.set.insert("x-forwarded-port".into(), "8443".into());
        rules.remove.push("cookie".into());
        let mut h = map(&[("cookie", "a=b")]);
        forward_request(
            &mut h,
            &Forwarding {
                connection: &ForwardedValues::new("::1".parse().unwrap(), 443),
                host: &HeaderValue::from_static("a.example:8443"),
                rules: &rules,
            },
        );
        assert_eq!(h["x-env"], "prod");
        assert_eq!(h["x-forwarded-port"], "8443");
        assert!(h.get("cookie").is_none());
        assert_eq!(h["host"], "a.example:8443");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("Redmine.Beerme:8443"), "redmine.beerme");
        assert_eq!(host_name("redmine.beerme."), "redmine.beerme");
        assert_eq!(host_name("[::1]:443"), "[::1]");
        assert_eq!(host_name("a.example"), "a.example");
        assert!(matches!(
            host_name("a.example:443"),
            Cow::Borrowed("a.example")
        ));
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("A.Example."), "a.example");
    }
}
