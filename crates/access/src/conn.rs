//! One side of a proxied session before the splice: a byte stream (clear or
//! TLS), a read buffer, and line/literal reads with a timeout.

use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Conn {
    pub io: Box<dyn Io>,
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
    pub fn new(io: impl Io + 'static, timeout: Duration) -> Conn {
        Conn {
            io: Box::new(io),
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
            io: Box::new(tls),
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
            io: Box::new(tls),
            buf: Vec::new(),
            tls: true,
            timeout,
        })
    }
}
