//! Arbitrary bytes as an `istio.workload.Address` resource: decode, convert, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::xds::convert::fuzz_address(data);
});
