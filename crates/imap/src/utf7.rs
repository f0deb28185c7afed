//! Modified UTF-7 mailbox names (RFC 3501 5.1.3).
//!
//! Printable US-ASCII except `&` stands for itself; `&` is written `&-`; every
//! other run of characters is UTF-16BE, base64 with `,` in place of `/` and no
//! padding, between `&` and `-`. Decoding never panics: a name a server sends
//! is untrusted input, and a bad one must become an error that names it.

use base64::Engine as _;
use base64::alphabet::IMAP_MUTF7;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// No padding in either direction, and the bits left over after the last
/// UTF-16 unit must be zero (RFC 2152, which RFC 3501 5.1.3 builds on).
const B64: GeneralPurpose = GeneralPurpose::new(
    &IMAP_MUTF7,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Utf7Error {
    #[error("mailbox name {name:?}: shift sequence at byte {at} is not closed with '-'")]
    Unterminated { name: String, at: usize },
    #[error("mailbox name {name:?}: invalid base64 in the shift sequence at byte {at}")]
    Base64 { name: String, at: usize },
    #[error("mailbox name {name:?}: the shift sequence at byte {at} is not whole UTF-16")]
    Utf16 { name: String, at: usize },
    #[error(
        "mailbox name {name:?}: byte {at} must be encoded (only printable US-ASCII stands for itself)"
    )]
    Unencoded { name: String, at: usize },
}

/// Encodes a Unicode mailbox name for the wire.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        B64.encode_string(&bytes, out);
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// Decodes a wire mailbox name into Unicode.
pub fn decode(wire: &str) -> Result<String, Utf7Error> {
    let bytes = wire.as_bytes();
    let mut out = String::with_capacity(wire.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'&' {
            let start = i;
            let Some(len) = bytes[i + 1..].iter().position(|&c| c == b'-') else {
                return Err(Utf7Error::Unterminated {
                    name: wire.into(),
                    at: start,
                });
            };
            let run = &bytes[i + 1..i + 1 + len];
            i += len + 2;
            if run.is_empty() {
                out.push('&');
                continue;
            }
            let raw = B64.decode(run).map_err(|_| Utf7Error::Base64 {
                name: wire.into(),
                at: start,
            })?;
            if raw.len() % 2 != 0 {
                return Err(Utf7Error::Utf16 {
                    name: wire.into(),
                    at: start,
                });
            }
            let units = raw
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]));
            for c in char::decode_utf16(units) {
                out.push(c.map_err(|_| Utf7Error::Utf16 {
                    name: wire.into(),
                    at: start,
                })?);
            }
        } else if (0x20..=0x7e).contains(&b) {
            out.push(b as char);
            i += 1;
        } else {
            return Err(Utf7Error::Unencoded {
                name: wire.into(),
                at: i,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_names() {
        // Examples from RFC 3501 5.1.3 and names seen on real servers.
        let table = [
            ("~peter/mail/日本語/台北", "~peter/mail/&ZeVnLIqe-/&U,BTFw-"),
            ("Entwürfe", "Entw&APw-rfe"),
            ("Tom & Jerry", "Tom &- Jerry"),
            ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
            ("", ""),
            ("😀", "&2D3eAA-"),
        ];
        for (unicode, wire) in table {
            assert_eq!(encode(unicode), wire, "encode {unicode:?}");
            assert_eq!(decode(wire).unwrap(), unicode, "decode {wire:?}");
        }
    }

    #[test]
    fn malformed_names_are_errors() {
        for bad in [
            "&", "&ZeVn", "&ZeV-", "&ZQ-", "&2D0-", "a\u{7f}b", "é", "&ZeVnL!-", "&AGE=-",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} should not decode");
        }
    }

    proptest! {
        #[test]
        fn round_trip(s in any::<String>()) {
            let wire = encode(&s);
            prop_assert!(wire.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            prop_assert_eq!(decode(&wire).unwrap(), s);
        }

        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = decode(&s);
        }

        #[test]
        fn never_panics_on_shift_noise(s in "[&A-Za-z0-9+,\\-]{0,40}") {
            if let Ok(d) = decode(&s) {
                // Whatever decodes must survive a second trip unchanged.
                prop_assert_eq!(decode(&encode(&d)).unwrap(), d);
            }
        }
    }
}
