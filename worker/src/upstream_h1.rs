//! HTTP/1.1 to `http` backends for requests without a body, driven in the request's own task.
//!
//! Most requests a proxy carries (GET, HEAD) have no body, and for them an exchange is strictly
//! one way then the other: write the head, read the response head, stream the response body.
//! Doing that in the request's task, on a connection it owns for the exchange, saves what a
//! hyper client connection costs per request (a dispatcher task woken twice, a request
//! channel, a response channel, a body channel). Requests with a body and protocol upgrades go
//! through hyper's client (`terminate.rs`), which writes and reads at the same time.
//!
//! Parsing is httparse's; this module adds the framing rules of RFC 9112 section 6: no body
//! for HEAD, 1xx, 204 and 304; chunked when `Transfer-Encoding` ends in `chunked` (then any
//! `Content-Length` is dropped and the connection not reused); one `Content-Length` value (a
//! response with two different ones is refused); else the body runs until the server closes.
//! Informational responses are skipped, a 101 is refused (no upgrade was asked for). A
//! connection goes back to the pool only after a whole response with nothing behind it, when
//! neither side asked to close it.

use std::future::{poll_fn, Future};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;

use crate::pool::{Pool, PoolKey};
use crate::terminate::BoxError;

/// Largest response head (status line and headers), and largest trailer section.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or trailer section.
const MAX_FIELDS: usize = 128;
/// Longest chunk-size line (size and chunk extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed or closed before any byte of a response arrived: the server
    /// answered nothing, so an idempotent request may be sent again.
    #[error("{0}")]
    Closed(String),
    /// The response broke off, or is malformed or too large.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

/// An HTTP/1.1 connection to a server, idle or in one exchange.
pub struct Conn {
    io: TcpStream,
    /// Received bytes not consumed yet.
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    out: Vec<u8>,
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// A response head, how its body is framed, and whether the connection can be reused after it.
#[derive(Debug)]
pub struct Head {
    pub parts: http::response::Parts,
    pub framing: Framing,
    pub keep_alive: bool,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
        }
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor
    /// sent anything unasked. Costs a read only when the socket was reported readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Write the head of a request without a body: origin form, with `fields` (the request's
    /// headers as forwarded: hop-by-hop ones removed, the forwarding rules applied).
    pub async fn send<'h>(
        &mut self,
        req: &http::request::Parts,
        fields: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    ) -> Result<(), Error> {
        self.out.clear();
        encode_head(req, fields, &mut self.out);
        self.io
            .write_all(&self.out)
            .await
            .map_err(|e| Error::Closed(format!("writing the request: {e}")))
    }

    /// Read the response head to a request made with `method` (informational responses are
    /// skipped).
    pub async fn head(&mut self, method: &Method) -> Result<Head, Error> {
        let mut received = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, method)? {
                    Some(Parsed::Final(head)) => return Ok(head),
                    Some(Parsed::Informational) => continue,
                    None if self.buf.len() > MAX_HEAD => {
                        return Err(invalid("response head too large"))
                    }
                    None => {}
                }
            }
            self.buf.reserve(READ_SIZE);
            let read = poll_fn(|cx| poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)).await;
            match read {
                Ok(0) | Err(_) if !received => {
                    let why = read.err().map_or_else(
                        || "connection closed before any response".to_owned(),
                        |e| format!("reading the response: {e}"),
                    );
                    return Err(Error::Closed(why));
                }
                Ok(0) => return Err(invalid("connection closed in the response head")),
                Err(e) => return Err(invalid(format!("reading the response: {e}"))),
                Ok(_) => received = true,
            }
        }
    }
}

