//! Follows an HTTP/1.1 client's request stream in its raw bytes, head by head, to notice a
//! request head that carries both `Content-Length` and `Transfer-Encoding`.
//!
//! Such a request is the shape of request smuggling: two parsers may frame its body
//! differently. hyper reads the body as chunked, removes `Content-Length` and closes the
//! connection afterwards (RFC 9112 section 6.3 allows that), but its service never learns that
//! the header was there. Sluice refuses the request with 400 instead, as HAProxy does, so the
//! scan happens below hyper: [`crate::idle::HeadDeadline`] feeds it every byte it reads.
//!
//! To find every head, pipelined ones and several in one read included, the scan follows each
//! request's body framing (RFC 9112 section 6): a `Content-Length` body is skipped by count, a
//! chunked one by its chunk sizes (trailers included), a request with neither has no body.
//! Where it cannot be sure how hyper frames the bytes that follow (a malformed or disagreeing
//! length, a last coding other than `chunked`, a malformed chunk or header line, an `Upgrade` or
//! `CONNECT`, after which the bytes may be another protocol) it stops: it never reports a head
//! it is not sure is one. Each of those requests hyper refuses, closes after, or hands over.
//!
//! Cheap: per header line one `memchr2` for the colon and, only for names of the lengths that
//! matter, a case-insensitive compare; values are kept only for the two length fields. Body
//! bytes of known length are skipped by count.

/// The longest name compared (`transfer-encoding`).
const NAME_MAX: usize = 17;
/// The longest length-field value kept; a longer one stops the scan after its head.
const VALUE_MAX: usize = 64;
/// The request-line bytes kept: enough for `CONNECT `.
const METHOD_MAX: usize = 8;

/// A header field the scan cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
}

/// Where in the stream the scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Between requests: empty lines are skipped (as httparse does) until a request line.
    BeforeHead,
    /// In a request line.
    RequestLine,
    /// At a header line's name.
    Name,
    /// In the value of a length field.
    Value(Field),
    /// In a header line that does not matter, up to its end.
    SkipLine,
    /// In a body of known length: the bytes left.
    Sized(u64),
    /// In a chunk-size line: the size so far and whether it has a digit.
    ChunkSize(u64, bool),
    /// After a chunk size: its extensions (or whitespace) up to the line's end.
    ChunkExt(u64),
    /// A chunk-size line's CR was seen; its LF must follow.
    ChunkSizeLf(u64),
    /// In a chunk's data: the bytes left.
    ChunkData(u64),
    /// After a chunk's data: its CR, then its LF.
    ChunkDataCr,
    ChunkDataLf,
    /// At the start of a trailer line (or of the empty line that ends the body).
    TrailerStart,
    /// The empty line's CR was seen.
    TrailerLf,
    /// In a trailer line, up to its end.
    TrailerSkip,
    /// Unsure of the framing from here on: nothing more is scanned.
    Stopped,
}

/// What one head carries, so far.
#[derive(Debug, Default)]
struct Head {
    content_length: bool,
    transfer_encoding: bool,
    /// The value of every `Content-Length`, when they agree and parse.
    length: Option<u64>,
    /// The last `Transfer-Encoding` ends in `chunked`.
    chunked: bool,
    /// An `Upgrade` field, a `CONNECT`, a length that does not parse or disagrees, or a value
    /// too long to keep: the scan stops after this head.
    unsure: bool,
}

/// Scans one HTTP/1.1 client stream, fed in pieces as it is read.
#[derive(Debug)]
pub struct RequestScan {
    at: At,
    /// Heads begun so far.
    heads: u64,
    /// The first head (counted from 1) with both length fields.
    conflict: Option<u64>,
    head: Head,
    /// The current line's kept bytes: the name (or the start of the request line), then a
    /// length field's value.
    kept: [u8; VALUE_MAX],
    kept_len: usize,
    /// The current line's name is longer than any compared.
    long: bool,
}

impl Default for RequestScan {
    fn default() -> Self {
        RequestScan {
            at: At::BeforeHead,
            heads: 0,
            conflict: None,
            head: Head::default(),
            kept: [0; VALUE_MAX],
            kept_len: 0,
            long: false,
        }
    }
}

impl RequestScan {
    /// The first head with both `Content-Length` and `Transfer-Encoding`, counted from 1 in
    /// the order the heads came: the request hyper hands over as that one.
    pub fn conflict(&self) -> Option<u64> {
        self.conflict
    }

