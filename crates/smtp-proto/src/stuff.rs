//! Outbound DATA encoding: CRLF line endings and dot-stuffing (RFC 5321 4.5.2),
//! followed by the terminator. Defensive even though the spool only holds
//! normalized messages: any bare CR or LF becomes CRLF here, so no stored byte
//! sequence can end DATA early at the next hop (SMTP smuggling).

/// Appends the DATA form of `message` (including the final `.CRLF`) to `out`.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 8);
    let mut line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        if line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' if message.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
                continue;
            }
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_start = true;
            }
            _ => {
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataDecoder, DataOutcome, NewlinePolicy};
    use proptest::prelude::*;

    fn stuffed(m: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        dot_stuff(m, &mut v);
        v
    }

    #[test]
    fn stuffs_leading_dots_and_terminates() {
        assert_eq!(stuffed(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuffed(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(stuffed(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"x\n.\n"), b"x\r\n..\r\n.\r\n");
        assert_eq!(stuffed(b"x\r.\r"), b"x\r\n..\r\n.\r\n");
    }

    proptest! {
        /// Whatever bytes are stored, the next hop sees exactly one terminator,
        /// at the end, and decodes back the CRLF-normalized content.
        #[test]
        fn stuffed_output_has_one_terminator(msg in proptest::collection::vec(any::<u8>(), 0..300)) {
            let wire = stuffed(&msg);
            let mut dec = DataDecoder::new(NewlinePolicy::Reject, u64::MAX);
            let mut out = Vec::new();
            let consumed = dec.feed(&wire, &mut out);
            prop_assert_eq!(consumed, wire.len());
            let outcome = dec.outcome();
            prop_assert!(matches!(outcome, Some(DataOutcome::Complete) | Some(DataOutcome::Nul)), "{:?}", outcome);
        }
    }
}
