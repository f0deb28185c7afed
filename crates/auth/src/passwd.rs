//! Dovecot passwd-file users (`user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`),
//! the format Dovecot's `passdb { driver = passwd-file }` reads. Only the
//! first two fields matter here. Schemes: {ARGON2ID} (and {ARGON2I}),
//! {BLF-CRYPT}, {SHA512-CRYPT}, {SHA256-CRYPT}; {PLAIN} and {CRYPT} (DES)
//! are refused when the file is read, so a weak line is an error at start,
//! not a silent hole.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Argon2,
    BlfCrypt,
    Sha512Crypt,
    Sha256Crypt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub scheme: Scheme,
    /// The hash in its own crypt/PHC form, without the `{SCHEME}` prefix.
    pub hash: String,
}

#[derive(Debug, Clone, Default)]
pub struct Users(HashMap<String, Entry>);

/// Parses the file's text; the error names the line (never its hash).
pub fn parse(text: &str) -> Result<Users, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, ':');
        let user = fields.next().unwrap_or("").trim();
        let pass = fields.next().unwrap_or("");
        if user.is_empty() {
            return Err(format!("line {n}: no user name"));
        }
        let Some(rest) = pass.strip_prefix('{') else {
            return Err(format!(
                "line {n} ({user}): the password needs a {{SCHEME}} prefix such as {{ARGON2ID}}"
            ));
        };
        let Some((scheme, hash)) = rest.split_once('}') else {
            return Err(format!("line {n} ({user}): unterminated {{SCHEME}}"));
        };
        let scheme = match scheme.to_ascii_uppercase().as_str() {
            "ARGON2ID" | "ARGON2I" => Scheme::Argon2,
            "BLF-CRYPT" => Scheme::BlfCrypt,
            "SHA512-CRYPT" => Scheme::Sha512Crypt,
            "SHA256-CRYPT" => Scheme::Sha256Crypt,
            other => {
                return Err(format!(
                    "line {n} ({user}): scheme {{{other}}} is not accepted; use {{ARGON2ID}}, {{BLF-CRYPT}} or {{SHA512-CRYPT}}"
                ));
            }
        };
        let key = godwit_route::normalize_address(user);
        if users
            .insert(
                key,
                Entry {
                    scheme,
                    hash: hash.to_string(),
                },
            )
            .is_some()
        {
            return Err(format!("line {n}: {user} is listed twice"));
        }
    }
    Ok(Users(users))
}

pub fn load(path: &Path) -> Result<Users, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("submission.users_file {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("submission.users_file {}: {e}", path.display()))
}

impl Users {
    pub fn get(&self, user: &str) -> Option<&Entry> {
        self.0.get(&godwit_route::normalize_address(user))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `password` matches. CPU-heavy by design: run it off the runtime.
pub fn verify(entry: &Entry, password: &str) -> bool {
    let pw = password.as_bytes();
    match entry.scheme {
        Scheme::Argon2 => {
            use argon2::PasswordVerifier;
            argon2::Argon2::default()
                .verify_password(pw, entry.hash.as_str())
                .is_ok()
        }
        Scheme::BlfCrypt => bcrypt::verify(pw, &entry.hash).unwrap_or(false),
        Scheme::Sha512Crypt | Scheme::Sha256Crypt => {
            use sha_crypt::PasswordVerifier;
            sha_crypt::ShaCrypt::default()
                .verify_password(pw, entry.hash.as_str())
                .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with `doveadm pw -s SCHEME -p secret` (Dovecot 2.3): real
    // Dovecot lines, not our own output.
    const FILE: &str = include_str!("../tests/users.passwd");

    #[test]
    fn dovecot_lines_verify() {
        let users = parse(FILE).unwrap();
        for user in ["argon@example.com", "sha512@example.com", "blf@example.com"] {
            let e = users.get(user).unwrap_or_else(|| panic!("{user}"));
            assert!(verify(e, "secret"), "{user} {e:?}");
            assert!(!verify(e, "Secret"), "{user}");
            assert!(!verify(e, ""), "{user}");
        }
        assert!(users.get("ARGON@Example.com").is_some());
        assert!(users.get("nobody@example.com").is_none());
    }

    #[test]
    fn bad_lines_name_the_line_not_the_hash() {
        let cases = [
            ("a@x:{PLAIN}secret::::::", "line 1 (a@x): scheme {PLAIN}"),
            ("# c\n\na@x:secret", "line 3 (a@x): the password needs"),
            (":{ARGON2ID}x", "line 1: no user name"),
            ("a@x:{ARGON2ID", "unterminated"),
            (
                "a@x:{SHA512-CRYPT}$6$a$b\na@x:{SHA512-CRYPT}$6$a$b",
                "line 2: a@x is listed twice",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("secret") && !err.contains("$6$"), "{err}");
        }
        // A hash that is not one: never a match, never a panic.
        let e = Entry {
            scheme: Scheme::Argon2,
            hash: "garbage".into(),
        };
        assert!(!verify(&e, "garbage"));
        let e = Entry {
            scheme: Scheme::Sha512Crypt,
            hash: "$6$".into(),
        };
        assert!(!verify(&e, ""));
        let e = Entry {
            scheme: Scheme::BlfCrypt,
            hash: "$2y$".into(),
        };
        assert!(!verify(&e, ""));
    }
}
