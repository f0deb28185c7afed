//! Which platform a login goes to: the routing map's answer for the login's
//! address (address, alias or mailbox), the same map inbound mail follows.

use godwit_route::{Decision, MigrationState, Why};

/// What the map alone says about a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Refused with the reply a wrong password gets; no platform is asked.
    Refuse(&'static str),
    Platform(String),
    /// `both` or `hold`: the mailbox's migration state decides.
    ByState,
}

/// `accepted`: the login's domain is in `domains.accepted`.
pub fn classify(address: &str, accepted: bool, has_directory: bool, d: &Decision) -> Step {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Step::Refuse("foreign_domain");
    };
    if local.is_empty() || domain.is_empty() || !accepted {
        return Step::Refuse("foreign_domain");
    }
    let known = matches!(d.why, Why::Entry { .. } | Why::Directory { .. });
    if has_directory && !known {
        return Step::Refuse("unknown");
    }
    match d.route.as_str() {
        godwit_config::ROUTE_BOTH | godwit_config::ROUTE_HOLD => Step::ByState,
        p => Step::Platform(p.to_string()),
    }
}

/// `cutover` and `migrated` go to the target platform, every other state to
/// the owner: the rule inbound mail follows (`MigrationState::routes_to_target`).
pub fn by_state(owner: &str, state: MigrationState, target: Option<&str>) -> Option<String> {
    if state.routes_to_target() {
        target.map(str::to_string)
    } else {
        Some(owner.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_route::{Basis, Kind};

    fn d(route: &str, why: Why) -> Decision {
        Decision {
            route: route.into(),
            why,
            version: 1,
        }
    }

    #[test]
    fn classify_table() {
        let entry = Why::Entry { version: 3 };
        let dir = Why::Directory {
            basis: Basis::State {
                kind: Kind::User,
                state: MigrationState::Cutover,
            },
            version: 3,
        };
        let alias = Why::Directory {
            basis: Basis::Alias {
                state: Some(MigrationState::Ready),
            },
            version: 3,
        };
        let dflt = Why::GlobalDefault;
        let p = |s: &str| Step::Platform(s.into());
        let cases = [
            (
                "alice@example.com",
                true,
                false,
                d("old", dflt.clone()),
                p("old"),
            ),
            (
                "alice@example.com",
                true,
                true,
                d("old", dflt.clone()),
                Step::Refuse("unknown"),
            ),
            (
                "alice@example.com",
                true,
                true,
                d("old", Why::UnknownHeld),
                Step::Refuse("unknown"),
            ),
            (
                "alice@example.com",
                true,
                true,
                d("new", dir.clone()),
                p("new"),
            ),
            ("al@example.com", true, true, d("old", alias), p("old")),
            (
                "alice@example.com",
                true,
                false,
                d("new", entry.clone()),
                p("new"),
            ),
            (
                "alice@example.com",
                true,
                true,
                d("both", entry.clone()),
                Step::ByState,
            ),
            (
                "alice@example.com",
                true,
                true,
                d("hold", dir),
                Step::ByState,
            ),
            (
                "alice@evil.test",
                false,
                false,
                d("old", dflt.clone()),
                Step::Refuse("foreign_domain"),
            ),
            (
                "alice",
                false,
                false,
                d("old", dflt.clone()),
                Step::Refuse("foreign_domain"),
            ),
            (
                "@example.com",
                true,
                false,
                d("old", dflt),
                Step::Refuse("foreign_domain"),
            ),
        ];
        for (addr, acc, has_dir, dec, want) in cases {
            assert_eq!(classify(addr, acc, has_dir, &dec), want, "{addr} {dec:?}");
        }
    }

    #[test]
    fn state_table() {
        for s in MigrationState::ALL {
            let want = if matches!(s, MigrationState::Cutover | MigrationState::Migrated) {
                "new"
            } else {
                "old"
            };
            assert_eq!(
                by_state("old", s, Some("new")).as_deref(),
                Some(want),
                "{s}"
            );
        }
        assert_eq!(by_state("old", MigrationState::Migrated, None), None);
    }
}
