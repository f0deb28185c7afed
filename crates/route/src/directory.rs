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
//! `;`-separated. Fields may be quoted as in RFC 4180 ("" is a quote; the
//! `csv` crate reads them). Blank lines and lines starting with `#` are
//! skipped. Addresses are checked by [`Address::parse_plain`]. Every problem
//! is reported with its line number, and a file with any problem is refused
//! whole.

use crate::model::Kind;
use crate::{Address, normalize_address};
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

/// RFC 4180 records (read by the `csv` crate), each with the line it
/// starts on. Blank lines and `#` comment lines are not records.
fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, LineError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        // Rows may have too few or too many fields: `parse` names them all.
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let newlines: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
    let line_of = |byte: usize| 1 + newlines.partition_point(|&i| i < byte);
    let mut out = Vec::new();
    let mut record = csv::StringRecord::new();
    // The line and byte offset of the last record read.
    let mut last = None;
    loop {
        let read = reader.read_record(&mut record).map_err(|e| LineError {
            line: e.position().map_or(1, |p| line_of(p.byte() as usize)),
            message: e.to_string(),
        })?;
        if !read {
            break;
        }
        // The reader's position is where it began to read: before the
        // blank and comment lines it skipped, and not counting the latter.
        let start = record_start(text, record.position().map_or(0, |p| p.byte() as usize));
        let line = line_of(start);
        last = Some((line, start));
        let fields: Vec<String> = record.iter().map(str::to_string).collect();
        // A line of spaces is as blank as an empty one.
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue;
        }
        out.push((line, fields));
    }
    // The reader ends a quoted field that is never closed at the end of the
    // input, silently; that swallows every line after it, so refuse it.
    if let Some((line, start)) = last
        && ends_quoted(text.get(start..).unwrap_or(""))
    {
        return Err(LineError {
            line,
            message: "a quoted field is never closed".into(),
        });
    }
    Ok(out)
}

/// Where the record really starts when the reader began at byte `at`:
/// past the empty lines and the `#` lines it skips (as csv-core does).
fn record_start(text: &str, mut at: usize) -> usize {
    let b = text.as_bytes();
    while let Some(c) = b.get(at) {
        match c {
            b'\n' | b'\r' => at += 1,
            b'#' => at = text[at..].find('\n').map_or(b.len(), |i| at + i + 1),
            _ => break,
        }
    }
    at
}

/// Whether `record` (the text of the last record, to the end of the input)
/// ends inside a quoted field: RFC 4180 2.5-2.7, a field that starts with
/// `"` runs to the next `"` not doubled.
fn ends_quoted(record: &str) -> bool {
    let mut quoted = false;
    let mut field_start = true;
    let mut chars = record.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            // `""` inside quotes is one quote; a lone `"` closes the field.
            if c == '"' && chars.next_if_eq(&'"').is_none() {
                quoted = false;
            }
        } else if c == '"' && field_start {
            quoted = true;
        }
        field_start = !quoted && matches!(c, ',' | '\n' | '\r');
    }
    quoted
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
            let domain = match Address::parse_plain(a) {
                Ok(parsed) => parsed.domain,
                Err(m) => {
                    err(m);
                    return false;
                }
            };
            if !(rules.accepted_domain)(&domain) {
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
            if let Err(e) = Address::parse_plain(m) {
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

    /// The two things the csv crate leaves to us: where a record starts
    /// past skipped lines, and a quote never closed.
    #[test]
    fn record_starts_and_unclosed_quotes() {
        for (text, at, start) in [
            ("a,b\n", 0, 0),
            ("# c\na,b\n", 0, 4),
            ("\n\r\n# c \"x\n\na,b", 0, 11),
            ("x\n# only comments", 2, 17),
        ] {
            assert_eq!(record_start(text, at), start, "{text:?}");
        }
        for (record, open) in [
            ("a,b\n", false),
            ("a,\"b\n", true),
            ("a,\"b\"\"\n", true),
            ("a,\"b\"\"c\"\n", false),
            ("a,Mr \"X\n", false),
            ("\"a\nb\",c\nd,\"e", true),
            ("\"a\nb\",c\nd,e", false),
        ] {
            assert_eq!(ends_quoted(record), open, "{record:?}");
        }
        // A quote inside an unquoted field is a character, not an error.
        let rows = rules_parse(&format!("{HEADER}a@example.com,Mr \"X,user,,,old\n")).unwrap();
        assert_eq!(rows[0].display_name, "Mr \"X");
        // A line of spaces is blank, and line numbers count it.
        let errs = rules_parse(&format!("{HEADER}   \n# c\nx,A,user,,,old\n")).unwrap_err();
        assert_eq!(errs[0].line, 4, "{errs:?}");
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
