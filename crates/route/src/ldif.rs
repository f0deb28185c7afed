//! Reading a directory export in LDIF (RFC 2849), as `ldapsearch -LLL`,
//! `slapcat`, 389-DS's `db2ldif` or Active Directory's `ldifde` write it.
//!
//! Only content records are read (a `changetype:` is refused). Per entry:
//!
//! | godwit        | LDIF attributes                                                     |
//! |---------------|---------------------------------------------------------------------|
//! | address       | `mail` (an entry without one is not a mail object and is skipped)    |
//! | display name  | `displayName`, else `cn`                                             |
//! | kind          | `group` for objectClass groupOfNames, groupOfUniqueNames, group, mailGroup, groupOfURLs; AD's msExchRecipientTypeDetails 4 = shared, 16/32 = resource; else `user`. `godwitKind` overrides. |
//! | aliases       | `mailAlternateAddress`, `mailLocalAddress`, `proxyAddresses` (`smtp:` values) |
//! | members       | `member`/`uniqueMember` (DNs of entries in the file), `rfc822MailMember`, `mgrpRFC822MailMember` |
//! | platform      | `godwitPlatform`, else the `--platform` given to the import          |
//!
//! Values may be base64 (`attr:: ...`) and lines folded (a continuation line
//! starts with one space). Every problem is reported with its line number.

use crate::directory::{LineError, Raw, Rules, check};
use crate::normalize_address;
use base64::Engine;
use std::collections::HashMap;

/// One attribute value and the line it starts on.
struct Value {
    line: usize,
    text: String,
}

struct Entry {
    line: usize,
    dn: String,
    /// lowercased attribute name → values, in file order.
    attrs: HashMap<String, Vec<Value>>,
}

impl Entry {
    fn first(&self, name: &str) -> Option<&Value> {
        self.attrs.get(name).and_then(|v| v.first())
    }
    fn all(&self, name: &str) -> impl Iterator<Item = &Value> {
        self.attrs.get(name).into_iter().flatten()
    }
}

/// A DN in the form used to match `member` values against entries: RDNs
/// lowercased, spaces around `,` and `=` dropped (RFC 4514 treats them as
/// insignificant in the attribute types we meet here).
fn dn_key(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| {
            let (a, v) = rdn.split_once('=').unwrap_or((rdn, ""));
            format!("{}={}", a.trim(), v.trim())
        })
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// Unfolds lines and splits the text into entries of attribute values.
fn entries(text: &str, errors: &mut Vec<LineError>) -> Vec<Entry> {
    // Logical lines: (first physical line number, text); blank lines kept as
    // entry separators, comments dropped (a comment may be folded too).
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut in_comment = false;
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(cont) = line.strip_prefix(' ') {
            if in_comment {
                continue;
            }
            match logical.last_mut() {
                Some((_, l)) if !l.is_empty() => l.push_str(cont),
                _ => errors.push(LineError {
                    line: i + 1,
                    message: "a continuation line (starting with a space) follows nothing".into(),
                }),
            }
            continue;
        }
        in_comment = line.starts_with('#');
        if !in_comment {
            logical.push((i + 1, line.to_string()));
        }
    }
    let mut out = Vec::new();
    let mut current: Option<Entry> = None;
    for (line, l) in logical {
        if l.is_empty() {
            out.extend(current.take());
            continue;
        }
        let Some((name, rest)) = l.split_once(':') else {
            errors.push(LineError {
                line,
                message: format!("`{}` is not `attribute: value`", truncate(&l)),
            });
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = if let Some(b64) = rest.strip_prefix(':') {
            match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(_) => {
                        errors.push(LineError {
                            line,
                            message: format!("the base64 value of `{name}` is not UTF-8 text"),
                        });
                        continue;
                    }
                },
                Err(e) => {
                    errors.push(LineError {
                        line,
                        message: format!("the value of `{name}` is not valid base64: {e}"),
                    });
                    continue;
                }
            }
        } else if rest.starts_with('<') {
            errors.push(LineError {
                line,
                message: format!("`{name}` takes its value from a URL, which godwit does not fetch; export the value inline"),
            });
            continue;
        } else {
            rest.trim_start_matches(' ').to_string()
        };
        match (&mut current, name.as_str()) {
            (None, "version") if out.is_empty() => {
                if value.trim() != "1" {
                    errors.push(LineError {
                        line,
                        message: format!("LDIF version `{value}` is not 1"),
                    });
                }
            }
            (None, "dn") => {
                current = Some(Entry {
                    line,
                    dn: value,
                    attrs: HashMap::new(),
                })
            }
            (None, _) => errors.push(LineError {
                line,
                message: format!("`{name}` before any `dn:`; an entry starts with its dn"),
            }),
            (Some(_), "changetype") => errors.push(LineError {
                line,
                message: "a change record (changetype) is not a directory export; export the entries with ldapsearch or slapcat".into(),
            }),
            (Some(e), _) => e.attrs.entry(name).or_default().push(Value { line, text: value }),
        }
    }
    out.extend(current);
    out
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

