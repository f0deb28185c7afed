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
    /// The optional `source_url` column: this account's source server, in
    /// place of `[sync.source] url` (a migration from several old servers).
    pub source_url: Option<String>,
    /// The optional `target_url` column.
    pub target_url: Option<String>,
    /// A shared mailbox from the directory (`kind = shared`) that this file
    /// does not list: it has no password of its own, so both sides log in
    /// with their master user, as the address.
    pub shared: bool,
}

impl Account {
    /// A directory shared mailbox: the address is the login on both sides.
    pub fn shared(address: &str) -> Account {
        let address = address.trim().to_ascii_lowercase();
        let login = Login {
            user: address.clone(),
            password: String::new(),
        };
        Account {
            source: login.clone(),
            target: login,
            address,
            source_url: None,
            target_url: None,
            shared: true,
        }
    }
}

/// Resolves a password reference (`godwit_config::secret`). The error names
/// the variable or file, never the value.
pub fn secret(value: &str, context: &str) -> Result<String, ImapError> {
    godwit_config::secret(value, context).map_err(ImapError::Config)
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

const COLUMNS: [&str; 5] = [
    "address",
    "source_user",
    "source_password",
    "target_user",
    "target_password",
];

pub fn parse(text: &str, path: &str) -> Result<Vec<Account>, ImapError> {
    let mut out = Vec::new();
    // Where source_url and target_url are, when the header names them.
    let mut url_cols: (Option<usize>, Option<usize>) = (None, None);
    let mut width = 5;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = split_csv(line);
        if n == 0 && f[0].trim().eq_ignore_ascii_case("address") {
            let names: Vec<String> = f.iter().map(|c| c.trim().to_ascii_lowercase()).collect();
            if names.len() < 5 || names[..5] != COLUMNS {
                return Err(ImapError::Accounts {
                    path: path.into(),
                    message: format!(
                        "line 1: the header must start with {}, then optionally source_url,target_url",
                        COLUMNS.join(",")
                    ),
                });
            }
            for (i, name) in names.iter().enumerate().skip(5) {
                match name.as_str() {
                    "source_url" => url_cols.0 = Some(i),
                    "target_url" => url_cols.1 = Some(i),
                    other => {
                        return Err(ImapError::Accounts {
                            path: path.into(),
                            message: format!(
                                "line 1: unknown column `{other}` (known: {},source_url,target_url)",
                                COLUMNS.join(",")
                            ),
                        });
                    }
                }
            }
            width = names.len();
            continue;
        }
        let url = |i: Option<usize>, f: &[String]| {
            i.and_then(|i| f.get(i))
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
        };
        let urls = (url(url_cols.0, &f), url(url_cols.1, &f));
        // Trailing empty URL columns may be left out.
        if f.len() > 5 && f.len() <= width {
            f.truncate(5);
        }
        if f.len() != 5 {
            return Err(ImapError::Accounts {
                path: path.into(),
                message: format!(
                    "line {}: expected {width} fields ({}{}), found {}",
                    n + 1,
                    COLUMNS.join(","),
                    if width > 5 { ",..." } else { "" },
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
            source_url: urls.0,
            target_url: urls.1,
            shared: false,
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
    fn per_account_servers() {
        let text = "address,source_user,source_password,target_user,target_password,source_url,target_url\n\
                    a@x,a,p,a,p,imap://old-1:143,\n\
                    b@x,b,p,b,p,,imaps://new-2:993\n\
                    c@x,c,p,c,p\n";
        let a = parse(text, "a.csv").unwrap();
        assert_eq!(a[0].source_url.as_deref(), Some("imap://old-1:143"));
        assert_eq!(a[0].target_url, None);
        assert_eq!(a[1].source_url, None);
        assert_eq!(a[1].target_url.as_deref(), Some("imaps://new-2:993"));
        assert_eq!(
            (a[2].source_url.clone(), a[2].target_url.clone()),
            (None, None)
        );
        let e = parse(
            "address,source_user,source_password,target_user,target_password,server\n",
            "a.csv",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown column `server`"), "{e}");
    }

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
