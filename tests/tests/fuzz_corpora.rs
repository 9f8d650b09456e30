//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through the entry point its
//! target calls, so each input that ever reached new code, and each one that once broke a
//! parser, is tried again on every `./x test`. A target without a corpus fails here, and so
//! does a target under `fuzz/fuzz_targets/` that this file does not replay.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// A target's entry point.
type Entry = fn(&[u8]);

/// Every target, with the entry point it calls.
const TARGETS: &[(&str, Entry)] = &[
    ("agent_request_body", node_agent::cni::fuzz_request_body),
    ("cni_invocation", cni_plugin::fuzz_invocation),
    ("dns_query", ztunnel::proxy::dns::fuzz_query),
    ("hbone_connect", ztunnel::proxy::inbound::fuzz_connect),
    ("local_config", ztunnel::state::local::fuzz_config),
    ("xds_address", ztunnel::xds::convert::fuzz_address),
    (
        "xds_authorization",
        ztunnel::xds::convert::fuzz_authorization,
    ),
    ("zds_datagrams", mesh_zds::fuzz::datagrams),
];

fn replay(target: &str) {
    let (_, entry) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let dir = fuzz_dir().join("corpus").join(target);
    let inputs = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect::<Vec<_>>();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).unwrap();
        let caught = std::panic::catch_unwind(|| entry(&data));
        assert!(caught.is_ok(), "{} broke {target}", input.display());
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let mut found: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    found.sort();
    let known: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(found, known);
}

macro_rules! replays {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            replay(stringify!($name));
        }
    )*};
}

replays!(
    agent_request_body,
    cni_invocation,
    dns_query,
    hbone_connect,
    local_config,
    xds_address,
    xds_authorization,
    zds_datagrams,
);
