//! Outbound DATA encoding: CRLF line endings and dot-stuffing (RFC 5321 4.5.2),
//! followed by the terminator. Defensive even though the spool only holds
//! normalized messages: any bare CR or LF becomes CRLF here, so no stored byte
//! sequence can end DATA early at the next hop (SMTP smuggling).

/// Appends the DATA form of `message` (including the final `.CRLF`) to `out`.
pub fn dot_stuff(message: &[u8], out: &mut Vec<u8>) {
    out.reserve(message.len() + message.len() / 64 + 8);
    let mut s = DotStuffer::default();
    s.push(message, out);
    s.finish(out);
}

/// `dot_stuff` for a message given in chunks (streamed from the spool), so a
/// 50 MB message is never held whole: the state that crosses a chunk boundary
/// is whether a line has just started, and a CR waiting for its LF.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    line_start: bool,
    pending_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            line_start: true,
            pending_cr: false,
        }
    }
}

impl DotStuffer {
    /// Appends the DATA form of the next chunk to `out`. Line content runs
    /// (up to the next CR or LF) are copied whole, not byte by byte: this
    /// is every relayed byte's path.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + 2);
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if self.pending_cr {
                self.pending_cr = false;
                // CR LF, or a bare CR: either way one CRLF on the wire.
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if b == b'\n' {
                    rest = tail;
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.pending_cr = true;
                    rest = tail;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    rest = tail;
                }
                _ => {
                    if self.line_start && b == b'.' {
                        // RFC 5321 4.5.2: a line starting with a period gets another.
                        out.push(b'.');
                    }
                    let n = rest
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    self.line_start = false;
                    rest = &rest[n..];
                }
            }
        }
    }

    /// Ends the message: a final CRLF if the last line lacks one, then the
    /// terminator.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.pending_cr {
            out.extend_from_slice(b"\r\n");
            self.line_start = true;
        }
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
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

    /// The DATA form by lines, written another way: every CRLF, bare CR
    /// or bare LF ends a line; each line goes out with CRLF, a leading
    /// period doubled; then the terminator.
    fn by_lines(m: &[u8]) -> Vec<u8> {
        let (mut lines, mut cur, mut i) = (Vec::new(), Vec::new(), 0);
        while i < m.len() {
            match m[i] {
                b'\r' => {
                    lines.push(std::mem::take(&mut cur));
                    if m.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                }
                b'\n' => lines.push(std::mem::take(&mut cur)),
                b => cur.push(b),
            }
            i += 1;
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        let mut out = Vec::new();
        for l in lines {
            if l.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(&l);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    proptest! {
        /// Stuffing in runs is the line-by-line DATA form, byte for byte.
        #[test]
        fn stuffed_is_the_data_form_by_lines(msg in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..300)) {
            prop_assert_eq!(stuffed(&msg), by_lines(&msg));
        }

        /// Chunked stuffing is byte for byte the same as stuffing whole,
        /// wherever the chunks are cut (a CRLF split across two, say).
        #[test]
        fn chunked_equals_whole(msg in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..300), cut in 1usize..40) {
            let whole = stuffed(&msg);
            let mut s = DotStuffer::default();
            let mut out = Vec::new();
            for c in msg.chunks(cut) {
                s.push(c, &mut out);
            }
            s.finish(&mut out);
            prop_assert_eq!(out, whole);
        }

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