/// The request line and headers, in origin form (plus `Connection: te` when `TE` is sent).
fn encode_head<'h>(
    req: &http::request::Parts,
    fields: impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    out: &mut Vec<u8>,
) {
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut te = false;
    for (name, value) in fields {
        te |= name == http::header::TE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // TE applies to this hop only: its sender names it in `Connection` (RFC 9110 10.1.4).
    if te {
        out.extend_from_slice(b"connection: te\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

enum Parsed {
    Final(Head),
    /// A 1xx response, consumed.
    Informational,
}

/// Where `part`, a slice httparse took from `base`, lies in it (`None` if it does not).
fn range_in(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    if part.is_empty() {
        return Some(0..0);
    }
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// Parse a response head from the front of `buf`; `None`: not complete yet.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(format!("malformed response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(invalid(
                "101 Switching Protocols to a request without an upgrade",
            ));
        }
        buf.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid status code"))?;
    // Header values are slices of the head, shared rather than copied. Where each name and
    // value lies is noted first (one allocation of the right size), the values are cut once
    // the head is split off.
    let mut spans = Vec::with_capacity(resp.headers.len());
    // Connection-level fields are dropped here rather than copied into the map and removed
    // after (nearly every response has `Connection: keep-alive`). `Transfer-Encoding` stays for
    // the framing below, as does a `Connection` naming other fields (the caller's hop-by-hop
    // rule removes those).
    let mut close = false;
    for h in resp.headers.iter() {
        match connection_level(h.name) {
            Some(ConnectionLevel::Connection) => {
                let mut other = false;
                for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && connection_level_bytes(token).is_none() {
                        other = true;
                    }
                }
                if !other {
                    continue;
                }
            }
            Some(ConnectionLevel::Other) => continue,
            None => {}
        }
        let outside = || invalid("header field outside the head");
        spans.push((
            range_in(buf, h.name.as_bytes()).ok_or_else(outside)?,
            range_in(buf, h.value).ok_or_else(outside)?,
        ));
    }
    // Shared, not copied: copying small pieces to keep the read buffer unshared cost more
    // instructions per response than it saved (measured with bench/instructions).
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, value) in spans {
        let name = HeaderName::from_bytes(&head[name.clone()]).map_err(|_| {
            invalid(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(&head[name])
            ))
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| invalid(format!("invalid value of header {name}")))?;
        headers.append(name, value);
    }
    let (framing, mut keep_alive) = framing(method, status, &headers)?;
    keep_alive &= version == Version::HTTP_11 && !close;
    if headers.contains_key(TRANSFER_ENCODING) {
        // Transfer-Encoding overrides Content-Length (RFC 9112 6.3), which is not passed on.
        headers.remove(CONTENT_LENGTH);
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Ok(Some(Parsed::Final(Head {
        parts,
        framing,
        keep_alive,
    })))
}

