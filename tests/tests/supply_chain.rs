//! The dependency graph, checked on every test run: every crate's license is compatible with
//! Apache-2.0, and there is exactly one TLS crypto provider (ring).

use std::collections::BTreeSet;

/// Licenses whose terms fit an Apache-2.0 project.
const ALLOWED: &[&str] = &[
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "BSL-1.0",
    "Unlicense",
    "CC0-1.0",
    "0BSD",
    // Mozilla's CA list as data (webpki-root-certs, via kube's TLS stack): a permissive
    // data license with no conditions beyond keeping the notice.
    "CDLA-Permissive-2.0",
];

/// Whether an SPDX expression (`A OR B`, `A AND B`, parentheses, `A/B`) is satisfiable with
/// the allowed licenses.
fn acceptable(expr: &str) -> bool {
    let expr = expr
        .replace('/', " OR ")
        .replace('(', " ( ")
        .replace(')', " ) ");
    let tokens: Vec<&str> = expr.split_whitespace().collect();
    let mut pos = 0;
    let ok = or_expr(&tokens, &mut pos);
    ok && pos == tokens.len()
}

fn or_expr(t: &[&str], pos: &mut usize) -> bool {
    let mut ok = and_expr(t, pos);
    while t.get(*pos) == Some(&"OR") {
        *pos += 1;
        ok |= and_expr(t, pos);
    }
    ok
}

fn and_expr(t: &[&str], pos: &mut usize) -> bool {
    let mut ok = atom(t, pos);
    while t.get(*pos) == Some(&"AND") {
        *pos += 1;
        ok &= atom(t, pos);
    }
    ok
}

fn atom(t: &[&str], pos: &mut usize) -> bool {
    match t.get(*pos) {
        Some(&"(") => {
            *pos += 1;
            let ok = or_expr(t, pos);
            *pos += 1; // ")"
            ok
        }
        Some(id) => {
            *pos += 1;
            let mut id = id.to_string();
            if t.get(*pos) == Some(&"WITH") {
                id = format!("{id} WITH {}", t.get(*pos + 1).unwrap_or(&""));
                *pos += 2;
            }
            ALLOWED.contains(&id.as_str())
        }
        None => false,
    }
}

#[test]
fn expressions_are_evaluated_like_spdx() {
    assert!(acceptable("MIT OR Apache-2.0"));
    assert!(acceptable("(MIT OR Apache-2.0) AND Unicode-3.0"));
    assert!(acceptable("MIT/Apache-2.0"));
    assert!(acceptable("MIT OR Apache-2.0 OR LGPL-2.1-or-later"));
    assert!(!acceptable("GPL-3.0"));
    assert!(!acceptable("MIT AND GPL-2.0"));
    assert!(!acceptable(""));
}

#[test]
fn every_dependency_is_compatible_and_ring_is_the_only_crypto_provider() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let mut bad = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().unwrap_or_default().to_string();
        match p["license"].as_str() {
            Some(l) if acceptable(l) => {}
            other => {
                bad.insert(format!("{name}: {other:?}"));
            }
        }
        names.insert(name);
    }
    assert!(
        bad.is_empty(),
        "dependencies with licenses not compatible with Apache-2.0: {bad:#?}"
    );
    for forbidden in [
        "aws-lc-rs",
        "aws-lc-sys",
        "openssl",
        "openssl-sys",
        "native-tls",
        "boring",
    ] {
        assert!(
            !names.contains(forbidden),
            "{forbidden} is in the graph: ring must be the only TLS crypto provider"
        );
    }
    assert!(names.contains("ring"));
}
