//! Notices an HTTP/1.1 request head that carries both `Content-Length` and
//! `Transfer-Encoding`, from the raw bytes as they are read.
//!
//! Such a request is the shape of request smuggling: two parsers may frame its body
//! differently. hyper reads the body as chunked, removes `Content-Length` and closes the
//! connection afterwards (RFC 9112 section 6.3 allows that), but its service never learns that
//! the header was there. Sluice refuses the request with 400 instead, as HAProxy does, so the
//! scan happens below hyper: [`crate::idle::HeadDeadline`] feeds it the bytes of each head.
//!
//! Cheap: per header line one `memchr2` for the colon and, only for names of the two lengths
//! that matter, a case-insensitive compare. A line split across reads keeps at most the first
//! 17 bytes of its name.

/// The longest name compared (`transfer-encoding`).
const NAME_MAX: usize = 17;

/// Scans one request head, fed in pieces; [`LengthFields::reset`] for the next head.
#[derive(Debug)]
pub struct LengthFields {
    /// Inside a line whose name is decided (or the request line): skip to its end.
    skipping: bool,
    /// The part of the current line's name seen so far, when it was split across reads.
    name: [u8; NAME_MAX],
    name_len: usize,
    /// The name so far is longer than either of the two: skip the line once it ends.
    long: bool,
    content_length: bool,
    transfer_encoding: bool,
    /// The empty line that ends the head has been seen: later bytes are a body.
    ended: bool,
}

impl Default for LengthFields {
    fn default() -> Self {
        LengthFields {
            skipping: true,
            name: [0; NAME_MAX],
            name_len: 0,
            long: false,
            content_length: false,
            transfer_encoding: false,
            ended: false,
        }
    }
}

impl LengthFields {
    /// Start over for a new head.
    pub fn reset(&mut self) {
        *self = LengthFields::default();
    }

    /// Both fields were in the head so far.
    pub fn both(&self) -> bool {
        self.content_length && self.transfer_encoding
    }

    /// The head has ended (nothing more to scan until [`LengthFields::reset`]).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The next bytes of the head (anything after its end is ignored).
    pub fn feed(&mut self, mut data: &[u8]) {
        while !self.ended && !data.is_empty() {
            if self.skipping {
                let Some(eol) = memchr::memchr(b'\n', data) else {
                    return;
                };
                data = &data[eol + 1..];
                self.skipping = false;
                continue;
            }
            let Some(at) = memchr::memchr2(b':', b'\n', data) else {
                self.keep(data);
                return;
            };
            let (part, sep) = (&data[..at], data[at]);
            data = &data[at + 1..];
            if sep == b'\n' {
                // A line without a colon: the empty one (or a lone CR) ends the head; anything
                // else is malformed, which hyper refuses on its own.
                let empty = !self.long
                    && match (self.name_len, part) {
                        (0, []) | (0, [b'\r']) => true,
                        (1, []) => self.name[0] == b'\r',
                        _ => false,
                    };
                self.ended = empty;
                self.start_line();
                continue;
            }
            self.keep(part);
            if !self.long {
                let name = &self.name[..self.name_len];
                if name.eq_ignore_ascii_case(b"content-length") {
                    self.content_length = true;
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    self.transfer_encoding = true;
                }
            }
            self.start_line();
            self.skipping = true;
        }
    }

    fn keep(&mut self, part: &[u8]) {
        if self.long || self.name_len + part.len() > NAME_MAX {
            self.long = true;
            return;
        }
        self.name[self.name_len..self.name_len + part.len()].copy_from_slice(part);
        self.name_len += part.len();
    }

    fn start_line(&mut self) {
        self.name_len = 0;
        self.long = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scan `head` cut into pieces of every size from 1 byte to whole, and expect (both
    /// fields seen, head ended) each time.
    fn expect_every_cut(head: &[u8], expected: (bool, bool)) {
        for step in 1..=head.len() {
            let mut s = LengthFields::default();
            for piece in head.chunks(step) {
                s.feed(piece);
            }
            assert_eq!((s.both(), s.ended()), expected, "step {step}: {head:?}");
        }
    }

    #[test]
    fn both_fields_are_seen_in_either_order_and_any_case_however_the_bytes_are_cut() {
        let heads: [&[u8]; 3] = [
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nhost: a\r\nCONTENT-LENGTH: 5\r\n\r\n",
            b"POST / HTTP/1.1\nTransfer-Encoding: chunked\nContent-length: 5\n\n",
        ];
        for head in heads {
            expect_every_cut(head, (true, true));
        }
    }

    #[test]
    fn one_field_alone_or_a_lookalike_name_is_not_both() {
        let heads: [&[u8]; 5] = [
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length-X: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            // The names inside a value or the request line are not fields.
            b"POST /Content-Length: HTTP/1.1\r\nX: Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for head in heads {
            expect_every_cut(head, (false, true));
        }
    }

    #[test]
    fn a_body_after_the_head_is_not_scanned() {
        let req =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nContent-Length: 1\r\n0\r\n\r\n";
        expect_every_cut(req, (false, true));
    }

    #[test]
    fn an_unfinished_head_has_not_ended_and_reset_starts_over() {
        let mut s = LengthFields::default();
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Enc");
        assert!(!s.ended() && !s.both());
        s.feed(b"oding: chunked\r\n");
        assert!(s.both() && !s.ended());
        s.feed(b"\r\n");
        assert!(s.ended());
        s.reset();
        s.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(s.ended() && !s.both());
    }
}
