//! Arbitrary bytes through a whole SMTP session: never a panic, and every
//! message handed out is CRLF-clean with no bare CR or LF.
#![no_main]
use godwit_smtp_proto::{AuthRules, Limits, NewlinePolicy, Output, RcptPolicy, Reply, Session};
use libfuzzer_sys::fuzz_target;

struct Any;
impl RcptPolicy for Any {
    fn check_rcpt(&self, a: &str) -> Result<(), Reply> {
        if a.ends_with("@example.com") { Ok(()) } else { Err(Reply::new(554, (5, 7, 1), "no")) }
    }
}

fuzz_target!(|data: &[u8]| {
    for policy in [NewlinePolicy::Reject, NewlinePolicy::Normalize] {
        let limits = Limits {
            hostname: "gw".into(),
            max_message_size: 4096,
            max_recipients: 100,
            max_command_line: 512,
            max_errors: 50,
            newline_policy: policy,
            max_received_headers: 50,
            tls_available: true,
            // AUTH with every rule on: both mechanisms, continuations, cancels.
            auth: Some(AuthRules { allow_plaintext: data.first().is_some_and(|b| b & 1 == 0), required: true }),
        };
        let mut s = Session::new(limits, "127.0.0.1");
        for chunk in data.chunks(7) {
            s.push(chunk);
            while let Some(o) = s.next(&Any) {
                match o {
                    Output::Message { message, .. } => {
                        for (i, &b) in message.iter().enumerate() {
                            if b == b'\n' { assert_eq!(message[i - 1], b'\r'); }
                            if b == b'\r' { assert_eq!(message.get(i + 1), Some(&b'\n')); }
                        }
                        s.queued("Q");
                    }
                    Output::StartTls => s.tls_started(),
                    Output::Authenticate(c) => {
                        if c.password.len() % 2 == 0 { s.auth_succeeded(&c.user) } else { s.auth_failed(None) }
                    }
                    _ => {}
                }
            }
        }
    }
});
