//! Folder ACLs (RFC 4314): which entries the target needs, given the
//! source's, so delegates and shared mailboxes keep working after the move
//! (the seed's common mistake 8). Pure: the engine and verify do the I/O.

use std::collections::BTreeMap;

/// One folder's ACL: identifier → rights letters (sorted, deduplicated).
pub type Acl = BTreeMap<String, String>;

/// Whether a server has the RFC 4314 rights (k, x, t, e), from its
/// `RIGHTS=` capability (RFC 4314 2.1); without it only RFC 2086's c and d.
pub fn has_rfc4314_rights(caps_rights: Option<&str>) -> bool {
    caps_rights.is_some_and(|r| r.chars().any(|c| "kxte".contains(c)))
}

fn norm(rights: impl IntoIterator<Item = char>) -> String {
    let mut v: Vec<char> = rights.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v.into_iter().collect()
}

/// Rights for the target (RFC 4314 2.1.1). RFC 2086 servers disagree on
/// which obsolete right controls DELETE; this follows the group that used
/// "d" for it: "c" is "k", and "d" is "x", "t" and "e". Toward a target with
/// only c and d, the same mapping runs backwards.
pub fn translate(rights: &str, target_rfc4314: bool) -> String {
    if target_rfc4314 {
        norm(rights.chars().flat_map(|c| match c {
            'c' => vec!['k'],
            'd' => vec!['x', 't', 'e'],
            c => vec![c],
        }))
    } else {
        norm(rights.chars().map(|c| match c {
            'k' => 'c',
            'x' | 't' | 'e' => 'd',
            c => c,
        }))
    }
}

/// The target identifier for a source one: `anyone` (and `-anyone`, a
/// negative right, RFC 4314 2) stay; users in the accounts file map to their
/// target user; anything else is `None`, to be reported.
pub fn map_identifier(id: &str, users: &BTreeMap<String, String>) -> Option<String> {
    let (neg, bare) = match id.strip_prefix('-') {
        Some(b) => ("-", b),
        None => ("", id),
    };
    if bare.eq_ignore_ascii_case("anyone") {
        return Some(format!("{neg}anyone"));
    }
    users
        .get(&bare.to_ascii_lowercase())
        .map(|t| format!("{neg}{t}"))
}

/// What the target's ACL should be for a source ACL, and the source
/// identifiers that have no target user.
pub fn wanted(
    source: &Acl,
    users: &BTreeMap<String, String>,
    target_rfc4314: bool,
) -> (Acl, Vec<String>) {
    let mut out = Acl::new();
    let mut unmapped = Vec::new();
    for (id, rights) in source {
        match map_identifier(id, users) {
            Some(t) => {
                out.insert(t, translate(rights, target_rfc4314));
            }
            None => unmapped.push(id.clone()),
        }
    }
    (out, unmapped)
}

/// Whether the target's rights for an entry are what is wanted. A server
/// with the RFC 4314 rights also lists the virtual c and d (RFC 4314 2.1.1)
/// beside k, x, t and e: both sides are compared in the target's terms.
fn same(want: &str, have: &str, target_rfc4314: bool) -> bool {
    translate(want, target_rfc4314) == translate(have, target_rfc4314)
}

/// The SETACL (identifier, rights) that turn `target` into `want`.
/// Identifiers the source does not name are left alone (the target
/// platform's own entries).
pub fn changes(want: &Acl, target: &Acl, target_rfc4314: bool) -> Vec<(String, String)> {
    want.iter()
        .filter(|(id, r)| !target.get(*id).is_some_and(|t| same(r, t, target_rfc4314)))
        .map(|(id, r)| (id.clone(), r.clone()))
        .collect()
}

/// One line per difference, for verify.
pub fn differences(want: &Acl, target: &Acl, target_rfc4314: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (id, r) in want {
        match target.get(id) {
            None => out.push(format!("{id}: {r} on the source, nothing on the target")),
            Some(t) if !same(r, t, target_rfc4314) => {
                out.push(format!("{id}: {r} on the source, {t} on the target"))
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(v: &[(&str, &str)]) -> Acl {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn obsolete_rights_translate_per_rfc_4314_2_1_1() {
        for (rights, to_new, want) in [
            ("lrswipcda", true, "aeiklprstwx"),
            ("lrc", true, "klr"),
            ("lrd", true, "elrtx"),
            ("lrswipkxtea", false, "acdilprsw"),
            ("lr", false, "lr"),
            ("lrswipkxtea", true, "aeiklprstwx"),
        ] {
            assert_eq!(translate(rights, to_new), want, "{rights} {to_new}");
        }
        assert!(has_rfc4314_rights(Some("texk")));
        assert!(!has_rfc4314_rights(Some("cd")));
        assert!(!has_rfc4314_rights(None));
    }

    #[test]
    fn identifiers_map_to_target_users_and_unmappable_ones_are_reported() {
        let users: BTreeMap<String, String> = [
            ("alice@old".to_string(), "alice@new".to_string()),
            ("bob@old".to_string(), "bob@new".to_string()),
        ]
        .into();
        let source = acl(&[
            ("alice@old", "lrswipkxtea"),
            ("bob@old", "lrs"),
            ("anyone", "lr"),
            ("-anyone", "w"),
            ("ghost@elsewhere", "lr"),
        ]);
        let (want, unmapped) = wanted(&source, &users, true);
        assert_eq!(
            want,
            acl(&[
                ("alice@new", "aeiklprstwx"),
                ("bob@new", "lrs"),
                ("anyone", "lr"),
                ("-anyone", "w"),
            ])
        );
        assert_eq!(unmapped, vec!["ghost@elsewhere"]);
        // The target lists the virtual c and d beside k, x, t, e (RFC 4314 2.1.1).
        let target = acl(&[
            ("alice@new", "akxeilprwtscd"),
            ("bob@new", "lr"),
            ("owner-extra", "l"),
        ]);
        assert_eq!(
            changes(&want, &target, true),
            vec![
                ("-anyone".to_string(), "w".to_string()),
                ("anyone".to_string(), "lr".to_string()),
                ("bob@new".to_string(), "lrs".to_string()),
            ]
        );
        let d = differences(&want, &target, true);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.contains(&"bob@new: lrs on the source, lr on the target".to_string()));
        assert!(differences(&want, &want, true).is_empty());
    }
}
