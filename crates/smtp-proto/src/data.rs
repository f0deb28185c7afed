//! DATA content decoding (RFC 5321 4.1.1.4, 4.5.2) hardened against SMTP
//! smuggling: the message ends only at `<CR><LF>.<CR><LF>`. A bare LF, a bare
//! CR or a NUL never ends it; they either make the whole message refused
//! (`Reject`, like Postfix 3.9 `smtpd_forbid_bare_newline = yes`) or are
//! rewritten (`Normalize`: bare CR/LF become CRLF, NUL is dropped), so that
//! nothing stored can look like a terminator to a lenient next hop.
//!
//! Size is enforced while streaming: past the limit, content is counted and
//! discarded until the terminator, so memory never exceeds the limit.

use memchr::memchr3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewlinePolicy {
    Reject,
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOutcome {
    Complete,
    /// Over the size limit (552 5.3.4).
    TooBig,
    /// A bare CR or LF under `Reject`.
    BareNewline,
    /// A NUL byte under `Reject`.
    Nul,
    /// The server stopped keeping the content (`DataDecoder::abandon`): it
    /// is short of memory, so a temporary 452 4.3.1.
    Abandoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// At the start of a line that follows a real CRLF (or the DATA command).
    LineStart,
    /// At the start of a line that follows a bare CR or LF: a dot here is
    /// content, never unstuffed and never a terminator.
    SoftLineStart,
    Mid,
    /// Saw CR in the middle of a line.
    Cr,
    /// Saw "." at a real line start.
    Dot,
    /// Saw ".\r" at a real line start.
    DotCr,
    Done,
}

#[derive(Debug)]
pub struct DataDecoder {
    policy: NewlinePolicy,
    max: u64,
    size: u64,
    st: St,
    too_big: bool,
    bare: bool,
    nul: bool,
    abandoned: bool,
}

impl DataDecoder {
    pub fn new(policy: NewlinePolicy, max_size: u64) -> Self {
        DataDecoder {
            policy,
            max: max_size,
            size: 0,
            st: St::LineStart,
            too_big: false,
            bare: false,
            nul: false,
            abandoned: false,
        }
    }

    /// Stops keeping content: the rest is read to the terminator and
    /// discarded, and the outcome is `Abandoned` (unless already `TooBig`).
    pub fn abandon(&mut self) {
        self.abandoned = true;
    }

    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Bytes of content seen so far, including any discarded past the limit.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn outcome(&self) -> Option<DataOutcome> {
        if self.st != St::Done {
            return None;
        }
        Some(if self.too_big {
            DataOutcome::TooBig
        } else if self.abandoned {
            DataOutcome::Abandoned
        } else if self.bare {
            DataOutcome::BareNewline
        } else if self.nul {
            DataOutcome::Nul
        } else {
            DataOutcome::Complete
        })
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size > self.max {
            self.too_big = true;
        }
        if !self.too_big && !self.rejecting() && !self.abandoned {
            out.extend_from_slice(bytes);
        }
    }

    fn rejecting(&self) -> bool {
        self.policy == NewlinePolicy::Reject && (self.bare || self.nul)
    }

    /// A bare CR or LF: note it, and under `Normalize` write a CRLF instead.
    fn bare_newline(&mut self, out: &mut Vec<u8>) {
        match self.policy {
            NewlinePolicy::Reject => self.bare = true,
            NewlinePolicy::Normalize => self.emit(out, b"\r\n"),
        }
        self.st = St::SoftLineStart;
    }

    /// Feeds wire bytes; appends decoded content to `out`. Returns how many
    /// bytes were consumed: all of them, or fewer when the terminator was
    /// reached (the rest belongs to the next command).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.st {
                St::Done => return i,
                St::Mid | St::LineStart | St::SoftLineStart
                    if !matches!(b, b'.' | b'\r' | b'\n' | 0) =>
                {
                    // Fast path: copy the run of plain content (see `plain_run`).
                    let end = i + plain_run(&input[i..]);
                    self.emit(out, &input[i..end]);
                    self.st = St::Mid;
                    i = end;
                    continue;
                }
                St::LineStart if b == b'.' => self.st = St::Dot,
                St::SoftLineStart if b == b'.' => {
                    self.emit(out, b".");
                    self.st = St::Mid;
                }
                St::Mid if b == b'.' => self.emit(out, b"."),
                St::Mid | St::LineStart | St::SoftLineStart => match b {
                    b'\r' => self.st = St::Cr,
                    b'\n' => self.bare_newline(out),
                    _ => {
                        // NUL (RFC 5321 4.5.2 content must not contain it; some
                        // next hops strip it, turning "\0." into a terminator).
                        if self.policy == NewlinePolicy::Reject {
                            self.nul = true;
                        }
                        self.st = St::Mid;
                    }
                },
                St::Cr => {
                    if b == b'\n' {
                        self.emit(out, b"\r\n");
                        self.st = St::LineStart;
                    } else {
                        self.bare_newline(out);
                        continue; // reprocess b at a soft line start
                    }
                }
                St::Dot => {
                    // RFC 5321 4.5.2: a leading dot followed by more is removed.
                    if b == b'\r' {
                        self.st = St::DotCr;
                    } else {
                        self.st = St::Mid;
                        continue;
                    }
                }
                St::DotCr => {
                    if b == b'\n' {
                        self.st = St::Done;
                        return i + 1;
                    }
                    // ".\r" then something else: the CR is bare.
                    self.bare_newline(out);
                    continue;
                }
            }
            i += 1;
        }
        i
    }
}

