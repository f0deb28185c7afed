//! SASL PLAIN (RFC 4616): `[authzid] NUL authcid NUL passwd`, base64 on the
//! wire (RFC 3501 6.2.2, RFC 5034 4).

use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    pub user: String,
    pub password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainError {
    /// Not base64 (RFC 4648), or not three NUL-separated fields.
    Malformed,
    /// An authorization identity other than the user: the front logs in as
    /// the user only, so acting as someone else is refused (RFC 4616 2).
    Authzid,
}

/// Decodes one client response. `=` (RFC 4959 3) is an empty response.
pub fn decode_plain(b64: &str) -> Result<Plain, PlainError> {
    let b64 = b64.trim();
    let raw = if b64 == "=" {
        Vec::new()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| PlainError::Malformed)?
    };
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PlainError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| PlainError::Malformed);
    let (authz, user, password) = (text(authz)?, text(user)?, text(pass)?);
    if user.is_empty() {
        return Err(PlainError::Malformed);
    }
    if !authz.is_empty() && !authz.eq_ignore_ascii_case(&user) {
        return Err(PlainError::Authzid);
    }
    Ok(Plain { user, password })
}

/// The base64 PLAIN response for `user`/`password` with no authzid.
pub fn encode_plain(user: &str, password: &str) -> String {
    let mut raw = Vec::with_capacity(user.len() + password.len() + 2);
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_table() {
        let b = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let ok = |u: &str, p: &str| {
            Ok(Plain {
                user: u.into(),
                password: p.into(),
            })
        };
        let cases: Vec<(String, Result<Plain, PlainError>)> = vec![
            (
                b(b"\0alice@example.com\0secret"),
                ok("alice@example.com", "secret"),
            ),
            (
                b(b"alice@example.com\0alice@example.com\0pw"),
                ok("alice@example.com", "pw"),
            ),
            (b(b"\0a@b\0"), ok("a@b", "")),
            (b(b"bob@b\0a@b\0pw"), Err(PlainError::Authzid)),
            (b(b"\0\0pw"), Err(PlainError::Malformed)),
            (b(b"a@b\0pw"), Err(PlainError::Malformed)),
            (b(b"\0a@b\0p\0w"), Err(PlainError::Malformed)),
            (b(b"\0a@b\0\xff"), Err(PlainError::Malformed)),
            ("not base64!".into(), Err(PlainError::Malformed)),
            ("=".into(), Err(PlainError::Malformed)),
        ];
        for (input, want) in cases {
            assert_eq!(decode_plain(&input), want, "{input}");
        }
        assert_eq!(decode_plain(&encode_plain("u@x", "p w")), ok("u@x", "p w"));
    }
}
