//! `[journal]` at accept: the journal copy is one more envelope recipient,
//! so it is queued in the message's own spool file (one fsync for both) and
//! retried like any recipient; the relay sends it as a journal report.

use godwit_config::JournalConfig;
use godwit_smtp_proto::{Envelope, RcptParams};
use godwit_spool::JournalRcpt;

/// Appends the journal recipient to `env` and says which one it is.
/// NOTIFY=NEVER (RFC 3461 4.1): the journal copy never produces a DSN to
/// the original sender, whatever happens to it.
pub fn add_recipient(env: &mut Envelope, j: &JournalConfig) -> JournalRcpt {
    env.rcpts.push((
        j.address.trim().to_string(),
        RcptParams {
            notify: vec!["NEVER".into()],
            orcpt: None,
        },
    ));
    JournalRcpt {
        rcpt: env.rcpts.len() - 1,
        platform: j.platform.clone(),
    }
}
