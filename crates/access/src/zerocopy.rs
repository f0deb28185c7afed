//! The spliced session's byte path when both sides are plain TCP: splice(2)
//! moves each direction's bytes from one socket into a pipe and from the pipe
//! into the other socket, so a FETCH of a large mailbox never crosses into user
//! space and an idle session holds no user buffer at all (two pipes and their
//! four descriptors; the kernel allocates pipe pages only while bytes are in
//! flight). A TLS side has to be decrypted here, so such a session takes
//! tokio's copy instead.

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};
use nix::unistd::pipe2;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// As much as one splice call moves: the default pipe capacity (16 pages), so
/// a full pipe is always drained before the next fill.
const CHUNK: usize = 64 * 1024;

/// Relays both ways until both directions have ended, as
/// `tokio::io::copy_bidirectional` does: the end of one direction is passed on
/// as a half-close (shutdown of the other socket's write side). Returns the
/// bytes moved a→b and b→a.
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b), one_way(b, a))
}

async fn one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) =
        pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill: the socket's readiness says when; a would-block clears it.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // The peer finished sending: pass the half-close on (RFC 9293 3.6).
            match shutdown(dst.as_raw_fd(), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => return Ok(total),
                Err(e) => return Err(e.into()),
            }
        }
        // Drain everything this fill put in the pipe before reading more.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, dst.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Both directions at once, larger than any socket or pipe buffer, byte for
    /// byte; then one side's close reaches the other as end of stream and the
    /// other direction still finishes.
    #[tokio::test]
    async fn moves_every_byte_both_ways_and_passes_half_closes_on() {
        let (mut client, front_a) = pair().await;
        let (front_b, mut server) = pair().await;
        let relay = tokio::spawn(async move { bidirectional(&front_a, &front_b).await });
        let up = pattern(5 << 20, 1);
        let down = pattern(3 << 20, 7);
        let (up2, down2) = (up.clone(), down.clone());
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let send_up = async {
            cw.write_all(&up2).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let send_down = async {
            sw.write_all(&down2).await.unwrap();
        };
        let mut got_up = Vec::new();
        let mut got_down = vec![0u8; down.len()];
        let recv_up = async { sr.read_to_end(&mut got_up).await.unwrap() };
        let recv_down = async { cr.read_exact(&mut got_down).await.unwrap() };
        tokio::join!(send_up, send_down, recv_up, recv_down);
        assert!(got_up == up, "client to server differs");
        assert!(got_down == down, "server to client differs");
        // The server closes too: the relay ends with both counts.
        sw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (a, b) = relay.await.unwrap().unwrap();
        assert_eq!((a, b), (up.len() as u64, down.len() as u64));
    }
}
