//! Arbitrary bytes as a DNS query to the pod's DNS proxy; the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::proxy::dns::fuzz_query(data);
});