    /// The scan looks at nothing more: a conflicting head was found (the connection closes
    /// after its answer), or the scan is unsure of the framing from here on.
    pub fn stopped(&self) -> bool {
        self.at == At::Stopped
    }

    /// The next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            data = match self.at {
                At::Stopped => return,
                At::BeforeHead => match data.iter().position(|&b| b != b'\r' && b != b'\n') {
                    None => return,
                    Some(at) => {
                        self.heads += 1;
                        self.head = Head::default();
                        self.at = At::RequestLine;
                        self.kept_len = 0;
                        &data[at..]
                    }
                },
                At::RequestLine => {
                    let eol = memchr::memchr(b'\n', data);
                    let line = &data[..eol.unwrap_or(data.len())];
                    let room = (METHOD_MAX - self.kept_len.min(METHOD_MAX)).min(line.len());
                    self.keep(&line[..room]);
                    let Some(eol) = eol else { return };
                    if self.kept[..self.kept_len].starts_with(b"CONNECT ") {
                        self.head.unsure = true;
                    }
                    self.start_line(At::Name);
                    &data[eol + 1..]
                }
                At::Name => {
                    let Some(at) = memchr::memchr2(b':', b'\n', data) else {
                        self.keep_name(data);
                        return;
                    };
                    self.keep_name(&data[..at]);
                    if data[at] == b'\n' {
                        self.line_without_colon();
                    } else {
                        self.name_ended();
                    }
                    &data[at + 1..]
                }
                At::Value(field) => {
                    let eol = memchr::memchr(b'\n', data);
                    let part = &data[..eol.unwrap_or(data.len())];
                    if self.kept_len + part.len() > VALUE_MAX {
                        self.head.unsure = true;
                        self.kept_len = VALUE_MAX;
                    } else {
                        self.keep(part);
                    }
                    let Some(eol) = eol else { return };
                    self.value_ended(field);
                    self.start_line(At::Name);
                    &data[eol + 1..]
                }
                At::SkipLine => {
                    let Some(eol) = memchr::memchr(b'\n', data) else {
                        return;
                    };
                    self.start_line(At::Name);
                    &data[eol + 1..]
                }
                At::Sized(left) => {
                    let (rest, left) = skip(data, left);
                    self.at = match left {
                        0 => At::BeforeHead,
                        left => At::Sized(left),
                    };
                    rest
                }
                At::ChunkData(left) => {
                    let (rest, left) = skip(data, left);
                    self.at = match left {
                        0 => At::ChunkDataCr,
                        left => At::ChunkData(left),
                    };
                    rest
                }
                At::TrailerSkip => {
                    let Some(eol) = memchr::memchr(b'\n', data) else {
                        return;
                    };
                    self.at = At::TrailerStart;
                    &data[eol + 1..]
                }
                At::ChunkExt(size) => {
                    let Some(eol) = memchr::memchr(b'\n', data) else {
                        return;
                    };
                    self.chunk_size_ended(size);
                    &data[eol + 1..]
                }
                _ => {
                    self.chunk_byte(data[0]);
                    &data[1..]
                }
            };
        }
    }

    /// One byte of chunked framing outside a chunk's data.
    fn chunk_byte(&mut self, b: u8) {
        self.at = match (self.at, b) {
            (At::ChunkSize(size, _), _) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                match size.checked_mul(16) {
                    Some(size) => At::ChunkSize(size + digit, true),
                    None => At::Stopped,
                }
            }
            (At::ChunkSize(size, true), b' ' | b'\t' | b';') => At::ChunkExt(size),
            (At::ChunkSize(size, true), b'\r') => At::ChunkSizeLf(size),
            (At::ChunkSizeLf(size), b'\n') => {
                self.chunk_size_ended(size);
                return;
            }
            (At::ChunkDataCr, b'\r') => At::ChunkDataLf,
            (At::ChunkDataLf, b'\n') => At::ChunkSize(0, false),
            (At::TrailerStart, b'\r') => At::TrailerLf,
            (At::TrailerStart | At::TrailerLf, b'\n') => At::BeforeHead,
            (At::TrailerStart, _) => At::TrailerSkip,
            _ => At::Stopped,
        };
    }

    /// A chunk-size line has ended.
    fn chunk_size_ended(&mut self, size: u64) {
        self.at = if size == 0 {
            At::TrailerStart
        } else {
            At::ChunkData(size)
        };
    }

    /// A line without a colon: the empty one ends the head; anything else is malformed,
    /// which hyper refuses on its own.
    fn line_without_colon(&mut self) {
        let empty = !self.long && matches!(&self.kept[..self.kept_len], [] | [b'\r']);
        if empty {
            self.head_ended();
        } else {
            self.at = At::Stopped;
        }
    }

    /// A header name has ended at its colon.
    fn name_ended(&mut self) {
        let name = &self.kept[..self.kept_len];
        let next = if self.long {
            At::SkipLine
        } else if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_length = true;
            At::Value(Field::ContentLength)
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encoding = true;
            At::Value(Field::TransferEncoding)
        } else {
            if name.eq_ignore_ascii_case(b"upgrade") {
                self.head.unsure = true;
            }
            At::SkipLine
        };
        self.start_line(next);
    }

    /// A length field's value has ended (kept whole unless the head is already unsure).
    fn value_ended(&mut self, field: Field) {
        if self.head.unsure {
            return;
        }
        let value = &self.kept[..self.kept_len];
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        match field {
            Field::ContentLength => {
                for part in value.split(|&b| b == b',') {
                    match (parse_length(part.trim_ascii()), self.head.length) {
                        (Some(n), None) => self.head.length = Some(n),
                        (Some(n), Some(m)) if n == m => {}
                        _ => self.head.unsure = true,
                    }
                }
            }
            Field::TransferEncoding => {
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                self.head.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        }
    }

    /// The empty line ended the head: what follows is its body, if any.
    fn head_ended(&mut self) {
        let head = &self.head;
        self.at = if head.content_length && head.transfer_encoding {
            // Refused, and the connection closed after the answer: nothing more to scan.
            self.conflict.get_or_insert(self.heads);
            At::Stopped
        } else if head.unsure {
            At::Stopped
        } else if head.transfer_encoding {
            if head.chunked {
                At::ChunkSize(0, false)
            } else {
                At::Stopped
            }
        } else {
            match head.length {
                Some(n) if n > 0 => At::Sized(n),
                _ => At::BeforeHead,
            }
        };
    }

    /// Keep a piece of a header name; a name too long for any compare is only marked long.
    fn keep_name(&mut self, part: &[u8]) {
        if self.long || self.kept_len + part.len() > NAME_MAX {
            self.long = true;
        } else {
            self.keep(part);
        }
    }

    fn keep(&mut self, part: &[u8]) {
        self.kept[self.kept_len..self.kept_len + part.len()].copy_from_slice(part);
        self.kept_len += part.len();
    }

    fn start_line(&mut self, at: At) {
        self.at = at;
        self.kept_len = 0;
        self.long = false;
    }
}

