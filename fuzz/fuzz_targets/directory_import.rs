#![no_main]
//! Directory exports (CSV and LDIF) are administrator input, often produced
//! by other tools: neither reader may panic, and whatever they accept must
//! hold only checked, normalized addresses.
use godwit_route::Address;
use godwit_route::directory::Rules;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let platforms = vec!["old".to_string(), "new".to_string()];
    let accepted = |d: &str| d == "example.com";
    let rules = Rules { accepted_domain: &accepted, platforms: &platforms };
    for rows in [
        godwit_route::directory::parse(text, &rules),
        godwit_route::ldif::parse(text, &rules, Some("old")),
    ]
    .into_iter()
    .flatten()
    {
        for r in rows {
            assert!(Address::parse_plain(&r.address).is_ok(), "{r:?}");
            assert_eq!(r.address, r.address.to_lowercase());
            assert!(r.aliases.iter().all(|a| Address::parse_plain(a).is_ok()));
        }
    }
});
