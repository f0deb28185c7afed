//! Protecting a server: a connection cap shared by every account, a byte rate,
//! and an adaptive pause after the server says it is throttling us.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

#[derive(Debug)]
pub struct ServerLimits {
    /// One permit per open connection, across all accounts.
    pub connections: Arc<Semaphore>,
    pub bandwidth: Option<Arc<Bandwidth>>,
    /// Current pause before a retry after throttling; doubles per throttling
    /// answer and decays after successes.
    backoff: Mutex<Duration>,
    in_use: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// (fastest answer seen, moving average) of command latency.
    latency: Mutex<Option<(Duration, Duration)>>,
    /// With a fleet, the cap is also a set of slots leased in the store, so
    /// it holds summed over every sync process (issue 17).
    fleet: std::sync::OnceLock<Arc<crate::lease::FleetSlots>>,
}

/// Held by an open connection; gives its slot back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ServerLimits>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    fleet_slot: Option<(Arc<crate::lease::FleetSlots>, i64)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((slots, slot)) = self.fleet_slot.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Outside a runtime (process exit) the slot expires by itself.
            rt.spawn(async move { slots.give_back(slot).await });
        }
        self.limits
            .in_use
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ServerLimits {
    pub fn new(max_connections: usize, bytes_per_second: Option<u64>) -> ServerLimits {
        ServerLimits {
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
            bandwidth: bytes_per_second.map(|b| Arc::new(Bandwidth::new(b))),
            backoff: Mutex::new(Duration::ZERO),
            in_use: Default::default(),
            peak: Default::default(),
            latency: Mutex::new(None),
            fleet: Default::default(),
        }
    }

    /// Holds the cap fleet-wide from now on, through `slots`.
    pub fn set_fleet(&self, slots: Arc<crate::lease::FleetSlots>) {
        let _ = self.fleet.set(slots);
    }

    /// Waits for a free connection slot under the cap.
    pub async fn connection_slot(self: &Arc<Self>) -> ConnectionSlot {
        use std::sync::atomic::Ordering::SeqCst;
        let permit = self
            .connections
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let fleet_slot = match self.fleet.get() {
            Some(slots) => Some((slots.clone(), slots.take().await)),
            None => None,
        };
        let now = self.in_use.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        ConnectionSlot {
            limits: self.clone(),
            _permit: permit,
            fleet_slot,
        }
    }

    /// A slot only if one is free now: extra connections for parallel folders
    /// must never wait, or accounts holding their first connections could
    /// wait on each other forever.
    pub async fn try_connection_slot(self: &Arc<Self>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering::SeqCst;
        let permit = self.connections.clone().try_acquire_owned().ok()?;
        let fleet_slot = match self.fleet.get() {
            Some(slots) => Some((slots.clone(), slots.try_take().await?)),
            None => None,
        };
        let now = self.in_use.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        Some(ConnectionSlot {
            limits: self.clone(),
            _permit: permit,
            fleet_slot,
        })
    }

    /// The most connections that were open at once.
    pub fn peak_connections(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records how long the server took to start answering a command.
    pub fn observe_latency(&self, sample: Duration) {
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        *l = Some(match *l {
            None => (sample, sample),
            Some((min, avg)) => (min.min(sample), avg.mul_f64(0.8) + sample.mul_f64(0.2)),
        });
    }

    /// How long to pause before the next command: when the server answers
    /// several times slower than its best (it is loaded, perhaps by users),
    /// give it that much room again, up to 5 s.
    pub fn latency_pause(&self) -> Duration {
        let l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        match *l {
            Some((min, avg)) if avg > min * 4 + Duration::from_millis(50) => {
                (avg - min).min(Duration::from_secs(5))
            }
            _ => Duration::ZERO,
        }
    }

    /// Sleeps for `latency_pause` (throttling answers are handled by the
    /// reconnect loop with `throttled`).
    pub async fn pace(&self) {
        let pause = self.latency_pause();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    /// Called after a throttling answer; returns how long to wait.
    pub fn throttled(&self) -> Duration {
        let mut b = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        *b = (*b * 2).clamp(Duration::from_millis(500), Duration::from_secs(120));
        *b
    }

    pub fn succeeded(&self) {
        let mut b = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        *b /= 2;
    }
}

/// The byte rate read from a server: a GCRA bucket (`governor`) holding at
/// most one second of bytes.
#[derive(Debug)]
pub struct Bandwidth {
    limiter: governor::DefaultDirectRateLimiter,
    /// The burst: one second of bytes, the most one check may ask for.
    burst: NonZeroU32,
    /// Readers wait in turn, so a large read's debt delays those behind it
    /// instead of being overtaken by small ones (tokio's Mutex is FIFO).
    turn: tokio::sync::Mutex<()>,
}

impl Bandwidth {
    pub fn new(rate: u64) -> Bandwidth {
        let burst =
            NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        Bandwidth {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(burst)),
            burst,
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Waits until `bytes` may be read (already read, usually: the wait then
    /// repays them before the next read). More than the burst is taken a
    /// burst at a time.
    pub async fn consume(&self, bytes: u64) {
        let _turn = self.turn.lock().await;
        let mut left = bytes;
        while left > 0 {
            let n = NonZeroU32::new(
                u32::try_from(left)
                    .unwrap_or(u32::MAX)
                    .min(self.burst.get()),
            )
            .unwrap_or(NonZeroU32::MIN);
            match self.limiter.check_n(n) {
                Ok(Ok(())) => left -= u64::from(n.get()),
                Ok(Err(not_until)) => {
                    tokio::time::sleep(
                        not_until.wait_time_from(governor::clock::Clock::now(self.limiter.clock())),
                    )
                    .await
                }
                // n never exceeds the burst.
                Err(governor::InsufficientCapacity(_)) => unreachable!("n <= burst"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn bandwidth_limits_the_rate() {
        let b = Bandwidth::new(100_000);
        let start = Instant::now();
        for _ in 0..5 {
            b.consume(50_000).await;
        }
        // 250 kB at 100 kB/s with a 100 kB burst: at least 1.5 s.
        assert!(
            start.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_read_larger_than_the_burst_is_paid_for() {
        // One 250 kB message at 100 kB/s: the first 100 kB pass at once, the
        // rest take 1.5 s (a GCRA check can ask for one burst at most).
        let b = Bandwidth::new(100_000);
        let start = Instant::now();
        b.consume(250_000).await;
        assert!(
            start.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn pauses_when_latency_rises() {
        let l = ServerLimits::new(2, None);
        for _ in 0..5 {
            l.observe_latency(Duration::from_millis(2));
        }
        assert_eq!(l.latency_pause(), Duration::ZERO);
        for _ in 0..10 {
            l.observe_latency(Duration::from_millis(400));
        }
        let p = l.latency_pause();
        assert!(
            p > Duration::from_millis(200) && p <= Duration::from_secs(5),
            "{p:?}"
        );
        for _ in 0..30 {
            l.observe_latency(Duration::from_millis(2));
        }
        assert_eq!(l.latency_pause(), Duration::ZERO);
    }

    #[test]
    fn backoff_grows_and_decays() {
        let l = ServerLimits::new(2, None);
        let a = l.throttled();
        let b = l.throttled();
        assert!(b > a);
        l.succeeded();
        assert!(l.throttled() <= b);
    }
}
