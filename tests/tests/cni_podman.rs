//! The CNI plugin under a real CNI runtime: podman (CNI backend) with Debian's reference
//! `bridge` + `host-local`, our plugin chained after them by the node agent's installer, on
//! two simulated nodes running the real agent and ztunnel.

use std::time::Duration;

use mesh_testbed::lab::IpFamily;
use mesh_testbed::mesh::{Mesh, Workload, eventually};
use mesh_testbed::podman::{NodeNet, Podman};

const T: Duration = Duration::from_secs(20);

// Fields drop in order: the containers go while the lab (their config, network and netns)
// still exists.
struct Scene {
    podman: Podman,
    nets: Vec<NodeNet>,
    m: Mesh,
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two nodes, each with its agent (installing the plugin into the node's podman network) and
/// ztunnel. Pods are named in the pod files; containers get fixed addresses.
fn scene() -> Scene {
    scene_of(IpFamily::Ipv4)
}

/// The same with container networks (and nodes) of `family`.
fn scene_of(family: IpFamily) -> Scene {
    let mut m = Mesh::with_family(&["a", "b"], family);
    let plugin_dirs: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| m.lab.dir().join("podman").join(format!("bin-{n}")))
        .collect();
    let (podman, nets) = Podman::new(&m.lab, &plugin_dirs);
    // ztunnel's registry: client on a (.10), web on b (.10), plain on b (.11, not in the mesh).
    let ips = |net: &NodeNet| {
        let ips: Vec<String> = net.ips(10).iter().map(|ip| ip.to_string()).collect();
        format!("{ips:?}")
    };
    let config = format!(
        "workloads:\n\
         - {{uid: shop/client, name: client, namespace: shop, serviceAccount: client, workloadIps: {}, protocol: HBONE}}\n\
         - {{uid: shop/web, name: web, namespace: shop, serviceAccount: web, workloadIps: {}, protocol: HBONE}}\n",
        ips(&nets[0]),
        ips(&nets[1])
    );
    std::fs::write(&m.config, config).unwrap();
    let names = |n: &str| podman.name(n);
    for (net, pods) in [
        (&nets[0], vec!["client", "client2"]),
        (&nets[1], vec!["web"]),
    ] {
        let mut yaml = String::from(
            "namespaces:\n- {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n- {name: plain}\npods:\n",
        );
        for p in pods {
            yaml += &format!(
                "- {{name: {}, namespace: shop, uid: shop/{p}, serviceAccount: {p}}}\n",
                names(p)
            );
        }
        yaml += &format!(
            "- {{name: {}, namespace: plain, uid: plain/plain}}\n",
            names("plain")
        );
        std::fs::write(m.pod_file(&net.node), yaml).unwrap();
        let plugin = mesh_testbed::binary("ambient-cni");
        let conf = net.conf_dir.display().to_string();
        let bin = net.bin_dir.display().to_string();
        let plugin = plugin.display().to_string();
        m.start_agent(
            &net.node,
            &[
                "--install-cni",
                "--cni-conf-dir",
                &conf,
                "--cni-bin-dir",
                &bin,
                "--cni-plugin",
                &plugin,
            ],
        );
        m.start_ztunnel(&net.node, &[]);
    }
    for node in ["a", "b"] {
        assert!(
            eventually(T, || m.agent_get(node, "/readyz").0 == 200),
            "agent on {node}: {:?}",
            m.agent_get(node, "/readyz")
        );
    }
    let _ = Workload::mesh; // the registry above is written by hand: container IPs are fixed
    Scene { m, podman, nets }
}

/// Starts the `web` echo container on node b (.10) and waits until the agent has it enrolled.
fn start_web(s: &mut Scene) {
    let web = s.podman.run(
        &s.nets[1],
        "web",
        10,
        true,
        &["nc", "-ll", "-p", "8080", "-e", "cat"],
    );
    assert!(web.status.success(), "{}", text(&web));
    // It came up enrolled: the agent says so and ztunnel serves it.
    assert!(eventually(T, || s
        .m
        .agent_get("b", "/pods")
        .1
        .contains("\"state\": \"enrolled\"")));
}

#[test]
fn containers_are_enrolled_at_creation_and_talk_over_hbone() {
    let mut s = scene();
    // The installer chained our plugin after bridge in each node's config.
    let conf = std::fs::read_to_string(s.nets[0].conf_dir.join("10-mesh.conflist")).unwrap();
    assert!(conf.contains("\"ambient-cni\""), "{conf}");

    start_web(&mut s);
    let client = s.podman.run(
        &s.nets[0],
        "client",
        10,
        false,
        &[
            "sh",
            "-c",
            &format!("echo hello-over-hbone | nc -w 5 {} 8080", s.nets[1].ip(10)),
        ],
    );
    assert!(client.status.success(), "{}", text(&client));
    assert!(
        text(&client).contains("hello-over-hbone"),
        "{}",
        text(&client)
    );
    // ztunnel on b received it over HBONE from the client's identity.
    assert!(
        eventually(T, || s
            .m
            .ztunnel_log("b")
            .contains("src.identity=spiffe://cluster.local/ns/shop/sa/client")),
        "{}",
        s.m.ztunnel_log("b")
    );
    let (_, metrics) = s.m.agent_get("a", "/metrics");
    assert!(
        metrics.contains("ambient_agent_cni_requests_total{result=\"enrolled\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_dual_stack_container_is_enrolled_at_creation_and_talks_over_hbone_on_both_families() {
    let mut s = scene_of(IpFamily::Dual);
    start_web(&mut s);
    // bridge + host-local gave the container an address of each family.
    let addrs = s.nets[1].ips(10);
    assert_eq!(addrs.len(), 2);
    let script: Vec<String> = addrs
        .iter()
        .map(|ip| format!("echo hello-{ip} | nc -w 5 {ip} 8080"))
        .collect();
    let client = s.podman.run(
        &s.nets[0],
        "client",
        10,
        false,
        &["sh", "-c", &script.join("; ")],
    );
    let out = text(&client);
    assert!(client.status.success(), "{out}");
    for ip in &addrs {
        assert!(out.contains(&format!("hello-{ip}")), "{ip}: {out}");
        // Each family arrived over HBONE with the client's identity.
        let dst = std::net::SocketAddr::new(*ip, 8080);
        assert!(
            eventually(T, || s.m.ztunnel_log("b").lines().any(|l| l
                .contains("direction=inbound pod")
                && l.contains(&format!("dst.addr={dst}"))
                && l.contains(
                    "src.identity=spiffe://cluster.local/ns/shop/sa/client"
                ))),
            "{dst}: {}",
            s.m.ztunnel_log("b")
        );
    }
}

#[test]
fn without_the_agent_the_container_does_not_start_and_says_why() {
    let mut s = scene();
    s.m.lab.stop("agent-a");
    let out = s.podman.run(
        &s.nets[0],
        "client2",
        12,
        false,
        &["echo", "should not run"],
    );
    assert!(
        !out.status.success(),
        "started without the agent: {}",
        text(&out)
    );
    let msg = text(&out);
    assert!(msg.contains("node agent is not running"), "{msg}");
    assert!(!msg.contains("should not run"));
}

#[test]
fn a_container_not_meant_for_the_mesh_starts_untouched_and_del_leaves_nothing() {
    let mut s = scene();
    let plain = s
        .podman
        .run(&s.nets[1], "plain", 11, true, &["sleep", "30"]);
    assert!(plain.status.success(), "{}", text(&plain));
    let pid = String::from_utf8_lossy(
        &s.nets[1]
            .ns
            .open()
            .command("podman")
            .env(
                "CONTAINERS_CONF",
                s.m.lab.dir().join("podman/containers.conf"),
            )
            .args(["inspect", "-f", "{{.State.Pid}}", &s.podman.name("plain")])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    let netns = mesh_netns::NetNs::open(format!("/proc/{pid}/ns/net")).unwrap();
    let tables = String::from_utf8_lossy(
        &netns
            .command("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!tables.contains("ztunnel-redirect"), "{tables}");
    let (_, metrics) = s.m.agent_get("b", "/metrics");
    assert!(
        metrics.contains("ambient_agent_cni_requests_total{result=\"not_in_mesh\"} 1"),
        "{metrics}"
    );

    // An enrolled container, then removed: DEL runs the chain and the pod leaves ztunnel.
    let web = s.podman.run(&s.nets[1], "web", 10, true, &["sleep", "30"]);
    assert!(web.status.success(), "{}", text(&web));
    assert!(eventually(T, || s
        .m
        .agent_get("b", "/pods")
        .1
        .contains("\"state\": \"enrolled\"")));
    for name in ["web", "plain"] {
        let out = s.podman.rm(&s.nets[1], name);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(
        eventually(T, || s.m.ztunnel_log("b").contains("pod proxy stopped")),
        "{}",
        s.m.ztunnel_log("b")
    );
    assert!(eventually(T, || !s
        .m
        .agent_get("b", "/pods")
        .1
        .contains("\"state\": \"enrolled\"")));
    // host-local released the addresses; nothing of ours remains in the probe set.
    let ipam = s.m.lab.dir().join("podman/ipam");
    let leased: Vec<_> = std::fs::read_dir(ipam.join(&s.nets[1].network))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("198."))
                .collect()
        })
        .unwrap_or_default();
    assert!(leased.is_empty(), "addresses still leased: {leased:?}");
    let host = s.nets[1]
        .ns
        .exec("nft", &["list", "set", "inet", "ztunnel-host", "probe-v4"]);
    assert!(!host.contains(&s.nets[1].ip(10).to_string()), "{host}");
}