/// Skips up to `left` bytes of `data`: the bytes after them, and how many are still to skip.
fn skip(data: &[u8], left: u64) -> (&[u8], u64) {
    let n = left.min(data.len() as u64);
    (&data[n as usize..], left - n)
}

/// A `Content-Length` value: digits only, as hyper accepts it.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scan `stream` cut into pieces of every size from 1 byte to whole, and expect the same
    /// (first conflicting head, stopped) each time.
    fn expect_every_cut(stream: &[u8], expected: (Option<u64>, bool)) {
        for step in 1..=stream.len() {
            let mut s = RequestScan::default();
            for piece in stream.chunks(step) {
                s.feed(piece);
            }
            assert_eq!(
                (s.conflict(), s.stopped()),
                expected,
                "step {step}: {}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    const SMUGGLED: &[u8] =
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn both_fields_are_seen_in_either_order_and_any_case_however_the_bytes_are_cut() {
        let heads: [&[u8]; 3] = [
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nhost: a\r\nCONTENT-LENGTH: 5\r\n\r\n",
            b"POST / HTTP/1.1\nTransfer-Encoding: chunked\nContent-length: 5\n\n",
        ];
        for head in heads {
            expect_every_cut(head, (Some(1), true));
        }
    }

    #[test]
    fn one_field_alone_or_a_lookalike_name_is_not_both() {
        let heads: [&[u8]; 5] = [
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length-X: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            // The names inside a value or the request line are not fields.
            b"POST /Content-Length: HTTP/1.1\r\nX: Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ];
        for head in heads {
            expect_every_cut(head, (None, false));
        }
    }

    #[test]
    fn pipelined_heads_are_found_after_bodies_of_every_framing() {
        // Before each smuggling-shaped head: a request without a body, one sized, one chunked
        // (with an extension, a trailer and the field names inside the data), and empty
        // lines between requests (which httparse skips).
        let mut stream = Vec::new();
        stream.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n");
        stream.extend_from_slice(b"POST /s HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello");
        stream.extend_from_slice(
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              1f;ext=1\r\nContent-Length: 1\r\nTransfer-Enc\r\n\
              A\r\nContent-Le\r\n0\r\nContent-Length: 3\r\n\r\n",
        );
        let before = stream.clone();
        expect_every_cut(&before, (None, false));
        stream.extend_from_slice(SMUGGLED);
        stream.extend_from_slice(SMUGGLED);
        expect_every_cut(&stream, (Some(4), true));
    }

    #[test]
    fn a_body_that_looks_like_a_head_is_skipped() {
        let mut stream = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            SMUGGLED.len()
        )
        .into_bytes();
        stream.extend_from_slice(SMUGGLED);
        expect_every_cut(&stream, (None, false));
        stream.extend_from_slice(SMUGGLED);
        expect_every_cut(&stream, (Some(2), true));
    }

    #[test]
    fn unsure_framing_stops_the_scan_before_any_later_head() {
        let unsure: [&[u8]; 8] = [
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ];
        for head in unsure {
            let mut stream = head.to_vec();
            stream.extend_from_slice(SMUGGLED);
            expect_every_cut(&stream, (None, true));
        }
        // A value too long to keep.
        let mut stream = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: {}chunked\r\n\r\n0\r\n\r\n",
            "identity, ".repeat(8)
        )
        .into_bytes();
        stream.extend_from_slice(SMUGGLED);
        expect_every_cut(&stream, (None, true));
    }

    /// A small deterministic generator (xorshift64*), for the randomized test below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Body bytes that look like the framing the scan looks for.
    const TRICKY: &[u8] =
        b"\r\n0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    /// One request of random framing (no body, sized, chunked with extensions and trailers),
    /// its body drawn from [`TRICKY`] and letters.
    fn random_request(rng: &mut Rng, out: &mut Vec<u8>) {
        let body = |rng: &mut Rng, len: u64| -> Vec<u8> {
            (0..len)
                .map(|_| match rng.below(3) {
                    0 => b'a' + rng.below(26) as u8,
                    _ => TRICKY[rng.below(TRICKY.len() as u64) as usize],
                })
                .collect()
        };
        match rng.below(3) {
            0 => out.extend_from_slice(b"GET /a HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"),
            1 => {
                let len = rng.below(300);
                let data = body(rng, len);
                out.extend_from_slice(
                    format!("PUT /s HTTP/1.1\r\ncontent-length: {}\r\n\r\n", data.len()).as_bytes(),
                );
                out.extend_from_slice(&data);
            }
            _ => {
                out.extend_from_slice(
                    b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: a\r\n\r\n",
                );
                for _ in 0..rng.below(4) {
                    let len = 1 + rng.below(200);
                    let data = body(rng, len);
                    let ext = if rng.below(2) == 0 { "" } else { ";name=value" };
                    out.extend_from_slice(format!("{:X}{ext}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                if rng.below(2) == 0 {
                    out.extend_from_slice(b"Content-Length: 9\r\nX-Trailer: 1\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    #[test]
    fn random_pipelines_cut_at_random_points_find_exactly_the_conflicting_head() {
        let mut rng = Rng(0x5eed_1e55_c0ff_ee01);
        for _ in 0..500 {
            let requests = 1 + rng.below(6);
            // The conflicting head's place (counted from 1), or none.
            let conflict = rng.below(requests + 2);
            let conflict = (conflict >= 1 && conflict <= requests).then_some(conflict);
            let mut stream = Vec::new();
            for n in 1..=requests {
                if Some(n) == conflict {
                    stream.extend_from_slice(SMUGGLED);
                } else {
                    random_request(&mut rng, &mut stream);
                }
            }
            let mut s = RequestScan::default();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let cut = 1 + rng.below(rest.len() as u64) as usize;
                s.feed(&rest[..cut]);
                rest = &rest[cut..];
            }
            assert_eq!(
                (s.conflict(), s.stopped()),
                (conflict, conflict.is_some()),
                "{}",
                String::from_utf8_lossy(&stream)
            );
        }
    }

    #[test]
    fn an_unfinished_stream_waits_for_more() {
        let mut s = RequestScan::default();
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Enc");
        assert_eq!(s.conflict(), None);
        s.feed(b"oding: chunked\r\n");
        assert_eq!(s.conflict(), None, "the head has not ended");
        s.feed(b"\r\n");
        assert_eq!(s.conflict(), Some(1));
    }
}
