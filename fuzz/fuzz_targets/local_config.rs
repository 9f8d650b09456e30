//! Arbitrary bytes as the local config file (YAML); the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ztunnel::state::local::fuzz_config(data);
});
