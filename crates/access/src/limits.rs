//! Connection caps and failed-login limits, per IP and per user. Pure: the
//! caller passes the time, so the rules are table-tested.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Caps {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_sessions_per_user: usize,
    pub max_failures_per_ip: u32,
    pub max_failures_per_user: u32,
    pub failure_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromIp,
    TooManySessions,
    /// Too many failed logins lately, from this IP or for this user: refused
    /// without asking a platform, as a wrong password is.
    RateLimited,
}

impl Refusal {
    /// The reason named in `access.login` and the failure metric.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "max_connections",
            Refusal::TooManyFromIp => "max_connections_per_ip",
            Refusal::TooManySessions => "max_sessions_per_user",
            Refusal::RateLimited => "rate_limited",
        }
    }
}

#[derive(Debug)]
pub struct Limits {
    caps: Caps,
    connections: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
    failed_ip: HashMap<IpAddr, VecDeque<Instant>>,
    failed_user: HashMap<String, VecDeque<Instant>>,
}

fn recent(q: &mut VecDeque<Instant>, now: Instant, window: Duration) -> usize {
    while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
        q.pop_front();
    }
    q.len()
}

impl Limits {
    pub fn new(caps: Caps) -> Limits {
        Limits {
            caps,
            connections: 0,
            per_ip: HashMap::new(),
            per_user: HashMap::new(),
            failed_ip: HashMap::new(),
            failed_user: HashMap::new(),
        }
    }

    /// A new connection; release it with `disconnect`.
    pub fn connect(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.connections >= self.caps.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        let n = self.per_ip.entry(ip).or_default();
        if *n >= self.caps.max_connections_per_ip {
            return Err(Refusal::TooManyFromIp);
        }
        *n += 1;
        self.connections += 1;
        Ok(())
    }

    pub fn disconnect(&mut self, ip: IpAddr) {
        self.connections = self.connections.saturating_sub(1);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Whether a login attempt may go to a platform at all.
    pub fn may_attempt(&mut self, ip: IpAddr, user: &str, now: Instant) -> Result<(), Refusal> {
        let w = self.caps.failure_window;
        let by_ip = self.failed_ip.get_mut(&ip).map_or(0, |q| recent(q, now, w));
        let by_user = self
            .failed_user
            .get_mut(user)
            .map_or(0, |q| recent(q, now, w));
        if by_ip >= self.caps.max_failures_per_ip as usize
            || by_user >= self.caps.max_failures_per_user as usize
        {
            return Err(Refusal::RateLimited);
        }
        Ok(())
    }

    pub fn failed(&mut self, ip: IpAddr, user: &str, now: Instant) {
        let (w, mi, mu) = (
            self.caps.failure_window,
            self.caps.max_failures_per_ip as usize,
            self.caps.max_failures_per_user as usize,
        );
        let q = self.failed_ip.entry(ip).or_default();
        recent(q, now, w);
        if q.len() < mi {
            q.push_back(now);
        }
        let q = self.failed_user.entry(user.to_string()).or_default();
        recent(q, now, w);
        if q.len() < mu {
            q.push_back(now);
        }
        // Forget quiet keys, so a scan of many IPs cannot grow the maps forever.
        if self.failed_ip.len() > 100_000 {
            self.failed_ip.retain(|_, q| recent(q, now, w) > 0);
        }
        if self.failed_user.len() > 100_000 {
            self.failed_user.retain(|_, q| recent(q, now, w) > 0);
        }
    }

    /// Failed logins from `ip` within the window.
    pub fn failures(&mut self, ip: IpAddr, now: Instant) -> usize {
        let w = self.caps.failure_window;
        self.failed_ip.get_mut(&ip).map_or(0, |q| recent(q, now, w))
    }

    /// A logged-in session of `user`; release it with `logout`.
    pub fn login(&mut self, user: &str) -> Result<(), Refusal> {
        let n = self.per_user.entry(user.to_string()).or_default();
        if *n >= self.caps.max_sessions_per_user {
            return Err(Refusal::TooManySessions);
        }
        *n += 1;
        Ok(())
    }

    pub fn logout(&mut self, user: &str) {
        if let Some(n) = self.per_user.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_sessions_per_user: 1,
            max_failures_per_ip: 3,
            max_failures_per_user: 2,
            failure_window: Duration::from_secs(60),
        }
    }

    #[test]
    fn connection_caps() {
        let mut l = Limits::new(caps());
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        assert_eq!(l.connect(a), Ok(()));
        assert_eq!(l.connect(a), Ok(()));
        assert_eq!(l.connect(a), Err(Refusal::TooManyFromIp));
        assert_eq!(l.connect(b), Ok(()));
        assert_eq!(l.connect(c), Err(Refusal::TooManyConnections));
        l.disconnect(a);
        assert_eq!(l.connect(c), Ok(()));
        assert_eq!(l.login("u@x"), Ok(()));
        assert_eq!(l.login("u@x"), Err(Refusal::TooManySessions));
        l.logout("u@x");
        assert_eq!(l.login("u@x"), Ok(()));
    }

    #[test]
    fn failures_per_user_and_ip_expire() {
        let mut l = Limits::new(caps());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // (time offset, user, failed?, then may the next attempt go ahead)
        let steps: &[(u64, &str, Result<(), Refusal>)] = &[
            (0, "a@x", Ok(())),
            (1, "a@x", Err(Refusal::RateLimited)), // two failures for a@x
            (2, "b@x", Err(Refusal::RateLimited)), // third from the IP
            (61, "b@x", Err(Refusal::RateLimited)), // the IP has room again; b@x fails twice
            (63, "c@x", Ok(())),                   // all aged out
        ];
        for (i, (at, user, want)) in steps.iter().enumerate() {
            let now = t0 + s(*at);
            if l.may_attempt(ip, user, now).is_ok() {
                l.failed(ip, user, now);
            }
            assert_eq!(l.may_attempt(ip, user, now), *want, "step {i}");
        }
        let other: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(l.may_attempt(other, "z@x", t0 + s(2)), Ok(()));
    }
}
