//! Arbitrary bytes as an `istio.workload.Address` resource (xDS from istiod); the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::xds::convert::fuzz_address(data);
});
