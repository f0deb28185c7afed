//! Helpers shared by the integration tests of every crate.
//!
//! nextest runs each test in its own process, and the crates' test binaries
//! run side by side, so anything that must be unique across the whole run (a
//! loopback port a real peer will bind) is reserved here, in one place, with
//! one scheme. Two schemes in two crates (fixed ports in one, `bind(0)` in
//! another) collided in CI: Dovecot found its fixed port taken.

use std::net::TcpListener;

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
