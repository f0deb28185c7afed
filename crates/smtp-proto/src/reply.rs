//! SMTP replies with enhanced status codes (RFC 5321 4.2, RFC 3463).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 class.subject.detail; omitted on the greeting and EHLO replies.
    pub enhanced: Option<(u8, u16, u16)>,
    /// One entry per line of a multi-line reply.
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            text: text.into(),
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn enhanced_string(&self) -> Option<String> {
        self.enhanced.map(|(a, b, c)| format!("{a}.{b}.{c}"))
    }

    /// Wire form: `code-text` continuation lines and a final `code text` line,
    /// each CRLF-terminated (RFC 5321 4.2.1). The enhanced code prefixes every line.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 16);
        let lines: Vec<&str> = self
            .text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        // Formatted once, not per line (format! was most of a reply's cost).
        let code = self.code.to_string();
        let enhanced = self.enhanced_string();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(code.as_bytes());
            out.push(sep as u8);
            if let Some(e) = &enhanced {
                out.extend_from_slice(e.as_bytes());
                out.push(b' ');
            }
            // Never let a reply text inject CR/LF or non-printables onto the wire.
            out.extend(
                line.bytes()
                    .map(|b| if b < 0x20 || b == 0x7f { b'?' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced_string() {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text.replace('\n', " / ")),
            None => write!(f, "{} {}", self.code, self.text.replace('\n', " / ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_wire_form() {
        let r = Reply::plain(250, "mx.example\nPIPELINING\nSIZE 100");
        assert_eq!(
            r.to_wire(),
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
        let r = Reply::new(554, (5, 7, 1), "Relay access denied");
        assert_eq!(r.to_wire(), b"554 5.7.1 Relay access denied\r\n");
        assert_eq!(r.to_string(), "554 5.7.1 Relay access denied");
    }

    #[test]
    fn text_cannot_inject_lines() {
        let r = Reply::new(550, (5, 1, 1), "bad\rRCPT");
        assert_eq!(r.to_wire(), b"550 5.1.1 bad?RCPT\r\n");
    }
}
