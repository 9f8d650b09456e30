//! Arbitrary bytes as the body of a plugin request to the node agent; the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    node_agent::cni::fuzz_request_body(data);
});
