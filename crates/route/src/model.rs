//! The pure rules of the control plane: what kinds of directory objects
//! exist, the migration states a mailbox goes through, and how those (plus
//! any explicit override) decide one address's effective route. No I/O here,
//! so the rules are table-tested directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

/// What a directory object is. Only `Group` differs in routing: its address
/// routes like any other, and the platform it routes to expands it (godwit
/// never expands a group itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    User,
    Shared,
    Resource,
    Group,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::User, Kind::Shared, Kind::Resource, Kind::Group];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Shared => "shared",
            Kind::Resource => "resource",
            Kind::Group => "group",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown kind `{s}` (expected user, shared, resource or group)"))
    }
}

/// Where a mailbox is in its move. `Cutover` and `Migrated` route to the
/// target platform; every other state routes to the platform that owns the
/// mailbox today, so a rollback is just a state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigrationState {
    Pending,
    Seeding,
    Ready,
    Cutover,
    Migrated,
    RolledBack,
}

impl MigrationState {
    pub const ALL: [MigrationState; 6] = [
        MigrationState::Pending,
        MigrationState::Seeding,
        MigrationState::Ready,
        MigrationState::Cutover,
        MigrationState::Migrated,
        MigrationState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Seeding => "seeding",
            MigrationState::Ready => "ready",
            MigrationState::Cutover => "cutover",
            MigrationState::Migrated => "migrated",
            MigrationState::RolledBack => "rolled-back",
        }
    }

    pub fn routes_to_target(self) -> bool {
        matches!(self, MigrationState::Cutover | MigrationState::Migrated)
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MigrationState {
    type Err = String;
    fn from_str(s: &str) -> Result<MigrationState, String> {
        MigrationState::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown state `{s}` (expected pending, seeding, ready, cutover, migrated or rolled-back)"
                )
            })
    }
}

/// What decided an address's entry in the routing map. Kept beside each
/// entry (two bytes in memory) so a delivery event can say why, without a
/// store read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Basis {
    /// `route set`. `in_directory`: the address is also a directory object or
    /// alias (so it is known to the unknown-recipient policy).
    Override { in_directory: bool },
    /// A directory object's own route, from its migration state.
    State { kind: Kind, state: MigrationState },
    /// An alias, routed with its mailbox: by the mailbox's state, or (`None`)
    /// by the mailbox's override.
    Alias { state: Option<MigrationState> },
}

impl Basis {
    pub fn in_directory(self) -> bool {
        !matches!(
            self,
            Basis::Override {
                in_directory: false
            }
        )
    }

    /// The token stored in `route_entries.basis`.
    pub fn token(self) -> String {
        match self {
            Basis::Override {
                in_directory: false,
            } => "override".into(),
            Basis::Override { in_directory: true } => "override+dir".into(),
            Basis::State { kind, state } => format!("{kind}:{state}"),
            Basis::Alias { state: None } => "alias:override".into(),
            Basis::Alias { state: Some(s) } => format!("alias:{s}"),
        }
    }

    /// The inverse of `token`; `None` (a row written before the directory
    /// existed) is a plain override.
    pub fn parse(token: Option<&str>) -> Basis {
        let plain = Basis::Override {
            in_directory: false,
        };
        let Some(t) = token else { return plain };
        match t {
            "override" => plain,
            "override+dir" => Basis::Override { in_directory: true },
            "alias:override" => Basis::Alias { state: None },
            _ => {
                let Some((a, b)) = t.split_once(':') else {
                    return plain;
                };
                let Ok(state) = b.parse() else { return plain };
                if a == "alias" {
                    Basis::Alias { state: Some(state) }
                } else if let Ok(kind) = a.parse() {
                    Basis::State { kind, state }
                } else {
                    plain
                }
            }
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::Override { .. } => f.write_str("override"),
            Basis::State { kind, state } => write!(f, "{kind} in state {state}"),
            Basis::Alias { state: Some(s) } => write!(f, "alias of a mailbox in state {s}"),
            Basis::Alias { state: None } => f.write_str("alias of a mailbox with an override"),
        }
    }
}

/// One directory object (a mailbox or a group) as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub display_name: String,
    pub kind: Kind,
    /// The platform that owns it today (before cutover).
    pub platform: String,
    pub state: MigrationState,
}

impl Object {
    /// The route its state gives: the target platform from cutover on, the
    /// owning platform otherwise (including after a rollback).
    pub fn state_route<'a>(&'a self, target: &'a str) -> &'a str {
        if self.state.routes_to_target() {
            target
        } else {
            &self.platform
        }
    }
}

/// The sources of routing for some set of addresses: directory objects,
/// aliases, group members, overrides. Either the whole store, or a subset
/// closed under alias→mailbox and mailbox→aliases (see `control::load`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    pub objects: HashMap<String, Object>,
    /// alias → mailbox
    pub aliases: HashMap<String, String>,
    /// group → members (loaded only by commands that change them)
    pub members: BTreeMap<String, BTreeSet<String>>,
    /// address → route
    pub overrides: HashMap<String, String>,
}

