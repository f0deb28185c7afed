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
    /// Appends the DATA form of the next chunk to `out`. Runs already in
    /// wire form (see `wire_run`) are copied whole, not byte by byte: this
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
                    let n = wire_run(rest);
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

/// The length of the run at the start of `rest` (which starts inside a
/// line: its first byte is neither CR nor LF) that goes on the wire
/// unchanged: line content up to the next CR or LF (found with memchr), and
/// on across every CRLF whose next line starts with content, neither a
/// period (RFC 5321 4.5.2 doubles it) nor CR or LF. It ends before the first
/// CR or LF that needs the byte-wise path, or one too near the chunk's end
/// to tell; its last byte is line content, so `line_start` is false after it.
/// A spooled message is CRLF-normalized, so most messages are one run.
fn wire_run(rest: &[u8]) -> usize {
    let mut i = 0;
    while let Some(p) = memchr::memchr2(b'\r', b'\n', &rest[i..]) {
        let p = i + p;
        let next_line = rest.get(p + 2).copied();
        if rest[p] == b'\r'
            && rest.get(p + 1) == Some(&b'\n')
            && next_line.is_some_and(|c| !matches!(c, b'.' | b'\r' | b'\n'))
        {
            i = p + 2;
        } else {
            return p;
        }
    }
    rest.len()
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

    #[test]
    fn wire_runs_stop_where_the_wire_form_differs() {
        let cases: [(&[u8], usize); 8] = [
            (b"abc", 3),
            (b"a\r\nb\r\nc", 7),
            (b"a\r\n.b", 1),
            (b"a\r\n\r\nb", 1),
            (b"a\nb", 1),
            (b"a\rb", 1),
            (b"a\r\n", 1),
            (b"a\r\nb\n", 4),
        ];
        for (input, want) in cases {
            assert_eq!(
                wire_run(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
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

        /// Mostly wire-form text (CRLF lines, now and then a leading
        /// period, an empty line or a bare CR or LF), where runs span many
        /// lines: still the line-by-line DATA form, whole and chunked.
        #[test]
        fn crlf_text_is_the_data_form_by_lines(lines in proptest::collection::vec("[.a-c]{0,6}(\r\n|\r\n|\r\n|\r|\n)", 0..60), cut in 1usize..40) {
            let msg = lines.concat().into_bytes();
            prop_assert_eq!(stuffed(&msg), by_lines(&msg));
            let mut s = DotStuffer::default();
            let mut out = Vec::new();
            for c in msg.chunks(cut) {
                s.push(c, &mut out);
            }
            s.finish(&mut out);
            prop_assert_eq!(out, by_lines(&msg));
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
