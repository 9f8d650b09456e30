//! Arbitrary bytes as one CNI plugin run: environment, stdin and the agent's answer; the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cni_plugin::fuzz_invocation(data);
});
