//! The ClientHello peek: find the SNI in the first bytes of a TLS connection without a TLS
//! stack, so the listener can choose between termination and passthrough before any byte is
//! consumed. A pure function over the bytes seen so far; the caller reads more on
//! [`Peek::NeedMore`] and forwards (or replays) exactly the bytes it read.
//!
//! It handles a ClientHello split over many TCP segments and over several TLS records, and
//! refuses anything longer than [`MAX_HELLO`] bytes. It never panics, whatever the input (a
//! property test feeds it mutated hellos and compares it with rustls).

/// Largest ClientHello (handshake message, header included) accepted.
pub const MAX_HELLO: usize = 64 * 1024;
/// Largest TLS plaintext record.
const MAX_RECORD: usize = 16 * 1024;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The ClientHello is not complete yet.
    NeedMore,
    /// A complete ClientHello naming this server (as sent; match it case-insensitively).
    Sni(String),
    /// A complete ClientHello without a server name.
    NoSni,
    /// Not a TLS handshake at all (plain HTTP, SSH, SSLv2, ...).
    NotTls,
    /// A TLS handshake that breaks the rules, or a hello over [`MAX_HELLO`].
    Malformed,
}

/// A cursor over bytes that reports running out instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| (b[0] as usize) << 8 | b[1] as usize)
    }

    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let len = match len_bytes {
            1 => self.u8()?,
            _ => self.u16()?,
        };
        self.take(len)
    }
}

/// Look at the first bytes of a connection.
pub fn peek(buf: &[u8]) -> Peek {
    if buf.is_empty() {
        return Peek::NeedMore;
    }
    if buf[0] != 0x16 || (buf.len() > 1 && buf[1] != 0x03) {
        return Peek::NotTls;
    }
    // The common case, a hello inside the first record, is parsed where it lies.
    if let Some(len) = buf.get(..5).and_then(record_len) {
        if let Gathered::Complete(body) = gathered(&buf[5..(5 + len).min(buf.len())]) {
            return parse_client_hello(body);
        }
    }
    // Gather handshake bytes from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        match gathered(&handshake) {
            Gathered::Complete(body) => return parse_client_hello(body),
            Gathered::Malformed => return Peek::Malformed,
            Gathered::Incomplete => {}
        }
        let Some(header) = buf.get(pos..pos + 5) else {
            return Peek::NeedMore;
        };
        let Some(len) = record_len(header) else {
            return Peek::Malformed;
        };
        let start = pos + 5;
        let end = (start + len).min(buf.len());
        handshake.extend_from_slice(&buf[start..end]);
        if end < start + len {
            // Partial record: enough if the hello is already complete inside it.
            return match gathered(&handshake) {
                Gathered::Complete(body) => parse_client_hello(body),
                Gathered::Malformed => Peek::Malformed,
                Gathered::Incomplete => Peek::NeedMore,
            };
        }
        pos = start + len;
    }
}

/// The length of a handshake record from its 5-byte header; `None` if the header is not a
/// handshake record's or the length is out of bounds.
fn record_len(header: &[u8]) -> Option<usize> {
    let len = (header[3] as usize) << 8 | header[4] as usize;
    (header[0] == 0x16 && header[1] == 0x03 && len != 0 && len <= MAX_RECORD).then_some(len)
}

/// What handshake bytes gathered so far hold.
enum Gathered<'a> {
    /// The ClientHello body (after the 4-byte handshake header), complete.
    Complete(&'a [u8]),
    Incomplete,
    /// Not a ClientHello, or one longer than the cap.
    Malformed,
}

fn gathered(handshake: &[u8]) -> Gathered<'_> {
    let Some(head) = handshake.get(..4) else {
        return Gathered::Incomplete;
    };
    let len = (head[1] as usize) << 16 | (head[2] as usize) << 8 | head[3] as usize;
    if head[0] != 0x01 || len + 4 > MAX_HELLO {
        return Gathered::Malformed;
    }
    match handshake.get(4..len + 4) {
        Some(body) => Gathered::Complete(body),
        None => Gathered::Incomplete,
    }
}

/// Parse a complete ClientHello body (after the 4-byte handshake header).
fn parse_client_hello(body: &[u8]) -> Peek {
    parse_body(body).unwrap_or(Peek::Malformed)
}

fn parse_body(body: &[u8]) -> Option<Peek> {
    let mut r = Reader { buf: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session_id = r.vec(1)?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec(2)?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec(1)?.is_empty() {
        return None; // compression methods
    }
    if r.buf.is_empty() {
        return Some(Peek::NoSni); // no extensions at all
    }
    let mut exts = Reader { buf: r.vec(2)? };
    if !r.buf.is_empty() {
        return None; // trailing bytes after the extensions
    }
    let mut seen = Seen::default();
    let mut sni = None;
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec(2)?;
        if !seen.insert(kind) {
            return None; // duplicate extension
        }
        if kind == 0 {
            sni = Some(parse_server_name(data)?);
        }
    }
    Some(match sni {
        Some(Some(name)) => Peek::Sni(name),
        _ => Peek::NoSni,
    })
}

/// The extension types met in a hello, to refuse duplicates as rustls does. Real hellos carry
/// about twenty: a fixed array holds them without allocating, a longer list spills to the heap.
#[derive(Default)]
struct Seen {
    inline: [usize; 32],
    len: usize,
    spilled: Vec<usize>,
}

impl Seen {
    /// Record `kind`; false if it was already there.
    fn insert(&mut self, kind: usize) -> bool {
        if self.inline[..self.len].contains(&kind) || self.spilled.contains(&kind) {
            return false;
        }
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = kind;
                self.len += 1;
            }
            None => self.spilled.push(kind),
        }
        true
    }
}

/// The `server_name` extension: the host name, if it names one.
fn parse_server_name(data: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { buf: data };
    let mut list = Reader { buf: r.vec(2)? };
    if !r.buf.is_empty() || list.buf.is_empty() {
        return None;
    }
    let mut host = None;
    while !list.buf.is_empty() {
        let kind = list.u8()?;
        if kind != 0 {
            // An unknown name type: its encoding is unknown too, so the rest of the list is
            // opaque (rustls reads it the same way).
            break;
        }
        let name = list.vec(2)?;
        if host.is_some() || name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        host = Some(String::from_utf8(name.to_vec()).ok()?);
    }
    Some(host)
}

#[cfg(test)]
mod tests;
