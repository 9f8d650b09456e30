//! Arbitrary bytes as ZDS datagrams with descriptors, fed to both session halves; the entry point says which invariants it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_zds::fuzz::datagrams(data);
});
