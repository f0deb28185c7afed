#![no_main]
//! Modified UTF-7 (RFC 3501 5.1.3): decoding untrusted names must never panic, and
//! whatever decodes must re-encode to something that decodes to the same name.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(name) = godwit_imap::utf7::decode(s) {
            let again = godwit_imap::utf7::decode(&godwit_imap::utf7::encode(&name));
            assert_eq!(again.as_deref(), Ok(name.as_str()));
        }
        let wire = godwit_imap::utf7::encode(s);
        assert_eq!(godwit_imap::utf7::decode(&wire).as_deref(), Ok(s));
    }
});
