//! The IMAP dialogue before login (RFC 3501, RFC 9051): parsing only, no I/O.
//! The driver assembles one command, literals included, with
//! `trailing_literal`, and `parse` turns it into a `Command`.

/// Longest command line before login; Dovecot's limit is 64 KB, RFC 7162 4
/// asks for at least 8192 octets.
pub const MAX_LINE: usize = 8192;
/// Longest literal before login: credentials only.
pub const MAX_LITERAL: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    /// RFC 2971: answered `* ID NIL`.
    Id,
    Login {
        user: String,
        password: String,
    },
    /// `initial`: the SASL-IR initial response (RFC 4959), still base64.
    Authenticate {
        mechanism: String,
        initial: Option<String>,
    },
    /// Any other command: valid only after login, so BAD here.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    pub tag: String,
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The tag, when the line had one, so the BAD reply can carry it.
    pub tag: Option<String>,
    pub reason: &'static str,
}

/// A literal announced at the end of a line (`{n}` or, RFC 7888, `{n+}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Literal {
    pub len: usize,
    /// `{n+}`: the client does not wait for a `+` continuation.
    pub non_sync: bool,
}

/// The literal that ends `line` (without its CRLF), if any.
pub fn trailing_literal(line: &[u8]) -> Option<Literal> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let mut digits = &body[open + 1..];
    let non_sync = digits.last() == Some(&b'+');
    if non_sync {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(Literal { len, non_sync })
}

