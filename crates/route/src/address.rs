//! One parser for the addresses an operator types (`route set`, `route
//! show`, ...): the mailbox syntax of RFC 5321 4.1.2 with the length limits
//! of 4.5.3.1, angle brackets allowed, so every command takes and refuses
//! the same things.

/// A mailbox address, lowercased as the routing map keys it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub local: String,
    pub domain: String,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// RFC 5322 3.2.3 atext, plus UTF-8 (RFC 6531 3.3).
fn atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

impl Address {
    pub fn parse(input: &str) -> Result<Address, String> {
        let s = input.trim();
        let s = match (s.strip_prefix('<'), s.ends_with('>')) {
            (Some(inner), true) => &inner[..inner.len() - 1],
            (None, false) => s,
            _ => return Err(format!("`{input}`: unbalanced angle brackets")),
        };
        let (local, domain) = if let Some(rest) = s.strip_prefix('"') {
            // Quoted-string local part: up to the closing quote, then '@'.
            let mut escaped = false;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map(|(i, _)| i)
                .ok_or_else(|| format!("`{input}`: unterminated quoted local part"))?;
            let after = &rest[end + 1..];
            let domain = after
                .strip_prefix('@')
                .ok_or_else(|| format!("`{input}` is not an address (expected local@domain)"))?;
            (&s[..end + 2], domain)
        } else {
            let mut parts = s.split('@');
            let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!(
                    "`{input}` is not an address: expected one @ between local part and domain"
                ));
            };
            // RFC 5321 4.1.2 Dot-string: atoms separated by single dots.
            if let Some(c) = local.chars().find(|&c| c != '.' && !atext(c)) {
                return Err(format!(
                    "`{input}` contains `{c}`, which an address cannot outside a quoted local part"
                ));
            }
            if local.is_empty() || local.split('.').any(str::is_empty) {
                return Err(format!("`{input}`: `{local}` is not a valid local part"));
            }
            (local, domain)
        };
        // RFC 5321 4.5.3.1.1 and 4.5.3.1.2.
        if local.len() > 64 {
            return Err(format!(
                "`{input}`: the local part is {} octets, more than 64 (RFC 5321 4.5.3.1.1)",
                local.len()
            ));
        }
        let domain = domain.trim_end_matches('.');
        if domain.is_empty() || domain.len() > 255 {
            return Err(format!(
                "`{input}`: the domain must be 1 to 255 octets (RFC 5321 4.5.3.1.2)"
            ));
        }
        let literal = domain.starts_with('[') && domain.ends_with(']');
        if !literal
            && domain.split('.').any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || l.starts_with('-')
                    || l.ends_with('-')
                    || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
            })
        {
            return Err(format!("`{input}`: `{domain}` is not a domain name"));
        }
        Ok(Address {
            local: local.to_lowercase(),
            domain: domain.to_lowercase(),
        })
    }
}

impl Address {
    /// An address as a directory export must spell it: what
    /// [`Address::parse`] accepts, already in the form the routing map keys
    /// (lowercase, no angle brackets, no trailing dot), and with neither a
    /// quoted local part nor a domain literal, which a directory cannot hold
    /// as a mailbox.
    pub fn parse_plain(input: &str) -> Result<Address, String> {
        if let Some(c) = input.chars().find(|c| "<>[]\"".contains(*c)) {
            return Err(format!("`{input}` contains `{c}`, which an address cannot"));
        }
        let a = Address::parse(input)?;
        if a.to_string() != input {
            return Err(format!(
                "`{input}` is not written as the address it names (`{a}`)"
            ));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_parser_for_every_command() {
        let long = format!("{}@example.com", "a".repeat(300));
        for (input, ok) in [
            ("alice@example.com", Some("alice@example.com")),
            ("<Alice@Example.COM>", Some("alice@example.com")),
            (
                " bob.smith+tag@example.org. ",
                Some("bob.smith+tag@example.org"),
            ),
            ("\"john doe\"@example.com", Some("\"john doe\"@example.com")),
            ("alice@[192.0.2.1]", Some("alice@[192.0.2.1]")),
            ("alice@@example.com", None),
            ("alice@example@com", None),
            ("alice", None),
            ("@example.com", None),
            ("alice.@example.com", None),
            ("a..b@example.com", None),
            ("alice@-bad.example", None),
            ("alice@exa mple.com", None),
            ("<alice@example.com", None),
            (long.as_str(), None),
        ] {
            let got = Address::parse(input).map(|a| a.to_string());
            match ok {
                Some(want) => assert_eq!(got.as_deref(), Ok(want), "{input}"),
                None => assert!(got.is_err(), "{input} accepted as {got:?}"),
            }
        }
        assert!(Address::parse(&long).unwrap_err().contains("64"));
    }

    #[test]
    fn a_directory_spells_addresses_plainly() {
        for (input, words) in [
            ("alice@example.com", None),
            ("o'neil+tag@example.com", None),
            ("a b@example.com", Some("contains ` `")),
            ("a,b@example.com", Some("contains `,`")),
            ("\"a b\"@example.com", Some("contains `\"`")),
            ("alice@[192.0.2.1]", Some("contains `[`")),
            ("not-an-address", Some("not an address")),
            ("alice@example.com.", Some("not written as the address")),
            ("Alice@example.com", Some("not written as the address")),
            ("a..b@example.com", Some("not a valid local part")),
            ("alice@exa_mple.com", Some("not a domain name")),
        ] {
            let got = Address::parse_plain(input);
            match words {
                None => assert_eq!(got.map(|a| a.to_string()).as_deref(), Ok(input)),
                Some(w) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(w), "{input}: `{e}` should contain `{w}`");
                }
            }
        }
    }
}
