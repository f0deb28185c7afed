//! Outbound destinations for the scheduler: mail for recipients outside
//! `domains.accepted` (accepted on the relay port) goes to `mx:DOMAIN`,
//! one destination per recipient domain with its own adaptive flow control
//! and circuit breaker, or to `smarthost:PLATFORM`, a platform's
//! `outbound_relay`. Decisions here are pure; the scheduler does the I/O.

use crate::client::{MxSource, Platform, SmarthostAuth};
use godwit_config::{Config, OutboundConfig, PlatformConfig, ROUTE_MX, TlsPolicy};

pub const MX_PREFIX: &str = "mx:";
pub const SMARTHOST_PREFIX: &str = "smarthost:";

/// Whether a destination name is an outbound one (not a platform): a 5xx
/// there bounces whatever `queue.soft_bounce` says (soft_bounce is for
/// platforms mid-migration, not for the internet).
pub fn is_outbound(dest: &str) -> bool {
    dest.starts_with(MX_PREFIX) || dest.starts_with(SMARTHOST_PREFIX)
}

/// The destination for foreign recipient `rcpt` under outbound route
/// `route` (`mx` or a platform name): `mx:example.net` or `smarthost:new`.
pub fn destination(route: &str, rcpt: &str) -> String {
    if route == ROUTE_MX {
        let domain = rcpt
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or(rcpt)
            .trim_end_matches('.')
            .to_ascii_lowercase();
        format!("{MX_PREFIX}{domain}")
    } else {
        format!("{SMARTHOST_PREFIX}{route}")
    }
}

/// Whether recipient `addr` leaves for the internet: its domain is not ours.
/// `postmaster` without a domain is ours (RFC 5321 4.5.1).
pub fn is_foreign(config: &Config, addr: &str) -> bool {
    match addr.rsplit_once('@') {
        Some((_, d)) => !config.is_accepted_domain(d),
        None => false,
    }
}

/// The flow-control and TLS settings of MX destination `domain`: the
/// per-domain connection limits, `rate_limits` as the ceiling, and STARTTLS
/// opportunistic unless the domain is in `tls_require`. Required TLS there
/// means encrypted or not at all (Postfix's `encrypt`): MX certificates are
/// not verified without DANE or MTA-STS, but whether they would have
/// verified is recorded.
pub fn mx_settings(o: &OutboundConfig, domain: &str) -> PlatformConfig {
    let required = o.requires_tls(domain);
    PlatformConfig {
        relay: Vec::new(),
        tls: if required {
            TlsPolicy::Require
        } else {
            TlsPolicy::Opportunistic
        },
        tls_insecure: required,
        max_connections: o.max_connections_per_domain,
        initial_connections: o.initial_connections_per_domain,
        max_rate: o.rate_limit_for(domain).map_or(0.0, |r| r.per_second()),
        connect_timeout: o.connect_timeout,
        ..PlatformConfig::default()
    }
}

/// A platform's outbound smarthost settings: its `outbound_relay` hosts
/// and `outbound_tls`, the platform's own limits otherwise.
pub fn smarthost_settings(p: &PlatformConfig) -> PlatformConfig {
    PlatformConfig {
        relay: p.outbound_relay.clone(),
        tls: p.outbound_tls,
        ..p.clone()
    }
}

/// Builds the client for outbound destination `dest`, or None when it
/// names nothing configured.
pub fn client_for(
    config: &Config,
    resolver: Option<&godwit_outbound::MxResolver>,
    dest: &str,
) -> Option<(Platform, PlatformConfig)> {
    let o = config.outbound.as_ref()?;
    if let Some(domain) = dest.strip_prefix(MX_PREFIX) {
        let settings = mx_settings(o, domain);
        let mx = MxSource {
            resolver: resolver?.clone(),
            domain: domain.to_string(),
        };
        return Some((Platform::for_mx(dest, &settings, mx), settings));
    }
    let name = dest.strip_prefix(SMARTHOST_PREFIX)?;
    let p = config.platforms.get(name)?;
    let settings = smarthost_settings(p);
    let password = match (&p.outbound_password, &p.outbound_password_file) {
        (Some(pw), _) => match pw.resolve(&format!("platforms.{name}.outbound_password")) {
            Ok(pw) => Some(pw),
            Err(e) => {
                tracing::error!(platform = name, "{e}");
                None
            }
        },
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => {
                tracing::error!(
                    platform = name,
                    "platforms.{name}.outbound_password_file {}: {e}",
                    f.display()
                );
                None
            }
        },
        _ => None,
    };
    let auth = p
        .outbound_user
        .clone()
        .zip(password)
        .map(|(user, password)| SmarthostAuth { user, password });
    Some((Platform::new(dest, &settings).with_auth(auth), settings))
}