/// Parses one whole command: `tag SP name [SP args]`, literals inline as
/// `{n}\r\n` followed by n octets.
pub fn parse(cmd: &[u8]) -> Result<Tagged, ParseError> {
    let mut p = Parser { s: cmd, i: 0 };
    let tag = p.atom();
    if tag.is_empty() || tag.contains('+') {
        // RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+">.
        return Err(ParseError {
            tag: None,
            reason: "Error in IMAP command received by server.",
        });
    }
    let bad = |reason| ParseError {
        tag: Some(tag.clone()),
        reason,
    };
    if !p.sp() {
        return Err(bad("Error in IMAP command received by server."));
    }
    let name = p.atom().to_ascii_uppercase();
    let command = match name.as_str() {
        "" => return Err(bad("Error in IMAP command received by server.")),
        "CAPABILITY" => Command::Capability,
        "NOOP" => Command::Noop,
        "LOGOUT" => Command::Logout,
        "STARTTLS" => Command::StartTls,
        "ID" => {
            // RFC 2971 3.1: `ID NIL` or a parenthesised list; the front
            // answers the same either way, so the arguments are skipped.
            p.i = p.s.len();
            Command::Id
        }
        "LOGIN" => {
            let user = p.sp().then(|| p.astring()).flatten();
            let password = p.sp().then(|| p.astring()).flatten();
            match (user, password) {
                (Some(user), Some(password)) => Command::Login { user, password },
                _ => return Err(bad("Invalid arguments.")),
            }
        }
        "AUTHENTICATE" => {
            if !p.sp() {
                return Err(bad("Invalid arguments."));
            }
            let mechanism = p.atom().to_ascii_uppercase();
            if mechanism.is_empty() {
                return Err(bad("Invalid arguments."));
            }
            let initial = if p.sp() {
                let ir = p.atom();
                if ir.is_empty() {
                    return Err(bad("Invalid arguments."));
                }
                Some(ir)
            } else {
                None
            };
            Command::Authenticate { mechanism, initial }
        }
        _ => {
            p.i = p.s.len();
            Command::Other(name)
        }
    };
    if p.i != p.s.len() {
        return Err(bad("Invalid arguments."));
    }
    Ok(Tagged { tag, command })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn sp(&mut self) -> bool {
        if self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// ASTRING-CHAR run (RFC 3501 9: any CHAR except atom-specials, plus `]`).
    fn atom(&mut self) -> String {
        let start = self.i;
        while let Some(&b) = self.s.get(self.i) {
            let special = b <= b' '
                || b >= 0x7f
                || matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\');
            if special {
                break;
            }
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    /// astring = 1*ASTRING-CHAR / string (quoted or literal), RFC 3501 9.
    /// Quoted strings carry UTF-8 (RFC 6855 3); anything else is refused.
    fn astring(&mut self) -> Option<String> {
        match self.s.get(self.i)? {
            b'"' => {
                self.i += 1;
                let mut out = Vec::new();
                loop {
                    match *self.s.get(self.i)? {
                        b'"' => {
                            self.i += 1;
                            break;
                        }
                        b'\\' => {
                            let c = *self.s.get(self.i + 1)?;
                            if c != b'"' && c != b'\\' {
                                return None;
                            }
                            out.push(c);
                            self.i += 2;
                        }
                        b'\r' | b'\n' | 0 => return None,
                        c => {
                            out.push(c);
                            self.i += 1;
                        }
                    }
                }
                String::from_utf8(out).ok()
            }
            b'{' => {
                let close = self.s[self.i..].iter().position(|&b| b == b'}')? + self.i;
                let lit = trailing_literal(&self.s[self.i..=close])?;
                let start = close + 1;
                if self.s.get(start..start + 2)? != b"\r\n" {
                    return None;
                }
                let data = self.s.get(start + 2..start + 2 + lit.len)?;
                self.i = start + 2 + lit.len;
                if data.contains(&0) {
                    return None;
                }
                String::from_utf8(data.to_vec()).ok()
            }
            _ => {
                let a = self.atom();
                (!a.is_empty()).then_some(a)
            }
        }
    }
}

/// `s` as an IMAP quoted string, or `None` if it cannot be one (CR, LF or
/// NUL: RFC 3501 9 `QUOTED-CHAR`).
pub fn quote(s: &str) -> Option<String> {
    if s.contains(['\r', '\n', '\0']) {
        return None;
    }
    Some(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// The front's own capabilities before login. RFC 3501 6.2.3 and RFC 9051
/// 6.2.3: with clear-text logins disallowed, LOGINDISABLED is advertised
/// before TLS and AUTH=PLAIN only once TLS is up (RFC 8314 4.1); STARTTLS
/// only while there is a certificate and no TLS yet.
pub fn capabilities(tls_available: bool, tls_active: bool, plaintext_ok: bool) -> String {
    let mut caps = vec!["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"];
    if tls_available && !tls_active {
        caps.push("STARTTLS");
    }
    if tls_active || plaintext_ok {
        caps.push("AUTH=PLAIN");
    } else {
        caps.push("LOGINDISABLED");
    }
    caps.join(" ")
}

/// A backend's answer line: `(tag, status, rest)` for a tagged or untagged
/// status response, e.g. `A1 OK [CAPABILITY ...] Logged in`.
pub fn status(line: &str) -> Option<(&str, &str, &str)> {
    let (tag, rest) = line.split_once(' ')?;
    let (st, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((tag, st, text))
}

/// Whether a CAPABILITY list (the greeting's response code, or the
/// `* CAPABILITY` data) names `cap`.
pub fn has_capability(line: &str, cap: &str) -> bool {
    line.split([' ', '[', ']'])
        .any(|w| w.eq_ignore_ascii_case(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(tag: &str, c: Command) -> Result<Tagged, ParseError> {
        Ok(Tagged {
            tag: tag.into(),
            command: c,
        })
    }

    fn login(u: &str, p: &str) -> Command {
        Command::Login {
            user: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn commands_table() {
        let bad = |tag: Option<&str>, reason| {
            Err(ParseError {
                tag: tag.map(str::to_string),
                reason,
            })
        };
        let syntax = "Error in IMAP command received by server.";
        let args = "Invalid arguments.";
        let cases: Vec<(&[u8], Result<Tagged, ParseError>)> = vec![
            (b"a1 CAPABILITY", cmd("a1", Command::Capability)),
            (b"a1 capability", cmd("a1", Command::Capability)),
            (b"x NOOP", cmd("x", Command::Noop)),
            (b"x LOGOUT", cmd("x", Command::Logout)),
            (b"x StartTLS", cmd("x", Command::StartTls)),
            (b"x ID (\"name\" \"mutt\")", cmd("x", Command::Id)),
            (b"x ID NIL", cmd("x", Command::Id)),
            (
                b"a LOGIN alice@example.com secret",
                cmd("a", login("alice@example.com", "secret")),
            ),
            (
                b"a LOGIN \"alice@example.com\" \"s e\\\"c\\\\r\"",
                cmd("a", login("alice@example.com", "s e\"c\\r")),
            ),
            (
                b"a LOGIN {17}\r\nalice@example.com {6}\r\nse cr\"",
                cmd("a", login("alice@example.com", "se cr\"")),
            ),
            (
                b"a LOGIN {3+}\r\na@b \"p\xc3\xa4ss\"",
                cmd("a", login("a@b", "p\u{e4}ss")),
            ),
            (b"a LOGIN alice", bad(Some("a"), args)),
            (b"a LOGIN alice secret extra", bad(Some("a"), args)),
            (b"a LOGIN {9}\r\nshort", bad(Some("a"), args)),
            (b"a LOGIN \"open secret", bad(Some("a"), args)),
            (b"a LOGIN \"a\\x\" p", bad(Some("a"), args)),
            (b"a LOGIN {3}\r\na\0b p", bad(Some("a"), args)),
            (
                b"a AUTHENTICATE PLAIN",
                cmd(
                    "a",
                    Command::Authenticate {
                        mechanism: "PLAIN".into(),
                        initial: None,
                    },
                ),
            ),
            (
                b"a AUTHENTICATE plain AGFAYgBj",
                cmd(
                    "a",
                    Command::Authenticate {
                        mechanism: "PLAIN".into(),
                        initial: Some("AGFAYgBj".into()),
                    },
                ),
            ),
            (
                b"a AUTHENTICATE PLAIN =",
                cmd(
                    "a",
                    Command::Authenticate {
                        mechanism: "PLAIN".into(),
                        initial: Some("=".into()),
                    },
                ),
            ),
            (b"a AUTHENTICATE", bad(Some("a"), args)),
            (b"a SELECT INBOX", cmd("a", Command::Other("SELECT".into()))),
            (b"a", bad(Some("a"), syntax)),
            (b"", bad(None, syntax)),
            (b" CAPABILITY", bad(None, syntax)),
            (b"+ CAPABILITY", bad(None, syntax)),
            (b"a  CAPABILITY", bad(Some("a"), syntax)),
            (b"a CAPABILITY now", bad(Some("a"), args)),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn literals_table() {
        let lit = |len, non_sync| Some(Literal { len, non_sync });
        let cases: [(&[u8], Option<Literal>); 8] = [
            (b"a LOGIN {5}", lit(5, false)),
            (b"a LOGIN {5+}", lit(5, true)),
            (b"a LOGIN alice {0}", lit(0, false)),
            (b"a LOGIN alice", None),
            (b"a LOGIN {}", None),
            (b"a LOGIN {+}", None),
            (b"a LOGIN {5a}", None),
            (b"a LOGIN {99999999999}", None),
        ];
        for (line, want) in cases {
            assert_eq!(
                trailing_literal(line),
                want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn capabilities_follow_tls_state() {
        let caps = |a, t, p| capabilities(a, t, p);
        assert_eq!(
            caps(true, false, false),
            "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED"
        );
        assert_eq!(
            caps(true, true, false),
            "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN"
        );
        assert_eq!(
            caps(false, false, true),
            "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN"
        );
        assert_eq!(
            caps(true, false, true),
            "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS AUTH=PLAIN"
        );
        assert_eq!(
            caps(false, false, false),
            "IMAP4rev1 SASL-IR LITERAL+ ID LOGINDISABLED"
        );
    }

    #[test]
    fn backend_lines() {
        assert_eq!(
            status("A1 OK [CAPABILITY IMAP4rev1] Logged in"),
            Some(("A1", "OK", "[CAPABILITY IMAP4rev1] Logged in"))
        );
        assert_eq!(status("* OK"), Some(("*", "OK", "")));
        assert!(has_capability(
            "* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready",
            "STARTTLS"
        ));
        assert!(!has_capability(
            "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready",
            "STARTTLS"
        ));
        assert_eq!(quote("a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(quote("a\r\nb"), None);
    }
}
