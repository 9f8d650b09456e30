//! The README's first command, headless: the same local mesh `local-mesh` builds (real agents
//! installing the CNI plugin, real ztunnels, pods created through the real CNI path), with
//! assertions on its report and on what it leaves behind.

use std::time::Duration;

use mesh_testbed::demo::{LocalMesh, Options, Report, Row};
use mesh_testbed::lab::IpFamily;

fn row<'a>(report: &'a Report, label: &str) -> &'a Row {
    report
        .rows
        .iter()
        .find(|r| r.label == label)
        .unwrap_or_else(|| panic!("no row {label:?} in {report:#?}"))
}

fn id(ns: &str, sa: &str) -> Option<String> {
    Some(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"))
}

#[test]
fn the_local_mesh_report_shows_identities_and_mtls_and_nothing_is_left_behind() {
    let opts = Options {
        nodes: 2,
        load_pods: 2,
        keep: false,
        family: IpFamily::Ipv4,
    };
    let mut steps = Vec::new();
    let lab = LocalMesh::lab(&opts).expect("options");
    let mut lm = LocalMesh::up(lab, &opts, &mut |s| steps.push(s.to_string())).expect("mesh up");
    let lab = lm.mesh.lab.id().to_string();
    let dir = lm.mesh.lab.dir().to_path_buf();
    let report = lm.drive(&mut |_| {});
    assert_eq!(report.failures(), 0, "{report:#?}");

    for (label, client, server) in [
        (
            "pod to pod, across nodes",
            id("shop", "frontend"),
            id("shop", "backend"),
        ),
        (
            "through a service VIP",
            id("shop", "frontend"),
            id("shop", "backend"),
        ),
        (
            "across namespaces",
            id("shop", "frontend"),
            id("data", "db"),
        ),
        ("within one node", id("shop", "backend"), id("data", "db")),
    ] {
        let r = row(&report, label);
        assert!(r.mtls, "{label}: {r:#?}");
        assert_eq!(
            (&r.client_identity, &r.server_identity),
            (&client, &server),
            "{label}"
        );
        assert_eq!((r.bytes_sent, r.bytes_received), (65536, 65536), "{label}");
        assert!(r.latency > Duration::ZERO);
    }
    // Through the stand-in waypoint: mTLS to the waypoint, which carries it on to backend.
    let r = row(&report, "through a waypoint");
    assert!(r.mtls, "{r:#?}");
    assert_eq!(
        (&r.client_identity, &r.server_identity),
        (&id("shop", "frontend"), &id("shop", "waypoint"))
    );
    assert_eq!((r.bytes_sent, r.bytes_received), (65536, 65536));
    // DNS from a mesh pod: its mesh name answered by ztunnel, an outside one forwarded.
    assert_eq!(report.dns.len(), 2, "{report:#?}");
    assert!(report.dns.iter().all(|d| d.ok), "{:#?}", report.dns);
    let rendered = mesh_testbed::demo::render(&report);
    assert!(rendered.contains("through a waypoint"), "{rendered}");
    assert!(rendered.contains("answered by ztunnel"), "{rendered}");
    // A client outside the mesh reaches a mesh pod in plaintext: no client identity.
    let r = row(&report, "from outside the mesh");
    assert!(!r.mtls && r.client_identity.is_none(), "{r:#?}");
    assert_eq!(r.server_identity, id("shop", "backend"));
    // A mesh pod reaching a pod outside the mesh: its identity, plain TCP, no server identity.
    let r = row(&report, "to outside the mesh");
    assert!(!r.mtls && r.server_identity.is_none(), "{r:#?}");
    assert_eq!(r.client_identity, id("shop", "frontend"));
    // L4 policy: db's port 9000 is closed to everyone; db takes identity-less peers nowhere.
    let r = row(&report, "policy: port 9000 denied");
    assert!(r.expect_denied && r.denied && r.mtls, "{r:#?}");
    assert_eq!(r.bytes_received, 0, "{r:#?}");
    let r = row(&report, "policy: no identity");
    assert!(r.denied && !r.mtls && r.client_identity.is_none(), "{r:#?}");
    for label in [
        "across namespaces",
        "within one node",
        "from outside the mesh",
    ] {
        assert!(!row(&report, label).denied, "{label}");
    }

    let load = report.load.as_ref().expect("load summary");
    assert_eq!((load.flows, load.ok, load.mtls), (4, 4, 4), "{load:#?}");
    assert_eq!(report.cni_adds.len(), 8);
    let rendered = mesh_testbed::demo::render(&report);
    assert!(
        rendered.contains("shop/frontend -> shop/backend"),
        "{rendered}"
    );

    // Teardown runs CNI DEL for every pod and checks each netns is bare before removing it.
    lm.down().expect("DEL left something behind");
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{lab}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "namespaces left: {leftovers:?}");
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(steps.iter().any(|s| s.contains("through CNI")), "{steps:?}");
}