impl Sources {
    /// The effective route of `address` and what decided it, or `None` if
    /// nothing names it (it then follows the defaults and the unknown-recipient
    /// policy). Precedence: the address's own override, its own directory
    /// object, then (for an alias) its mailbox's override or state.
    pub fn effective(&self, address: &str, target: &str) -> Option<(String, Basis)> {
        let in_directory = self.objects.contains_key(address) || self.aliases.contains_key(address);
        if let Some(r) = self.overrides.get(address) {
            return Some((r.clone(), Basis::Override { in_directory }));
        }
        if let Some(o) = self.objects.get(address) {
            return Some((
                o.state_route(target).to_string(),
                Basis::State {
                    kind: o.kind,
                    state: o.state,
                },
            ));
        }
        let mailbox = self.aliases.get(address)?;
        if let Some(r) = self.overrides.get(mailbox) {
            return Some((r.clone(), Basis::Alias { state: None }));
        }
        let o = self.objects.get(mailbox)?;
        Some((
            o.state_route(target).to_string(),
            Basis::Alias {
                state: Some(o.state),
            },
        ))
    }

    /// Every address these sources can give an entry to.
    /// (An address may come more than once.)
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.objects
            .keys()
            .chain(self.aliases.keys())
            .chain(self.overrides.keys())
            .map(|s| s.as_str())
    }

    /// The aliases pointing at `mailbox`, sorted.
    pub fn aliases_of(&self, mailbox: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .aliases
            .iter()
            .filter(|(_, m)| m.as_str() == mailbox)
            .map(|(a, _)| a.as_str())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationState::*;

    fn obj(state: MigrationState) -> Object {
        Object {
            display_name: "A".into(),
            kind: Kind::User,
            platform: "old".into(),
            state,
        }
    }

    #[test]
    fn state_decides_the_route() {
        let cases = [
            (Pending, "old"),
            (Seeding, "old"),
            (Ready, "old"),
            (Cutover, "new"),
            (Migrated, "new"),
            (RolledBack, "old"),
        ];
        for (state, want) in cases {
            assert_eq!(obj(state).state_route("new"), want, "{state}");
        }
    }

    #[test]
    fn effective_route_precedence() {
        let mut s = Sources::default();
        s.objects.insert("a@x".into(), obj(Cutover));
        s.objects.insert("b@x".into(), obj(Ready));
        s.aliases.insert("alias-a@x".into(), "a@x".into());
        s.aliases.insert("alias-b@x".into(), "b@x".into());
        s.overrides.insert("b@x".into(), "hold".into());
        s.overrides.insert("loner@x".into(), "new".into());
        s.overrides.insert("alias-a@x".into(), "old".into());
        let user = |state| Basis::State {
            kind: Kind::User,
            state,
        };
        // (address, route, basis)
        let cases: [(&str, Option<(&str, Basis)>); 6] = [
            ("a@x", Some(("new", user(Cutover)))),
            // An override beats the state, and is marked as in the directory.
            (
                "b@x",
                Some(("hold", Basis::Override { in_directory: true })),
            ),
            // An alias's own override beats its mailbox.
            (
                "alias-a@x",
                Some(("old", Basis::Override { in_directory: true })),
            ),
            // An alias follows its mailbox's override.
            ("alias-b@x", Some(("hold", Basis::Alias { state: None }))),
            (
                "loner@x",
                Some((
                    "new",
                    Basis::Override {
                        in_directory: false,
                    },
                )),
            ),
            ("nobody@x", None),
        ];
        for (addr, want) in cases {
            let got = s.effective(addr, "new");
            assert_eq!(got.as_ref().map(|(r, b)| (r.as_str(), *b)), want, "{addr}");
        }
        s.overrides.remove("alias-a@x");
        assert_eq!(
            s.effective("alias-a@x", "new"),
            Some((
                "new".into(),
                Basis::Alias {
                    state: Some(Cutover)
                }
            ))
        );
    }

    #[test]
    fn basis_tokens_round_trip() {
        let mut all = vec![
            Basis::Override {
                in_directory: false,
            },
            Basis::Override { in_directory: true },
            Basis::Alias { state: None },
        ];
        for s in MigrationState::ALL {
            all.push(Basis::Alias { state: Some(s) });
            for kind in Kind::ALL {
                all.push(Basis::State { kind, state: s });
            }
        }
        for b in all {
            assert_eq!(Basis::parse(Some(&b.token())), b, "{}", b.token());
        }
        assert_eq!(
            Basis::parse(None),
            Basis::Override {
                in_directory: false
            }
        );
    }

    #[test]
    fn names_parse_case_insensitively_and_reject_others() {
        assert_eq!("Group".parse::<Kind>(), Ok(Kind::Group));
        assert!(
            "list"
                .parse::<Kind>()
                .unwrap_err()
                .contains("unknown kind `list`")
        );
        assert_eq!(
            "rolled-back".parse::<MigrationState>(),
            Ok(MigrationState::RolledBack)
        );
        assert!("done".parse::<MigrationState>().is_err());
    }
}
