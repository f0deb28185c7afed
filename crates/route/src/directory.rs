//! Reading a directory export: CSV with a header line.
//!
//! ```text
//! address,display_name,kind,aliases,members,platform
//! alice@example.com,Alice Martin,user,a.martin@example.com;am@example.com,,old
//! sales@example.com,Sales,group,,alice@example.com;bob@example.com,old
//! ```
//!
//! Columns may come in any order; `address`, `kind` and `platform` are
//! required, `display_name`, `aliases` and `members` optional. Lists are
//! `;`-separated. Fields may be quoted as in RFC 4180 ("" is a quote). Blank
//! lines and lines starting with `#` are skipped. Every problem is reported
//! with its line number, and a file with any problem is refused whole.

use crate::model::Kind;
use crate::normalize_address;
use std::collections::HashMap;
use std::fmt;

/// One object from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryRow {
    pub line: usize,
    pub address: String,
    pub display_name: String,
    pub kind: Kind,
    pub aliases: Vec<String>,
    pub members: Vec<String>,
    pub platform: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// What the file is checked against.
pub struct Rules<'a> {
    pub accepted_domain: &'a dyn Fn(&str) -> bool,
    pub platforms: &'a [String],
}

/// RFC 4180 records, each with the line it starts on.
fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, LineError> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err(LineError {
                        line: start,
                        message: "a quoted field is never closed".into(),
                    });
                }
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if field.trim().is_empty() && !was_quoted => {
                    field.clear();
                    quoted = true;
                    was_quoted = true;
                }
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    break;
                }
                _ => field.push(c),
            }
        }
        fields.push(field);
        let blank = fields.len() == 1 && fields[0].trim().is_empty();
        let comment = fields[0].trim_start().starts_with('#');
        if !blank && !comment {
            out.push((start, fields));
        }
    }
    Ok(out)
}

/// Syntax of an address as the directory accepts it: local@domain, no
/// spaces, controls or the specials that would need quoting (RFC 5322 3.2.3).
pub fn check_address(address: &str) -> Result<(), String> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(format!(
            "`{address}` is not an address (expected local@domain)"
        ));
    };
    if local.is_empty() || local.len() > 64 {
        return Err(format!(
            "`{address}`: the local part must be 1 to 64 characters"
        ));
    }
    if let Some(c) = address
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || "<>()[]\\,;:\"".contains(*c))
    {
        return Err(format!(
            "`{address}` contains `{c}`, which an address cannot"
        ));
    }
    if local.contains('@') {
        return Err(format!("`{address}` has more than one @"));
    }
    let labels_ok = !domain.is_empty()
        && domain.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    if !labels_ok {
        return Err(format!("`{address}`: `{domain}` is not a domain name"));
    }
    Ok(())
}

