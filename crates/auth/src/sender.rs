//! Who an authenticated user may send as (`sender_restriction = "directory"`,
//! Postfix's reject_sender_login_mismatch): their own address, or an alias
//! the directory gives their mailbox.

use godwit_route::normalize_address;
use godwit_store::Store;

/// The user, the mailbox the user's address is an alias of, and every alias
/// of that mailbox (from `directory_aliases`). Without a directory: the user.
pub async fn identities(store: &Store, user: &str) -> Vec<String> {
    let user = normalize_address(user);
    let mailbox: Option<(String,)> =
        sqlx::query_as("SELECT mailbox FROM directory_aliases WHERE alias = $1")
            .bind(&user)
            .fetch_optional(&store.pool)
            .await
            .ok()
            .flatten();
    let mailbox = mailbox.map(|m| m.0).unwrap_or_else(|| user.clone());
    let aliases: Vec<(String,)> =
        sqlx::query_as("SELECT alias FROM directory_aliases WHERE mailbox = $1 ORDER BY alias")
            .bind(&mailbox)
            .fetch_all(&store.pool)
            .await
            .unwrap_or_default();
    let mut out = vec![user.clone()];
    if mailbox != user {
        out.push(mailbox);
    }
    out.extend(aliases.into_iter().map(|a| a.0));
    out.dedup();
    out
}

/// Whether `address` is one of `identities` (case-insensitive, RFC 5321 2.4
/// for the domain; the local part as the directory stores it, lower-cased).
pub fn may_send_as(identities: &[String], address: &str) -> bool {
    let a = normalize_address(address);
    identities.contains(&a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn may_send_as_table() {
        let ids = vec![
            "alice@example.com".to_string(),
            "a.smith@example.org".to_string(),
        ];
        let cases = [
            ("alice@example.com", true),
            ("Alice@EXAMPLE.com", true),
            ("a.smith@example.org", true),
            ("bob@example.com", false),
            ("alice@example.com.evil", false),
            ("", false),
        ];
        for (a, want) in cases {
            assert_eq!(may_send_as(&ids, a), want, "{a}");
        }
    }
}
