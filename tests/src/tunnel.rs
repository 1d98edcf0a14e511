//! Peers for the passthrough tests: a raw TLS backend that streams a checkable byte pattern
//! both ways, a TCP stream that writes one byte per call and measures the ClientHello, a
//! rustls client that leads with a post-quantum-sized key share, and the decoding of PROXY
//! headers (v1 and v2) as a backend reads them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{NamedGroup, ProtocolVersion};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bytes per pattern chunk.
const CHUNK: usize = 64 * 1024;

/// The pattern's chunk `index`: a fixed pseudo-random block with the index in its first eight
/// bytes, so a lost, repeated or reordered chunk changes the hash.
fn chunk(block: &[u8], index: u64) -> Vec<u8> {
    let mut c = block.to_vec();
    c[..8].copy_from_slice(&index.to_le_bytes());
    c
}

fn block() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write `n` bytes of the pattern; returns their SHA-256.
pub async fn write_pattern<W: AsyncWrite + Unpin>(to: &mut W, n: u64) -> std::io::Result<[u8; 32]> {
    let block = block();
    let mut hash = Sha256::new();
    let (mut left, mut index) = (n, 0u64);
    while left > 0 {
        let mut c = chunk(&block, index);
        c.truncate(left.min(CHUNK as u64) as usize);
        hash.update(&c);
        to.write_all(&c).await?;
        left -= c.len() as u64;
        index += 1;
    }
    Ok(hash.finalize().into())
}

/// Read to EOF; returns the byte count and SHA-256 of what arrived.
pub async fn hash_to_eof<R: AsyncRead + Unpin>(from: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// What a [`StreamBackend`] did on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// SHA-256 of the pattern bytes it sent.
    pub sent: [u8; 32],
    /// Bytes it received up to the client's EOF, and their SHA-256.
    pub received: u64,
    pub received_hash: [u8; 32],
}

/// A TLS backend speaking no HTTP: on each connection it reads an 8-byte big-endian count,
/// then sends that many pattern bytes while reading everything the client sends until EOF,
/// and records [`Streamed`].
pub struct StreamBackend {
    pub addr: SocketAddr,
    pub streamed: Arc<Mutex<Vec<Streamed>>>,
    task: JoinHandle<()>,
}

impl Drop for StreamBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StreamBackend {
    pub async fn start(chain_pem: &str, key_pem: &str) -> StreamBackend {
        let acceptor = crate::net::tls_acceptor(chain_pem, key_pem, &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let streamed = Arc::new(Mutex::new(Vec::new()));
        let record = streamed.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, record) = (acceptor.clone(), record.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (mut rd, mut wr) = tokio::io::split(tls);
                    let mut count = [0u8; 8];
                    if rd.read_exact(&mut count).await.is_err() {
                        return;
                    }
                    let send = async {
                        let hash = write_pattern(&mut wr, u64::from_be_bytes(count)).await?;
                        wr.shutdown().await?;
                        Ok::<_, std::io::Error>(hash)
                    };
                    if let (Ok(sent), Ok((received, received_hash))) =
                        tokio::join!(send, hash_to_eof(&mut rd))
                    {
                        record.lock().unwrap().push(Streamed {
                            sent,
                            received,
                            received_hash,
                        });
                    }
                });
            }
        });
        StreamBackend {
            addr,
            streamed,
            task,
        }
    }
}

/// A client TCP stream that can write one byte per call (each its own segment: no delay), and
/// notes how many bytes it had written when the first byte came back: for a TLS client, the
/// size of its first ClientHello.
pub struct Probe {
    inner: TcpStream,
    one_byte_writes: bool,
    written: usize,
    first_flight: Arc<AtomicUsize>,
}

impl AsyncRead for Probe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let written = self.written;
            let _ =
                self.first_flight
                    .compare_exchange(0, written, Ordering::SeqCst, Ordering::SeqCst);
        }
        polled
    }
}

impl AsyncWrite for Probe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let take = if self.one_byte_writes {
            buf.len().min(1)
        } else {
            buf.len()
        };
        let polled = Pin::new(&mut self.inner).poll_write(cx, &buf[..take]);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A key share shaped like X25519MLKEM768's, as PQ-enabled browsers and rustls clients send it:
/// 1216 bytes under that group's code point (1184 of ML-KEM-768 public key, here filler, then
/// a real X25519 public key) and, alongside, the X25519 component as its own share. No test
/// server knows the hybrid group, so it picks the X25519 share and the handshake completes
/// with that: what a server without post-quantum support does with a browser today.
#[derive(Debug)]
struct PostQuantumSized;

