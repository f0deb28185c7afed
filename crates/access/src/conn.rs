//! One side of a proxied session before the splice: a byte stream (clear or
//! TLS), a read buffer, and line/literal reads with a timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The byte stream under a `Conn`: a plain TCP socket is kept as such, so the
/// splice can move its bytes in the kernel (`zerocopy`); anything else (TLS)
/// is boxed.
pub enum Stream {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Other(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Other(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Other(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Other(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

pub struct Conn {
    pub io: Stream,
    /// Read but not yet consumed; handed over at the splice so nothing a
    /// pipelining peer sent is lost.
    pub buf: Vec<u8>,
    pub tls: bool,
    pub timeout: Duration,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl Conn {
    /// A plain TCP connection, before any TLS.
    pub fn new(io: TcpStream, timeout: Duration) -> Conn {
        Conn {
            io: Stream::Tcp(io),
            buf: Vec::new(),
            tls: false,
            timeout,
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(self.timeout, self.io.read(&mut chunk))
            .await
            .map_err(|_| timed_out())??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// One line without its CRLF (a bare LF is accepted too); `None` at end
    /// of stream. Longer than `max` is an error: the peer is not speaking
    /// the protocol.
    pub async fn read_line(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            scanned = self.buf.len();
            if scanned > max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    pub async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::time::timeout(self.timeout, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| timed_out())?
    }

    /// Server side of STARTTLS/STLS or implicit TLS. Anything the client
    /// sent after the command, before the handshake, is discarded: accepting
    /// it would let an attacker inject commands into the protected session
    /// (CVE-2011-0411; RFC 3501 6.2.1, RFC 2595 4).
    pub async fn accept_tls(self, acceptor: &tokio_rustls::TlsAcceptor) -> io::Result<Conn> {
        let timeout = self.timeout;
        let tls = tokio::time::timeout(timeout, acceptor.accept(self.io))
            .await
            .map_err(|_| timed_out())??;
        Ok(Conn {
            io: Stream::Other(Box::new(tls)),
            buf: Vec::new(),
            tls: true,
            timeout,
        })
    }

    /// Client side, towards a platform's server.
    pub async fn connect_tls(
        self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
    ) -> io::Result<Conn> {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let timeout = self.timeout;
        let tls = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, self.io),
        )
        .await
        .map_err(|_| timed_out())??;
        Ok(Conn {
            io: Stream::Other(Box::new(tls)),
            buf: Vec::new(),
            tls: true,
            timeout,
        })
    }
}
