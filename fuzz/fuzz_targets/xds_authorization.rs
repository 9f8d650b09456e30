//! Arbitrary bytes as an `istio.security.Authorization` resource: decode, convert, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::xds::convert::fuzz_authorization(data);
});