/// `--ip-family ipv6` and `dual`: every path works in each family the pods have, each row
/// names its family, and DNS answers AAAA (and A) for the mesh's names.
fn local_mesh_in(family: IpFamily) {
    let opts = Options {
        family,
        ..Options::default()
    };
    let lab = LocalMesh::lab(&opts).expect("options");
    let mut lm = LocalMesh::up(lab, &opts, &mut |_| {}).expect("mesh up");
    let report = lm.drive(&mut |_| {});
    assert_eq!(report.failures(), 0, "{family}: {report:#?}");
    let families: Vec<&str> = match family {
        IpFamily::Ipv4 => vec!["ipv4"],
        IpFamily::Ipv6 => vec!["ipv6"],
        IpFamily::Dual => vec!["ipv4", "ipv6"],
    };
    for f in &families {
        let rows: Vec<&Row> = report.rows.iter().filter(|r| r.family == *f).collect();
        assert_eq!(rows.len(), 9, "{family}: {f} rows: {report:#?}");
        for label in [
            "pod to pod, across nodes",
            "through a waypoint",
            "within one node",
        ] {
            let r = rows.iter().find(|r| r.label == label).expect("row");
            assert!(r.mtls, "{family}/{f}: {label}: {r:#?}");
        }
        let r = rows
            .iter()
            .find(|r| r.label == "policy: no identity")
            .expect("row");
        assert!(r.denied, "{family}/{f}: {r:#?}");
    }
    assert_eq!(report.rows.len(), 9 * families.len(), "{report:#?}");
    let qtypes: Vec<&str> = report.dns.iter().map(|d| d.qtype).collect();
    if family.has_v6() {
        assert!(qtypes.contains(&"AAAA"), "{:#?}", report.dns);
    }
    let rendered = mesh_testbed::demo::render(&report);
    assert!(rendered.contains(" v6 "), "{rendered}");
    lm.down().expect("DEL left something behind");
}

#[test]
fn the_local_mesh_runs_ipv6_only() {
    local_mesh_in(IpFamily::Ipv6);
}

#[test]
fn the_local_mesh_runs_dual_stack_over_both_families() {
    local_mesh_in(IpFamily::Dual);
}

#[test]
fn local_mesh_refuses_bad_options_clearly() {
    let bin = mesh_testbed::binary("local-mesh");
    for (args, want) in [
        (vec!["--nodes", "1"], "out of range"),
        (vec!["--pods"], "needs a number"),
        (vec!["--frobnicate"], "unknown argument"),
        (vec!["--ip-family", "ipv5"], "unknown IP family"),
        (vec!["--ip-family"], "needs ipv4, ipv6 or dual"),
    ] {
        let out = std::process::Command::new(&bin)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Removes the kept mesh even when the test fails.
struct KeptGuard;

impl Drop for KeptGuard {
    fn drop(&mut self) {
        mesh_testbed::lab::purge(mesh_testbed::demo::KEPT_ID);
    }
}

fn kept_leftovers() -> Vec<String> {
    let prefix = format!("{}-", mesh_testbed::demo::KEPT_ID);
    let mut out = Vec::new();
    for dir in ["/run/netns".into(), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            out.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix)),
            );
        }
    }
    out
}

#[test]
fn keep_leaves_the_mesh_running_and_down_removes_it() {
    assert!(
        kept_leftovers().is_empty(),
        "a kept mesh already exists on this machine: run `local-mesh down` first"
    );
    let _guard = KeptGuard;
    let bin = mesh_testbed::binary("local-mesh");
    let out = std::process::Command::new(&bin)
        .arg("--keep")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("local-mesh down"), "{stdout}");

    // After the command has exited, the agent still serves its pods and the frontend still
    // reaches the backend's (now busybox) echo server over the mesh.
    let node = mesh_testbed::lab::Ns {
        name: format!("{}-node-1", mesh_testbed::demo::KEPT_ID),
    };
    let (status, pods) = node
        .http_get("127.0.0.1:8000".parse().unwrap(), "/pods")
        .expect("the kept agent answers");
    assert_eq!(status, 200);
    assert!(pods.contains("frontend"), "{pods}");
    let frontend = mesh_testbed::lab::Ns {
        name: format!("{}-node-1-frontend", mesh_testbed::demo::KEPT_ID),
    };
    let backend_ip = stdout
        .split_whitespace()
        .find(|w| w.starts_with("198.18.102."))
        .expect("the backend's address in the hints")
        .to_string();
    let echoed = frontend
        .open()
        .command("/bin/busybox")
        .args([
            "sh",
            "-c",
            &format!("echo hello | busybox nc -w 2 {backend_ip} 8080"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&echoed.stdout).trim(), "hello");

    let again = std::process::Command::new(&bin)
        .arg("--keep")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let down = std::process::Command::new(&bin)
        .arg("down")
        .output()
        .unwrap();
    assert!(down.status.success());
    assert!(kept_leftovers().is_empty(), "{:?}", kept_leftovers());
}