/// What the pruner knows of one destination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DestActivity {
    /// Recipients not yet final whose last attempt went here, and messages
    /// parked for it.
    pub queued: usize,
    /// Deliveries running, and attempts waiting for a slot.
    pub in_flight: usize,
    pub waiting: usize,
    /// The circuit is closed (not open, not half-open).
    pub circuit_closed: bool,
    /// Since the last attempt began or ended.
    pub idle: std::time::Duration,
}

/// Whether destination `dest` may be forgotten: only an outbound one
/// (platforms are configured and stay), with nothing queued or in flight,
/// a closed circuit (an open one is state worth keeping: forgetting it
/// would hammer a down MX again at once) and idle for `idle_after`.
pub fn should_prune(dest: &str, a: &DestActivity, idle_after: std::time::Duration) -> bool {
    is_outbound(dest)
        && a.queued == 0
        && a.in_flight == 0
        && a.waiting == 0
        && a.circuit_closed
        && a.idle >= idle_after
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_table() {
        use std::time::Duration as D;
        let idle = DestActivity {
            queued: 0,
            in_flight: 0,
            waiting: 0,
            circuit_closed: true,
            idle: D::from_secs(700),
        };
        let after = D::from_secs(600);
        for (dest, a, want) in [
            ("mx:foreign.example", idle, true),
            ("smarthost:new", idle, true),
            // Configured platforms are never pruned.
            ("new", idle, false),
            (
                "mx:foreign.example",
                DestActivity { queued: 1, ..idle },
                false,
            ),
            (
                "mx:foreign.example",
                DestActivity {
                    in_flight: 1,
                    ..idle
                },
                false,
            ),
            (
                "mx:foreign.example",
                DestActivity { waiting: 1, ..idle },
                false,
            ),
            (
                "mx:foreign.example",
                DestActivity {
                    circuit_closed: false,
                    ..idle
                },
                false,
            ),
            (
                "mx:foreign.example",
                DestActivity {
                    idle: D::from_secs(599),
                    ..idle
                },
                false,
            ),
            (
                "mx:foreign.example",
                DestActivity {
                    idle: after,
                    ..idle
                },
                true,
            ),
        ] {
            assert_eq!(should_prune(dest, &a, after), want, "{dest} {a:?}");
        }
    }

    #[test]
    fn destinations() {
        assert_eq!(
            destination("mx", "bob@Foreign.Example."),
            "mx:foreign.example"
        );
        assert_eq!(destination("new", "bob@foreign.example"), "smarthost:new");
        assert!(is_outbound("mx:foreign.example"));
        assert!(is_outbound("smarthost:new"));
        assert!(!is_outbound("new"));
    }

    #[test]
    fn mx_settings_take_the_ceiling_and_the_tls_requirement() {
        let o = OutboundConfig {
            rate_limits: [("slow.example".to_string(), "120/m".to_string())].into(),
            tls_require: vec!["bank.example".into()],
            ..Default::default()
        };
        let slow = mx_settings(&o, "slow.example");
        assert_eq!(slow.max_rate, 2.0);
        assert_eq!(slow.tls, TlsPolicy::Opportunistic);
        let bank = mx_settings(&o, "bank.example");
        assert_eq!(bank.max_rate, 0.0);
        assert_eq!(bank.tls, TlsPolicy::Require);
    }
}
