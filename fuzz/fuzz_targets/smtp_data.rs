//! The DATA decoder alone: never a panic; chunking never changes the result.
#![no_main]
use godwit_smtp_proto::{DataDecoder, NewlinePolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut whole = DataDecoder::new(NewlinePolicy::Normalize, 1 << 20);
    let mut a = Vec::new();
    let n = whole.feed(data, &mut a);
    let mut split = DataDecoder::new(NewlinePolicy::Normalize, 1 << 20);
    let mut b = Vec::new();
    let mut m = 0;
    for chunk in data[..n].chunks(3) {
        m += split.feed(chunk, &mut b);
    }
    assert_eq!(n, m);
    assert_eq!(a, b);
    assert_eq!(whole.outcome(), split.outcome());
});