fn list(field: &str) -> Vec<String> {
    field
        .split(';')
        .map(normalize_address)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Parses and checks a whole file. Returns every problem, not just the first,
/// so one round of fixes is enough.
pub fn parse(text: &str, rules: &Rules) -> Result<Vec<DirectoryRow>, Vec<LineError>> {
    let recs = records(text).map_err(|e| vec![e])?;
    let Some(((header_line, header), rows)) = recs.split_first() else {
        return Err(vec![LineError {
            line: 1,
            message: "the file is empty; expected the header address,display_name,kind,aliases,members,platform".into(),
        }]);
    };
    let mut errors = Vec::new();
    let mut col: HashMap<&str, usize> = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        let name = name.trim().to_ascii_lowercase();
        let known = [
            "address",
            "display_name",
            "kind",
            "aliases",
            "members",
            "platform",
        ];
        match known.iter().find(|k| **k == name) {
            Some(k) => {
                col.insert(k, i);
            }
            None => errors.push(LineError {
                line: *header_line,
                message: format!(
                    "unknown column `{name}` in the header (known: {})",
                    known.join(", ")
                ),
            }),
        }
    }
    for required in ["address", "kind", "platform"] {
        if !col.contains_key(required) {
            errors.push(LineError {
                line: *header_line,
                message: format!("the header lacks the `{required}` column"),
            });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let get = |fields: &[String], name: &str| -> String {
        col.get(name)
            .and_then(|i| fields.get(*i))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut raws = Vec::new();
    for (line, fields) in rows {
        if fields.len() != header.len() {
            errors.push(LineError {
                line: *line,
                message: format!(
                    "{} fields, but the header has {}",
                    fields.len(),
                    header.len()
                ),
            });
            continue;
        }
        raws.push(Raw {
            line: *line,
            address: get(fields, "address"),
            display_name: get(fields, "display_name"),
            kind: get(fields, "kind"),
            aliases: list(&get(fields, "aliases")),
            members: list(&get(fields, "members")),
            platform: get(fields, "platform"),
        });
    }
    check(raws, rules, errors)
}

/// One object as a reader (CSV or LDIF) found it, before any check.
#[derive(Debug, Default)]
pub(crate) struct Raw {
    pub line: usize,
    pub address: String,
    pub display_name: String,
    pub kind: String,
    pub aliases: Vec<String>,
    pub members: Vec<String>,
    pub platform: String,
}

/// The checks every reader shares: addresses, domains, kinds, platforms,
/// duplicates and collisions. `errors` may hold the reader's own problems;
/// any problem refuses the whole file.
pub(crate) fn check(
    raws: Vec<Raw>,
    rules: &Rules,
    mut errors: Vec<LineError>,
) -> Result<Vec<DirectoryRow>, Vec<LineError>> {
    let mut out = Vec::new();
    // address → (line, what) for every mailbox and alias seen so far.
    let mut seen: HashMap<String, (usize, &'static str)> = HashMap::new();
    for raw in raws {
        let line = raw.line;
        let mut err = |m: String| errors.push(LineError { line, message: m });
        let address = normalize_address(&raw.address);
        let in_domain = |a: &str, err: &mut dyn FnMut(String)| -> bool {
            if let Err(m) = check_address(a) {
                err(m);
                return false;
            }
            let domain = a.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if !(rules.accepted_domain)(domain) {
                err(format!(
                    "`{a}` is outside domains.accepted; add the domain to the configuration or remove the row"
                ));
                return false;
            }
            true
        };
        let address_ok = in_domain(&address, &mut err);
        let kind = match raw.kind.parse::<Kind>() {
            Ok(k) => Some(k),
            Err(m) => {
                err(m);
                None
            }
        };
        let platform = raw.platform;
        if !rules.platforms.contains(&platform) {
            err(format!(
                "platform `{platform}` is not configured (configured: {})",
                rules.platforms.join(", ")
            ));
        }
        if address_ok {
            match seen.get(&address) {
                Some((first, what)) => err(format!(
                    "duplicate address `{address}` (already {what} on line {first})"
                )),
                None => {
                    seen.insert(address.clone(), (line, "a mailbox"));
                }
            }
        }
        let aliases = raw.aliases;
        for a in &aliases {
            if !in_domain(a, &mut err) {
                continue;
            }
            match seen.get(a) {
                Some((first, what)) => {
                    err(format!("alias `{a}` collides with {what} on line {first}"))
                }
                None => {
                    seen.insert(a.clone(), (line, "an alias"));
                }
            }
        }
        let members = raw.members;
        if !members.is_empty() && kind.is_some_and(|k| k != Kind::Group) {
            err(format!(
                "only a group has members; `{address}` is a {}",
                kind.unwrap()
            ));
        }
        for m in &members {
            // Members may live anywhere (external addresses are common in lists).
            if let Err(e) = check_address(m) {
                err(format!("member {e}"));
            }
        }
        if let Some(kind) = kind {
            out.push(DirectoryRow {
                line,
                address,
                display_name: raw.display_name,
                kind,
                aliases,
                members,
                platform,
            });
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        errors.sort_by_key(|e| e.line);
        errors.dedup();
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_parse(text: &str) -> Result<Vec<DirectoryRow>, Vec<LineError>> {
        let platforms = vec!["old".to_string(), "new".to_string()];
        let accepted = |d: &str| d == "example.com" || d == "example.org";
        parse(
            text,
            &Rules {
                accepted_domain: &accepted,
                platforms: &platforms,
            },
        )
    }

    const HEADER: &str = "address,display_name,kind,aliases,members,platform\n";

    #[test]
    fn reads_a_good_file() {
        let text = format!(
            "{HEADER}# a comment\nAlice@Example.com,\"Martin, Alice\",user,a.martin@example.com; am@example.org,,old\n\n\
             sales@example.com,Sales,group,,alice@example.com;partner@elsewhere.test,new\r\n\
             room1@example.com,\"Room \"\"One\"\"\",resource,,,old\n"
        );
        let rows = rules_parse(&text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].address, "alice@example.com");
        assert_eq!(rows[0].display_name, "Martin, Alice");
        assert_eq!(
            rows[0].aliases,
            vec!["a.martin@example.com", "am@example.org"]
        );
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[1].kind, Kind::Group);
        assert_eq!(rows[1].members.len(), 2);
        assert_eq!(rows[1].line, 5);
        assert_eq!(rows[2].display_name, "Room \"One\"");
    }

    #[test]
    fn each_problem_names_its_line() {
        // (file body after the header, expected line, expected words)
        let cases = [
            ("not-an-address,A,user,,,old\n", 2, "not an address"),
            (
                "a@example.com,A,user,,,old\nA@example.com,B,user,,,old\n",
                3,
                "duplicate address `a@example.com` (already a mailbox on line 2)",
            ),
            ("a@example.com,A,person,,,old\n", 2, "unknown kind `person`"),
            (
                "a@example.com,A,user,,,old\nb@example.com,B,user,a@example.com,,old\n",
                3,
                "alias `a@example.com` collides with a mailbox on line 2",
            ),
            (
                "b@example.com,B,user,x@example.com,,old\nc@example.com,C,user,x@example.com,,old\n",
                3,
                "alias `x@example.com` collides with an alias on line 2",
            ),
            (
                "b@example.com,B,user,a@example.com,,old\na@example.com,A,user,,,old\n",
                3,
                "duplicate address `a@example.com` (already an alias on line 2)",
            ),
            (
                "a@elsewhere.test,A,user,,,old\n",
                2,
                "outside domains.accepted",
            ),
            (
                "a@example.com,A,user,,,mars\n",
                2,
                "platform `mars` is not configured",
            ),
            (
                "a@example.com,A,user,,x@y.test,old\n",
                2,
                "only a group has members",
            ),
            (
                "a@example.com,A,user,,old\n",
                2,
                "5 fields, but the header has 6",
            ),
            ("a b@example.com,A,user,,,old\n", 2, "contains ` `"),
            ("a@example.com,\"A,user,,,old\n", 2, "never closed"),
        ];
        for (body, line, words) in cases {
            let errs = rules_parse(&format!("{HEADER}{body}")).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.line == line && e.message.contains(words)),
                "{body:?}: want line {line} `{words}`, got {errs:?}"
            );
        }
    }

    #[test]
    fn header_problems() {
        let errs = rules_parse("address,kind\na@example.com,user\n").unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "line 1: the header lacks the `platform` column"
        );
        let errs = rules_parse("address,kind,platform,colour\n").unwrap_err();
        assert!(errs[0].message.contains("unknown column `colour`"));
        assert!(rules_parse("").unwrap_err()[0].message.contains("empty"));
    }
}