const GROUP_CLASSES: [&str; 5] = [
    "groupofnames",
    "groupofuniquenames",
    "group",
    "mailgroup",
    "groupofurls",
];

/// Parses and checks a whole LDIF file; `platform` is the platform of
/// entries that carry no `godwitPlatform`.
pub fn parse(
    text: &str,
    rules: &Rules,
    platform: Option<&str>,
) -> Result<Vec<crate::directory::DirectoryRow>, Vec<LineError>> {
    let mut errors = Vec::new();
    let entries = entries(text, &mut errors);
    let mail_of: HashMap<String, String> = entries
        .iter()
        .filter_map(|e| Some((dn_key(&e.dn), normalize_address(&e.first("mail")?.text))))
        .collect();
    let mut raws = Vec::new();
    for e in &entries {
        let Some(mail) = e.first("mail") else {
            continue; // containers, people without mail, the suffix itself
        };
        let classes: Vec<String> = e
            .all("objectclass")
            .map(|v| v.text.trim().to_ascii_lowercase())
            .collect();
        let mut kind = if classes.iter().any(|c| GROUP_CLASSES.contains(&c.as_str())) {
            "group".to_string()
        } else {
            match e.first("msexchrecipienttypedetails").map(|v| v.text.trim()) {
                Some("4") => "shared".into(),
                Some("16" | "32") => "resource".into(),
                _ => "user".into(),
            }
        };
        if let Some(k) = e.first("godwitkind") {
            kind = k.text.clone();
        }
        let address = normalize_address(&mail.text);
        let mut aliases: Vec<String> = Vec::new();
        for v in e
            .all("mailalternateaddress")
            .chain(e.all("maillocaladdress"))
        {
            aliases.push(normalize_address(&v.text));
        }
        for v in e.all("proxyaddresses") {
            // AD: `SMTP:` marks the primary, `smtp:` the others; X500:, SIP: ... are not mail.
            if let Some(a) = v
                .text
                .get(..5)
                .filter(|p| p.eq_ignore_ascii_case("smtp:"))
                .map(|_| &v.text[5..])
            {
                aliases.push(normalize_address(a));
            }
        }
        aliases.retain(|a| *a != address);
        aliases.sort();
        aliases.dedup();
        let mut members = Vec::new();
        for v in e.all("member").chain(e.all("uniquemember")) {
            // uniqueMember may end in `#'0101'B` (an optional UID).
            let dn = v.text.rsplit_once('#').map_or(v.text.as_str(), |(d, _)| d);
            match mail_of.get(&dn_key(dn)) {
                Some(m) => members.push(m.clone()),
                None => errors.push(LineError {
                    line: v.line,
                    message: format!(
                        "member `{}` of {address} is not an entry with a mail attribute in this file; export the members too",
                        truncate(dn)
                    ),
                }),
            }
        }
        for v in e
            .all("rfc822mailmember")
            .chain(e.all("mgrprfc822mailmember"))
        {
            members.push(normalize_address(&v.text));
        }
        members.sort();
        members.dedup();
        let platform = match (e.first("godwitplatform"), platform) {
            (Some(p), _) => p.text.trim().to_string(),
            (None, Some(p)) => p.to_string(),
            (None, None) => {
                errors.push(LineError {
                    line: e.line,
                    message: format!("{address} has no godwitPlatform; give the platform that owns these entries with --platform"),
                });
                continue;
            }
        };
        raws.push(Raw {
            line: e.line,
            address: mail.text.clone(),
            display_name: e
                .first("displayname")
                .or_else(|| e.first("cn"))
                .map(|v| v.text.trim().to_string())
                .unwrap_or_default(),
            kind,
            aliases,
            members,
            platform,
        });
    }
    check(raws, rules, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Kind;

    fn parse_with(
        text: &str,
        platform: Option<&str>,
    ) -> Result<Vec<crate::directory::DirectoryRow>, Vec<LineError>> {
        let platforms = vec!["old".to_string(), "new".to_string()];
        let accepted = |d: &str| d == "example.com";
        parse(
            text,
            &Rules {
                accepted_domain: &accepted,
                platforms: &platforms,
            },
            platform,
        )
    }

    /// What slapcat and ldifde write: a version line, comments, folded
    /// lines, base64, the suffix and an OU without mail, AD proxyAddresses.
    const EXPORT: &str = "version: 1\n\
# the suffix\n\
dn: dc=example,dc=com\n\
objectClass: dcObject\n\
dc: example\n\
\n\
dn: ou=people,dc=example,dc=com\n\
objectClass: organizationalUnit\n\
\n\
dn: uid=alice,ou=people,dc=example,dc=com\n\
objectClass: inetOrgPerson\n\
cn: Alice\n\
displayName:: TWFydGluLCBBbGljZSDDqQ==\n\
mail: Alice@Example.com\n\
mailAlternateAddress: a.martin@exa\n mple.com\n\
proxyAddresses: SMTP:alice@example.com\n\
proxyAddresses: smtp:am@example.com\n\
proxyAddresses: X500:/o=Org/cn=alice\n\
\n\
dn: cn=Room 1,ou=rooms,dc=example,dc=com\n\
objectClass: user\n\
mail: room1@example.com\n\
msExchRecipientTypeDetails: 16\n\
godwitPlatform: new\n\
\n\
dn: cn=Sales,ou=groups,dc=example,dc=com\n\
objectClass: groupOfNames\n\
mail: sales@example.com\n\
member: uid=alice, ou=people, dc=example, dc=com\n\
member: CN=Room 1,OU=rooms,DC=example,DC=com\n\
rfc822MailMember: partner@elsewhere.test\n";

    #[test]
    fn reads_a_directory_export() {
        let rows = parse_with(EXPORT, Some("old")).unwrap();
        assert_eq!(rows.len(), 3, "{rows:?}");
        let alice = &rows[0];
        assert_eq!(alice.address, "alice@example.com");
        assert_eq!(alice.display_name, "Martin, Alice é");
        assert_eq!(alice.kind, Kind::User);
        assert_eq!(
            alice.aliases,
            vec!["a.martin@example.com", "am@example.com"]
        );
        assert_eq!(alice.platform, "old");
        assert_eq!(alice.line, 10);
        let room = &rows[1];
        assert_eq!((room.kind, room.platform.as_str()), (Kind::Resource, "new"));
        let sales = &rows[2];
        assert_eq!(sales.kind, Kind::Group);
        assert_eq!(
            sales.members,
            vec![
                "alice@example.com",
                "partner@elsewhere.test",
                "room1@example.com"
            ]
        );
    }

    #[test]
    fn each_problem_names_its_line() {
        let cases: [(&str, usize, &str); 8] = [
            (
                "dn: uid=a,dc=x\nmail: a@example.com\n",
                1,
                "has no godwitPlatform",
            ),
            (
                "dn: uid=a,dc=x\nchangetype: modify\nmail: a@example.com\n",
                2,
                "change record",
            ),
            ("dn: uid=a,dc=x\nmail:: !!!\n", 2, "not valid base64"),
            ("dn: uid=a,dc=x\nmail:< file:///etc/passwd\n", 2, "URL"),
            ("mail: a@example.com\n", 1, "before any `dn:`"),
            (
                "dn: cn=g,dc=x\nobjectClass: groupOfNames\nmail: g@example.com\nmember: uid=nobody,dc=x\ngodwitPlatform: old\n",
                4,
                "is not an entry with a mail attribute",
            ),
            (
                "dn: uid=a,dc=x\nmail: a@elsewhere.test\ngodwitPlatform: old\n",
                1,
                "outside domains.accepted",
            ),
            (
                "dn: uid=a,dc=x\nmail: a@example.com\ngodwitPlatform: mars\n",
                1,
                "platform `mars` is not configured",
            ),
        ];
        for (text, line, words) in cases {
            let errs = parse_with(text, None).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.line == line && e.message.contains(words)),
                "{text:?}: want line {line} `{words}`, got {errs:?}"
            );
        }
        // A duplicate across entries names the first one's line.
        let dup = "dn: uid=a,dc=x\nmail: a@example.com\n\ndn: uid=b,dc=x\nmail: b@example.com\nmailAlternateAddress: a@example.com\n";
        let errs = parse_with(dup, Some("old")).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "line 4: alias `a@example.com` collides with a mailbox on line 1"
        );
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "\n\n",
            " x",
            "dn:",
            "dn: a\n \n",
            ":",
            "dn: a\nmail:: ",
            "dn: a\nmail: \u{0}@x\n",
            "dn: a\r\nmail: b@example.com\r\n",
        ] {
            let _ = parse_with(text, Some("old"));
        }
    }
}
