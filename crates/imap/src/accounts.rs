//! The accounts file: `address,source_user,source_password,target_user,target_password`,
//! one mailbox per line; an optional header line; `#` comments. Quoted fields
//! (RFC 4180) allow commas in passwords. Each password may be a literal,
//! `env:NAME` or `file:PATH`, so that secrets need not sit in the CSV.

use crate::ImapError;
use crate::conn::Login;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Account {
    pub address: String,
    pub source: Login,
    pub target: Login,
}

/// Resolves a password reference. The error names the variable or file, never the value.
pub fn secret(value: &str, context: &str) -> Result<String, ImapError> {
    if let Some(var) = value.strip_prefix("env:") {
        std::env::var(var).map_err(|_| {
            ImapError::Config(format!("{context}: environment variable {var} is not set"))
        })
    } else if let Some(path) = value.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| {
                ImapError::Config(format!("{context}: cannot read password file {path}: {e}"))
            })
    } else {
        Ok(value.to_string())
    }
}

fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

pub fn parse(text: &str, path: &str) -> Result<Vec<Account>, ImapError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f = split_csv(line);
        if n == 0 && f[0].trim().eq_ignore_ascii_case("address") {
            continue;
        }
        if f.len() != 5 {
            return Err(ImapError::Accounts {
                path: path.into(),
                message: format!(
                    "line {}: expected 5 fields (address,source_user,source_password,target_user,target_password), found {}",
                    n + 1,
                    f.len()
                ),
            });
        }
        let address = f[0].trim().to_ascii_lowercase();
        if !address.contains('@') {
            return Err(ImapError::Accounts {
                path: path.into(),
                message: format!("line {}: `{address}` is not an address", n + 1),
            });
        }
        let ctx = |side: &str| format!("{path} line {} ({side} password of {address})", n + 1);
        out.push(Account {
            source: Login {
                user: f[1].trim().to_string(),
                password: secret(&f[2], &ctx("source"))?,
            },
            target: Login {
                user: f[3].trim().to_string(),
                password: secret(&f[4], &ctx("target"))?,
            },
            address,
        });
    }
    Ok(out)
}

pub fn load(path: &Path) -> Result<Vec<Account>, ImapError> {
    let text = std::fs::read_to_string(path).map_err(|e| ImapError::Accounts {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotes_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "from-file\n").unwrap();
        // SAFETY: single-threaded test setup of a variable no other test reads.
        unsafe { std::env::set_var("GODWIT_TEST_ACCOUNTS_PW", "from-env") };
        let text = format!(
            "address,source_user,source_password,target_user,target_password\n# comment\n\
             Alice@Example.com,alice,\"a,\"\"b\",alice@new,env:GODWIT_TEST_ACCOUNTS_PW\n\
             bob@example.com,bob,file:{},bob@new,x\n",
            pw.display()
        );
        let a = parse(&text, "a.csv").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].address, "alice@example.com");
        assert_eq!(a[0].source.password, "a,\"b");
        assert_eq!(a[0].target.password, "from-env");
        assert_eq!(a[1].source.password, "from-file");
        assert!(
            !format!("{:?}", a[0]).contains("from-env"),
            "Debug must not print passwords"
        );
        let err = parse("x@y,only,three\n", "a.csv").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = parse("x@y,u,env:GODWIT_NOPE_NOT_SET,u,p\n", "a.csv")
            .unwrap_err()
            .to_string();
        assert!(err.contains("GODWIT_NOPE_NOT_SET"), "{err}");
    }
}