struct Share {
    x25519: Box<dyn ActiveKeyExchange>,
    hybrid: Vec<u8>,
}

impl SupportedKxGroup for PostQuantumSized {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let x25519 = rustls::crypto::ring::kx_group::X25519.start()?;
        let mut hybrid = vec![0x5a; 1184];
        hybrid.extend_from_slice(x25519.pub_key());
        Ok(Box::new(Share { x25519, hybrid }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

impl ActiveKeyExchange for Share {
    fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        Err(rustls::Error::General(
            "the hybrid test share has no ML-KEM half".into(),
        ))
    }

    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((NamedGroup::X25519, self.x25519.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer: &[u8],
    ) -> Result<SharedSecret, rustls::Error> {
        self.x25519.complete(peer)
    }

    fn pub_key(&self) -> &[u8] {
        &self.hybrid
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

static POST_QUANTUM_SIZED: PostQuantumSized = PostQuantumSized;

/// How [`tls_connect_probed`] makes its connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hello {
    /// Write every byte (the ClientHello included) with its own call.
    pub one_byte_writes: bool,
    /// Lead with a post-quantum-sized (X25519MLKEM768-shaped) key share.
    pub post_quantum_sized: bool,
}

/// A TLS connection like [`crate::net::tls_connect`], over a [`Probe`]; returns the stream
/// and the size of the first ClientHello.
pub async fn tls_connect_probed(
    addr: SocketAddr,
    sni: &str,
    root: CertificateDer<'static>,
    alpn: &[&[u8]],
    hello: Hello,
) -> std::io::Result<(tokio_rustls::client::TlsStream<Probe>, usize)> {
    let mut provider = rustls::crypto::ring::default_provider();
    if hello.post_quantum_sized {
        provider.kx_groups.insert(0, &POST_QUANTUM_SIZED);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).map_err(std::io::Error::other)?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let first_flight = Arc::new(AtomicUsize::new(0));
    let probe = Probe {
        inner: tcp,
        one_byte_writes: hello.one_byte_writes,
        written: 0,
        first_flight: first_flight.clone(),
    };
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, probe)
        .await?;
    Ok((tls, first_flight.load(Ordering::SeqCst)))
}

/// SHA-256 of a certificate: what a client pins.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// The first certificate of a PEM chain, DER-encoded.
pub fn leaf_der(chain_pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
}

/// v2's fixed 12-byte signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Read a PROXY header, either version, as a backend does, and describe it: a v1 line as sent,
/// a v2 header as `PROXY-V2 TCP4|TCP6 <source> <destination> <source port> <destination port>`
/// decoded from its address block (`PROXY-V2 LOCAL` or `PROXY-V2 ?` when it carries none).
/// `None`: not a PROXY header, or the connection ended inside it.
pub async fn read_proxy_header(stream: &mut TcpStream) -> Option<String> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.ok()?;
    if first[0] == b'P' {
        let mut line = vec![b'P'];
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") && line.len() < 108 {
            stream.read_exact(&mut byte).await.ok()?;
            line.push(byte[0]);
        }
        return Some(String::from_utf8_lossy(&line).trim_end().to_owned());
    }
    let mut head = [0u8; 16];
    head[0] = first[0];
    stream.read_exact(&mut head[1..]).await.ok()?;
    if &head[..12] != V2_SIGNATURE || head[12] >> 4 != 2 {
        return None;
    }
    let mut block = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
    stream.read_exact(&mut block).await.ok()?;
    if head[12] & 0x0f == 0 {
        return Some("PROXY-V2 LOCAL".into());
    }
    let ports = |at: usize| {
        (
            u16::from_be_bytes([block[at], block[at + 1]]),
            u16::from_be_bytes([block[at + 2], block[at + 3]]),
        )
    };
    let (family, src, dst, (sport, dport)) = match head[13] {
        0x11 if block.len() >= 12 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[at],
                    block[at + 1],
                    block[at + 2],
                    block[at + 3],
                ))
            };
            ("TCP4", ip(0), ip(4), ports(8))
        }
        0x21 if block.len() >= 36 => {
            let ip = |at: usize| {
                let octets: [u8; 16] = block[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            ("TCP6", ip(0), ip(16), ports(32))
        }
        _ => return Some("PROXY-V2 ?".into()),
    };
    Some(format!("PROXY-V2 {family} {src} {dst} {sport} {dport}"))
}
