//! The POP3 dialogue before login (RFC 1939 AUTHORIZATION state, RFC 2449
//! CAPA, RFC 2595 STLS, RFC 5034 AUTH): parsing only, no I/O.

/// RFC 2449 4: a command line is at most 255 octets; AUTH's initial
/// response may be longer (RFC 5034 4), so allow a little more.
pub const MAX_LINE: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capa,
    Quit,
    Stls,
    User(String),
    Pass(String),
    /// `AUTH` alone lists the mechanisms.
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    /// Valid only after login (or unknown): -ERR here.
    Other(String),
}

/// Parses one line (without CRLF). Keywords are case-insensitive (RFC 1939
/// 3); PASS takes the rest of the line, spaces included (RFC 1939 7).
pub fn parse(line: &str) -> Result<Command, &'static str> {
    let (kw, arg) = line.split_once(' ').unwrap_or((line, ""));
    let kw = kw.to_ascii_uppercase();
    let one = |arg: &str| -> Result<String, &'static str> {
        if arg.is_empty() || arg.contains(' ') {
            Err("Invalid arguments.")
        } else {
            Ok(arg.to_string())
        }
    };
    Ok(match kw.as_str() {
        "CAPA" => Command::Capa,
        "QUIT" => Command::Quit,
        "STLS" => Command::Stls,
        "USER" => Command::User(one(arg)?),
        "PASS" => {
            if arg.is_empty() {
                return Err("Invalid arguments.");
            }
            Command::Pass(arg.to_string())
        }
        "AUTH" => {
            let mut it = arg.split(' ').filter(|s| !s.is_empty());
            let mechanism = it.next().map(str::to_ascii_uppercase);
            let initial = it.next().map(str::to_string);
            if it.next().is_some() {
                return Err("Invalid arguments.");
            }
            Command::Auth { mechanism, initial }
        }
        "" => return Err("Unknown command."),
        _ => Command::Other(kw),
    })
}

/// The CAPA list before login (RFC 2449 6). USER and SASL PLAIN only where a
/// clear-text password may be sent (RFC 2595 4: after STLS, or when allowed).
pub fn capabilities(
    tls_available: bool,
    tls_active: bool,
    plaintext_ok: bool,
) -> Vec<&'static str> {
    let mut caps = vec!["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"];
    if tls_available && !tls_active {
        caps.push("STLS");
    }
    if tls_active || plaintext_ok {
        caps.push("USER");
        caps.push("SASL PLAIN");
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_table() {
        let cases: Vec<(&str, Result<Command, &str>)> = vec![
            ("CAPA", Ok(Command::Capa)),
            ("capa", Ok(Command::Capa)),
            ("QUIT", Ok(Command::Quit)),
            ("STLS", Ok(Command::Stls)),
            (
                "USER alice@example.com",
                Ok(Command::User("alice@example.com".into())),
            ),
            ("USER", Err("Invalid arguments.")),
            ("USER a b", Err("Invalid arguments.")),
            ("PASS se cret ", Ok(Command::Pass("se cret ".into()))),
            ("PASS", Err("Invalid arguments.")),
            (
                "AUTH",
                Ok(Command::Auth {
                    mechanism: None,
                    initial: None,
                }),
            ),
            (
                "AUTH plain",
                Ok(Command::Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: None,
                }),
            ),
            (
                "AUTH PLAIN AGFAYgBj",
                Ok(Command::Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: Some("AGFAYgBj".into()),
                }),
            ),
            ("AUTH PLAIN a b", Err("Invalid arguments.")),
            ("STAT", Ok(Command::Other("STAT".into()))),
            ("", Err("Unknown command.")),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), want, "{line}");
        }
    }

    #[test]
    fn capa_follows_tls_state() {
        assert!(capabilities(true, false, false).contains(&"STLS"));
        assert!(!capabilities(true, false, false).contains(&"USER"));
        assert!(capabilities(true, true, false).contains(&"USER"));
        assert!(!capabilities(true, true, false).contains(&"STLS"));
        assert!(capabilities(false, false, true).contains(&"SASL PLAIN"));
    }
}
