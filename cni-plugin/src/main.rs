//! The `ambient-cni` binary: run by the container runtime, one command per process.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};

fn main() {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    // Read one byte past the limit so an oversized config is reported, not truncated.
    let read = std::io::stdin()
        .take(cni_plugin::MAX_STDIN as u64 + 1)
        .read_to_end(&mut stdin);
    let out = match read {
        Ok(_) => cni_plugin::run(&env, &stdin, &cni_plugin::agent::UnixAgent),
        Err(e) => cni_plugin::Output {
            stdout: cni_plugin::spec::CniError::new(
                cni_plugin::spec::code::IO_FAILURE,
                "cannot read stdin",
                e.to_string(),
            )
            .to_json(cni_plugin::spec::LATEST)
            .to_string(),
            exit: 1,
            log: Vec::new(),
        },
    };
    for line in &out.log {
        eprintln!("{line}");
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.exit);
}
