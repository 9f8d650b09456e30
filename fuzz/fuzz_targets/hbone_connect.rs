//! Arbitrary bytes as HTTP/2 frames from a verified HBONE peer, up to CONNECT validation; the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::proxy::inbound::fuzz_connect(data);
});