/// A response field that describes the connection, not the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectionLevel {
    Connection,
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Upgrade` (on a final response).
    Other,
}

/// Whether `name` (any case) is a connection-level field other than `Transfer-Encoding`.
fn connection_level(name: &str) -> Option<ConnectionLevel> {
    connection_level_bytes(name.as_bytes())
}

fn connection_level_bytes(name: &[u8]) -> Option<ConnectionLevel> {
    // By length first: most names are ruled out without comparing.
    let is = |known: &[u8]| name.len() == known.len() && name.eq_ignore_ascii_case(known);
    match name.len() {
        10 if is(b"connection") => Some(ConnectionLevel::Connection),
        10 if is(b"keep-alive") => Some(ConnectionLevel::Other),
        16 if is(b"proxy-connection") => Some(ConnectionLevel::Other),
        2 if is(b"te") => Some(ConnectionLevel::Other),
        7 if is(b"upgrade") => Some(ConnectionLevel::Other),
        _ => None,
    }
}

/// The body framing of a response (RFC 9112 6.3), and whether the framing allows reusing the
/// connection after it.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<(Framing, bool), Error> {
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        let chunked = last.is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        // With a Content-Length too the message was framed twice: not trusted for another one.
        let reuse = chunked && !headers.contains_key(CONTENT_LENGTH);
        return Ok((
            if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            },
            reuse,
        ));
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii())
                .ok_or_else(|| invalid("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Where in the response body the reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes left (`Content-Length`).
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: this many bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    /// Until the server closes.
    Close,
    Done,
}

/// A response body read straight from the connection; the connection goes back to the pool
/// (when reusable) as soon as the body's last byte has been read.
pub struct UpBody {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    back: Option<(Arc<Pool<Conn>>, PoolKey)>,
    /// Longest wait for the next byte of the body.
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait for bytes began (`None`: the last read made progress; the clock
    /// is read only when the socket has nothing, not per read).
    waiting_since: Option<Instant>,
}

impl UpBody {
    pub fn new(
        conn: Conn,
        head: &Head,
        back: Option<(Arc<Pool<Conn>>, PoolKey)>,
        idle: Duration,
    ) -> UpBody {
        let state = match head.framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        let mut body = UpBody {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            back,
            idle,
            timer: None,
            waiting_since: None,
        };
        if state == State::Length(0) {
            body.finish();
        }
        body
    }

    /// The body has been read whole: the connection goes back if it can serve another request
    /// (nothing after the response, no `close`).
    fn finish(&mut self) {
        self.state = State::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some((pool, key)), true) = (conn, self.back.take(), self.keep_alive) {
            if conn.buf.is_empty() {
                pool.insert(key, conn);
            }
        }
    }

    /// One step of decoding from the buffered bytes: a frame, the end, or `None` when more
    /// bytes are needed.
    fn decode(&mut self) -> Result<Option<Option<Frame<Bytes>>>, Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(None));
        };
        let buf = &mut conn.buf;
        match self.state {
            State::Done => Ok(Some(None)),
            State::Length(0) => {
                self.finish();
                Ok(Some(None))
            }
            State::Length(left) | State::ChunkData(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(n).freeze();
                let left = left - n as u64;
                match self.state {
                    State::Length(_) if left == 0 => self.finish(),
                    State::Length(_) => self.state = State::Length(left),
                    _ if left == 0 => self.state = State::ChunkEnd,
                    _ => self.state = State::ChunkData(left),
                }
                Ok(Some(Some(Frame::data(data))))
            }
            State::Close => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let data = buf.split().freeze();
                Ok(Some(Some(Frame::data(data))))
            }
            State::ChunkEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                self.state = State::ChunkSize;
                self.decode()
            }
            State::ChunkSize => {
                let Some(end) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(invalid("chunk-size line too long"));
                    }
                    return Ok(None);
                };
                if end > MAX_CHUNK_LINE {
                    return Err(invalid("chunk-size line too long"));
                }
                let size = parse_chunk_size(&buf[..=end])?;
                buf.advance(end + 1);
                self.state = if size == 0 {
                    State::Trailers
                } else {
                    State::ChunkData(size)
                };
                self.decode()
            }
            State::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    self.finish();
                    return Ok(Some(None));
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes())
                                .map_err(|_| invalid("invalid trailer name"))?;
                            let value = HeaderValue::from_bytes(f.value)
                                .map_err(|_| invalid("invalid trailer value"))?;
                            trailers.append(name, value);
                        }
                        buf.advance(len);
                        self.finish();
                        Ok(Some(Some(Frame::trailers(trailers))))
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                        Err(invalid("trailer section too large"))
                    }
                    Ok(httparse::Status::Partial) => Ok(None),
                    Err(e) => Err(invalid(format!("malformed trailers: {e}"))),
                }
            }
        }
    }

    /// The body cannot go on: the connection is closed (dropped) and the error ends the body.
    fn fail(&mut self, error: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(error)))
    }

    /// Wait for the body's next bytes no longer than the idle time since the last read.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let since = *self.waiting_since.get_or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::from_std(since + self.idle);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }
}

/// The size of a chunk-size line (`HEX[;extensions]CRLF`); extensions are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| invalid("chunk-size line without CRLF"))?;
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if digits.is_empty() || digits.len() > 16 {
        return Err(invalid("invalid chunk size"));
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = char::from(d)
            .to_digit(16)
            .ok_or_else(|| invalid("invalid chunk size"))?;
        Ok(n << 4 | u64::from(v))
    })
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(frame.map(Ok)),
                Ok(None) => {}
                Err(e) => return this.fail(e.into()),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_SIZE);
            match poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Ready(Ok(0)) if this.state == State::Close => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail("upstream closed the connection mid-body".into())
                }
                Poll::Ready(Ok(_)) => this.waiting_since = None,
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Pending if this.poll_idle(cx).is_ready() => {
                    return this.fail("upstream body idle timeout".into())
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that reads one request head, answers with `pieces` written one by one, then
    /// closes when `close` is set; returns the client connection and the head it received.
    async fn serve(
        pieces: Vec<&'static [u8]>,
        close: bool,
    ) -> (Conn, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.expect("read") == 0 {
                    break;
                }
                got.push(b[0]);
            }
            for p in pieces {
                // The client may give up first (an oversized head): stop writing then.
                if s.write_all(p).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            if !close {
                // Hold the connection open until the client is done with it.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
            got
        });
        let io = TcpStream::connect(addr).await.expect("connect");
        (Conn::new(io), server)
    }

    fn request(method: Method, target: &str) -> http::request::Parts {
        let (mut parts, ()) = http::Request::builder()
            .method(method)
            .uri(target)
            .header("host", "app.test")
            .header("x-forwarded-for", "192.0.2.1")
            .body(())
            .expect("request")
            .into_parts();
        parts.version = Version::HTTP_2;
        parts
    }

    fn key() -> PoolKey {
        PoolKey {
            address: Arc::from("127.0.0.1:1"),
            tls: None,
        }
    }

    /// Send `req`, read the head, then the whole body: (head, data, trailers, pooled?).
    async fn exchange(
        mut conn: Conn,
        req: &http::request::Parts,
    ) -> Result<(Head, Vec<u8>, Option<HeaderMap>, usize), String> {
        conn.send(req, req.headers.iter())
            .await
            .map_err(|e| e.to_string())?;
        let head = conn.head(&req.method).await.map_err(|e| e.to_string())?;
        let pool = Arc::new(Pool::default());
        let mut body = UpBody::new(
            conn,
            &head,
            Some((pool.clone(), key())),
            Duration::from_secs(5),
        );
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        Ok((head, data, trailers, pool.idle_count()))
    }

    #[tokio::test]
    async fn sends_origin_form_and_reads_a_sized_body_then_pools_the_connection() {
        let (conn, server) = serve(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\nX-Empty:\r\n\r\nhel",
                b"lo",
            ],
            false,
        )
        .await;
        let req = request(Method::GET, "https://app.test/a/b?c=d");
        let (head, data, trailers, pooled) = exchange(conn, &req).await.expect("exchange");
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-a"], "b");
        assert_eq!(head.parts.headers["x-empty"], "");
        assert_eq!(head.framing, Framing::Length(5));
        assert_eq!(data, b"hello");
        assert!(trailers.is_none());
        assert_eq!(
            pooled, 1,
            "a whole keep-alive response returns its connection"
        );
        let sent = String::from_utf8(server.await.expect("server")).expect("utf8");
        assert_eq!(
            sent,
            "GET /a/b?c=d HTTP/1.1\r\nhost: app.test\r\nx-forwarded-for: 192.0.2.1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn chunked_body_and_trailers_written_a_byte_at_a_time() {
        const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n";
        let pieces = RESPONSE.chunks(1).collect();
        let (conn, _server) = serve(pieces, false).await;
        let (head, data, trailers, pooled) = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect("exchange");
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-checksum"], "abc");
        assert_eq!(pooled, 1);
    }

    #[tokio::test]
    async fn informational_responses_are_skipped() {
        let (conn, _server) = serve(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"],
            false,
        )
        .await;
        let (head, data, _, pooled) = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect("exchange");
        assert_eq!(head.parts.status, StatusCode::NO_CONTENT);
        assert!(data.is_empty());
        assert_eq!(pooled, 1);
    }

    #[tokio::test]
    async fn a_head_response_has_no_body_whatever_its_length_says() {
        let (conn, _server) = serve(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"],
            false,
        )
        .await;
        let (head, data, _, pooled) = exchange(conn, &request(Method::HEAD, "/"))
            .await
            .expect("exchange");
        assert_eq!(head.parts.headers["content-length"], "100");
        assert!(data.is_empty());
        assert_eq!(pooled, 1);
    }

    #[tokio::test]
    async fn a_body_without_length_runs_to_the_close_and_the_connection_is_not_kept() {
        let (conn, _server) = serve(vec![b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"], true).await;
        let (head, data, _, pooled) = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect("exchange");
        assert_eq!(head.framing, Framing::Close);
        assert_eq!(data, b"all of it");
        assert_eq!(pooled, 0);
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_not_kept() {
        for response in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ] {
            let (conn, _server) = serve(vec![response], false).await;
            let (_, data, _, pooled) = exchange(conn, &request(Method::GET, "/"))
                .await
                .expect("exchange");
            assert_eq!(data, b"ok");
            assert_eq!(pooled, 0, "{}", String::from_utf8_lossy(response));
        }
    }

    #[tokio::test]
    async fn chunked_wins_over_content_length_which_is_dropped() {
        let (conn, _server) = serve(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"],
            false,
        )
        .await;
        let (head, data, _, pooled) = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect("exchange");
        assert_eq!(data, b"abcd");
        assert!(!head.parts.headers.contains_key(CONTENT_LENGTH));
        assert_eq!(
            pooled, 0,
            "a doubly framed response is not trusted with another"
        );
    }

    #[tokio::test]
    async fn malformed_responses_are_refused_with_a_reason() {
        let cases: [(&'static [u8], &str); 5] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
                "conflicting Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "invalid Content-Length",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            (b"HTTP/1.1 200 OK\r\nX-A\r\n\r\n", "malformed response head"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
        ];
        for (response, why) in cases {
            let (conn, _server) = serve(vec![response], false).await;
            let err = exchange(conn, &request(Method::GET, "/"))
                .await
                .expect_err("refused");
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[tokio::test]
    async fn a_close_before_any_byte_is_closed_and_a_close_after_some_is_not() {
        let (mut conn, _server) = serve(vec![], true).await;
        let req = request(Method::GET, "/");
        conn.send(&req, req.headers.iter()).await.expect("send");
        assert!(matches!(
            conn.head(&Method::GET).await,
            Err(Error::Closed(_))
        ));
        let (mut conn, _server) = serve(vec![b"HTTP/1.1 200"], true).await;
        let req = request(Method::GET, "/");
        conn.send(&req, req.headers.iter()).await.expect("send");
        assert!(matches!(
            conn.head(&Method::GET).await,
            Err(Error::Invalid(_))
        ));
        let (conn, _server) = serve(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"],
            true,
        )
        .await;
        let err = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect_err("cut");
        assert!(err.contains("mid-body"), "{err}");
    }

    #[tokio::test]
    async fn a_body_that_stalls_ends_with_an_error_after_the_idle_time() {
        let (mut conn, _server) = serve(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
            false,
        )
        .await;
        let req = request(Method::GET, "/");
        conn.send(&req, req.headers.iter()).await.expect("send");
        let head = conn.head(&req.method).await.expect("head");
        let idle = Duration::from_millis(300);
        let mut body = UpBody::new(conn, &head, None, idle);
        let first = body.frame().await.expect("frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "abc");
        let waited = Instant::now();
        let err = body.frame().await.expect("frame").expect_err("stalled");
        assert!(err.to_string().contains("idle timeout"), "{err}");
        assert!(waited.elapsed() >= idle);
        assert!(body.frame().await.is_none(), "the body has ended");
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let big: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\nX-Big: "[..],
                &vec![b'a'; MAX_HEAD + 10],
            ]
            .concat()
            .into_boxed_slice(),
        );
        let (conn, _server) = serve(vec![big], false).await;
        let err = exchange(conn, &request(Method::GET, "/"))
            .await
            .expect_err("too large");
        assert!(err.contains("too large"), "{err}");
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_usable() {
        let (mut open, _keep) = serve(vec![], false).await;
        assert!(open.is_usable());
        let (mut closed, server) = serve(vec![], true).await;
        let req = request(Method::GET, "/");
        closed.send(&req, req.headers.iter()).await.expect("send");
        server.await.expect("server closed");
        // The close reaches the reactor first: wait until the socket reports it.
        closed.io.readable().await.expect("readable");
        assert!(!closed.is_usable());
    }

    /// The final head parsed from `raw`.
    fn final_head(raw: &[u8]) -> Head {
        let mut buf = BytesMut::from(raw);
        match parse_head(&mut buf, &Method::GET) {
            Ok(Some(Parsed::Final(head))) => head,
            _ => panic!("no final head in {raw:?}"),
        }
    }

    #[test]
    fn connection_level_fields_are_dropped_while_parsing() {
        let head = final_head(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKEEP-ALIVE: timeout=5\r\n\
              Proxy-Connection: x\r\nUpgrade: h2c\r\nTE: trailers\r\nX-Kept: 1\r\n\
              Content-Length: 0\r\n\r\n",
        );
        let names: Vec<&str> = head.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept", "content-length"]);
        assert!(head.keep_alive);
        // `close` in any case, in any Connection field, ends reuse.
        let head = final_head(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: upgrade, CLOSE\r\n\
              Content-Length: 0\r\n\r\n",
        );
        assert_eq!(head.parts.headers.len(), 1, "only Content-Length");
        assert!(!head.keep_alive);
        // A Connection field naming another field stays, for the hop-by-hop rule to apply.
        let mut head = final_head(
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\
              Content-Length: 0\r\n\r\n",
        );
        assert!(!head.keep_alive);
        crate::headers::strip_hop_by_hop(&mut head.parts.headers);
        let names: Vec<&str> = head.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-length"]);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a\r\n").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"FF;name=value\r\n").ok(), Some(255));
        assert!(parse_chunk_size(b"\r\n").is_err());
        assert!(parse_chunk_size(b"1a\n").is_err());
        assert!(
            parse_chunk_size(b"11111111111111111\r\n").is_err(),
            "overflow"
        );
        assert!(parse_chunk_size(b"+1\r\n").is_err());
    }
}
