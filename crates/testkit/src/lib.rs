//! Helpers shared by the integration tests of every crate.
//!
//! nextest runs each test in its own process, and the crates' test binaries
//! run side by side, so anything that must be unique across the whole run (a
//! loopback port a real peer will bind) is reserved here, in one place, with
//! one scheme. Two schemes in two crates (fixed ports in one, `bind(0)` in
//! another) collided in CI: Dovecot found its fixed port taken.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A free loopback port, reserved for this test process until it exits.
///
/// Binding port 0 and releasing it races under parallel nextest: another
/// test's bind(0), or any client socket's ephemeral port, can take it before
/// the intended server binds it. So ports come from below the ephemeral
/// range (Linux: 32768 and up), each reserved by an exclusive lock on a
/// marker file that this process holds until it exits. The kernel drops the
/// lock when the process dies, however it dies, so there is no stale marker
/// to reclaim and no window in which two processes both take one over.
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("godwit-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let start = (rand_u32() % SPAN as u32) as u16;
    for n in 0..SPAN {
        let port = LOW + (start + n) % SPAN;
        let Ok(marker) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if marker.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            // Held for the life of the process: the lock is the reservation.
            std::mem::forget(marker);
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{LOW}-{}", LOW + SPAN - 1);
}

/// Below Linux's default ephemeral range (32768-60999), so no client socket
/// is ever given one of these by the kernel.
const LOW: u16 = 15000;
const SPAN: u16 = 17000;

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// `token_server.py` beside this file: an OAuth 2.0 client-credentials
/// token endpoint (RFC 6749 4.4) for one client, issuing tokens for one user
/// that live `expires_in` seconds, and the introspection endpoint (RFC 7662)
/// Dovecot's oauth2 passdb asks. Stopped when dropped.
pub struct TokenServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(client_id: &str, client_secret: &str, user: &str, expires_in: u64) -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        let portfile = dir.path().join("port");
        let child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/token_server.py"))
            .arg(&portfile)
            .args([client_id, client_secret, user])
            .arg(expires_in.to_string())
            .spawn()
            .expect("python3 runs the token server");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&portfile)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the token server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        TokenServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Dovecot's oauth2 passdb settings (`args = FILE`) pointing at this
    /// server's introspection endpoint.
    pub fn dovecot_oauth2_conf(&self) -> String {
        format!(
            "introspection_mode = post\nintrospection_url = http://127.0.0.1:{}/introspect\n\
             username_attribute = username\nactive_attribute = active\nactive_value = true\n",
            self.port
        )
    }

    /// A form POST to `path`; the JSON answer.
    pub fn post(&self, path: &str, form: &str) -> serde_json::Value {
        self.request(&format!(
            "POST {path} HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{form}",
            form.len()
        ))
    }

    /// How many tokens the endpoint has issued.
    pub fn issued(&self) -> u64 {
        self.request("GET /stats HTTP/1.0\r\n\r\n")["issued"]
            .as_u64()
            .expect("stats carry issued")
    }

    fn request(&self, req: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable_within_a_process() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
        TcpListener::bind(("127.0.0.1", a)).unwrap();
        TcpListener::bind(("127.0.0.1", b)).unwrap();
    }
}