/// The length of the run at the start of `input` (whose first byte is
/// content: none of `.`, CR, LF, NUL) that decodes to itself: content up to
/// the next CR, LF or NUL (memchr3), and on across every CRLF whose next
/// line starts with content again (so no dot to unstuff, no terminator, no
/// empty line). It ends before the first CR, LF or NUL that needs the
/// byte-wise states, or one too near the end of `input` to tell; its last
/// byte is content, so the state after it is `Mid`. A message is one
/// `emit` per run, not per line.
fn plain_run(input: &[u8]) -> usize {
    let mut i = 0;
    while let Some(p) = memchr3(b'\r', b'\n', 0, &input[i..]) {
        let p = i + p;
        if input[p] == b'\r'
            && input.get(p + 1) == Some(&b'\n')
            && input
                .get(p + 2)
                .is_some_and(|&c| !matches!(c, b'.' | b'\r' | b'\n' | 0))
        {
            i = p + 2;
        } else {
            return p;
        }
    }
    input.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(policy: NewlinePolicy, wire: &[u8]) -> (Option<DataOutcome>, Vec<u8>, usize) {
        let mut d = DataDecoder::new(policy, 1_000_000);
        let mut out = Vec::new();
        let n = d.feed(wire, &mut out);
        (d.outcome(), out, n)
    }

    #[test]
    fn plain_message_and_unstuffing() {
        let wire = b"Subject: x\r\n\r\n..leading\r\n.\r\nQUIT\r\n";
        let (o, m, n) = decode(NewlinePolicy::Reject, wire);
        assert_eq!(o, Some(DataOutcome::Complete));
        assert_eq!(m, b"Subject: x\r\n\r\n.leading\r\n");
        assert_eq!(&wire[n..], b"QUIT\r\n", "stops right after the terminator");
    }

    #[test]
    fn empty_message() {
        let (o, m, _) = decode(NewlinePolicy::Reject, b".\r\n");
        assert_eq!(o, Some(DataOutcome::Complete));
        assert!(m.is_empty());
    }

    /// Every smuggling ending from the 2023 research: none may end DATA. Each
    /// is followed by a smuggled transaction and then the real terminator.
    const SMUGGLING: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n.\n",
        b"\r.\n",
        b"\n.\r",
        b"\r\n\x00.\r\n",
    ];

    #[test]
    fn smuggling_endings_never_end_data() {
        for ending in SMUGGLING {
            let mut wire = b"Subject: a\r\n\r\nbody".to_vec();
            wire.extend_from_slice(ending);
            wire.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            for policy in [NewlinePolicy::Reject, NewlinePolicy::Normalize] {
                let (o, m, n) = decode(policy, &wire);
                assert_eq!(n, wire.len(), "{ending:?} {policy:?} ended early");
                match policy {
                    NewlinePolicy::Reject => assert!(
                        matches!(o, Some(DataOutcome::BareNewline | DataOutcome::Nul)),
                        "{ending:?}: {o:?}"
                    ),
                    NewlinePolicy::Normalize => {
                        assert_eq!(o, Some(DataOutcome::Complete));
                        // Normalized content holds no bare CR/LF and no NUL.
                        assert!(!m.contains(&0));
                        for (i, &b) in m.iter().enumerate() {
                            if b == b'\n' {
                                assert_eq!(m[i - 1], b'\r', "{ending:?}");
                            }
                            if b == b'\r' {
                                assert_eq!(m.get(i + 1), Some(&b'\n'), "{ending:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn size_limit_streams_and_discards() {
        let mut d = DataDecoder::new(NewlinePolicy::Reject, 10);
        let mut out = Vec::new();
        let mut wire = vec![b'a'; 100];
        wire.extend_from_slice(b"\r\n.\r\n");
        for chunk in wire.chunks(7) {
            d.feed(chunk, &mut out);
        }
        assert_eq!(d.outcome(), Some(DataOutcome::TooBig));
        assert!(out.len() <= 10);
        assert_eq!(d.size(), 102);
    }

    #[test]
    fn plain_runs_stop_where_decoding_needs_states() {
        let cases: [(&[u8], usize); 8] = [
            (b"abc", 3),
            (b"a\r\nb\r\nc", 7),
            (b"a\r\n.b", 1),
            (b"a\r\n\r\n", 1),
            (b"a\r\n\0b", 1),
            (b"ab\0", 2),
            (b"a\nb", 1),
            (b"a\r\n", 1),
        ];
        for (input, want) in cases {
            assert_eq!(plain_run(input), want, "{input:?}");
        }
    }

    proptest::proptest! {
        /// Whole (long runs across lines) decodes as byte at a time (every
        /// byte through the states), under both policies and any size
        /// limit: same outcome, size and consumed length, and the same
        /// content when it is kept.
        #[test]
        fn whole_decodes_as_byte_at_a_time(
            lines in proptest::collection::vec("[.a\x00]{0,5}(\r\n|\r\n|\r\n|\r|\n)", 0..40),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
            max in 0u64..200,
            normalize in proptest::prelude::any::<bool>(),
        ) {
            let policy = if normalize { NewlinePolicy::Normalize } else { NewlinePolicy::Reject };
            let mut wire = lines.concat().into_bytes();
            wire.extend_from_slice(b"\r\n.\r\n");
            wire.extend_from_slice(&tail);
            let mut whole = DataDecoder::new(policy, max);
            let mut w_out = Vec::new();
            let w_n = whole.feed(&wire, &mut w_out);
            let mut bytes = DataDecoder::new(policy, max);
            let mut b_out = Vec::new();
            let mut b_n = 0;
            for b in &wire {
                let n = bytes.feed(std::slice::from_ref(b), &mut b_out);
                b_n += n;
                if n == 0 || bytes.is_done() {
                    break;
                }
            }
            proptest::prop_assert_eq!(w_n, b_n);
            // Refused content (too big, bare newline, NUL) is discarded, and
            // where a cut-off falls in it depends on the runs.
            if whole.outcome() == Some(DataOutcome::Complete) {
                proptest::prop_assert_eq!(w_out, b_out);
            }
            proptest::prop_assert_eq!(whole.size(), bytes.size());
            proptest::prop_assert_eq!(whole.outcome(), bytes.outcome());
        }
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let wire = b"a\r\n..b\r\nc\r\n.\r\n";
        let (_, whole, _) = decode(NewlinePolicy::Reject, wire);
        let mut d = DataDecoder::new(NewlinePolicy::Reject, 1000);
        let mut out = Vec::new();
        for b in wire {
            d.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, whole);
        assert_eq!(d.outcome(), Some(DataOutcome::Complete));
    }
}
