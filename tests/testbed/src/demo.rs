//! The local mesh: N simulated nodes, each running the real `node-agent` (which installs the
//! CNI plugin into the node's CNI config) and the real `ztunnel`; pods created through the real
//! CNI path (`bridge` + `host-local`, then `ambient-cni`, exec'd by [`crate::cni`]'s runtime);
//! traffic across and within nodes, through a stand-in waypoint ([`crate::relay`]) for the
//! `checkout` service; pods' DNS captured to ztunnel's DNS proxy (mesh names answered there,
//! others forwarded to a dnsmasq upstream); a report built from ztunnel's own access logs and
//! the answers `dig` got in a pod.
//!
//! The `local-mesh` binary prints the report; the integration tests run the same mesh
//! headless and assert on [`Report`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::apps::EchoServer;
use crate::cni::{NodeNet, Sandbox};
use crate::lab::{IpFamily, Lab, Pod};
use crate::mesh::{Mesh, Service, Workload, eventually};

mod report;

pub use report::{DnsRow, LoadSummary, Report, Row, render, short_id};
use report::{exchange, find_event, row};

/// The id of a kept mesh (one at a time); `local-mesh down` purges it.
pub const KEPT_ID: &str = "lmesh";

/// `backend`'s VIP: the last group of [`vip`].
const SERVICE_VIP: u8 = 10;
/// `checkout`: backend again, but every connection goes through the waypoint.
const WAYPOINT_VIP: u8 = 11;
/// What the upstream resolver answers for [`OUTSIDE_NAME`], per family.
const OUTSIDE_NAME: &str = "outside.example";
const OUTSIDE_ANSWER: [&str; 2] = ["198.18.77.7", "fd00:18:77::7"];
/// Where a pod sends DNS queries (any address does: port 53 is captured), per family.
const RESOLVER: [&str; 2] = ["198.18.200.53", "fd00:18:200::53"];
const LOAD_PORT: u16 = 7000;
/// db's second port, which a namespace policy closes.
const DB_ADMIN_PORT: u16 = 9000;
/// L4 policies of the demo: db takes clients from the `shop` namespace only (so the pod
/// outside the mesh, which has no identity, is refused), and nobody reaches its port 9000.
const POLICIES: &str = "policies:
- {name: db-clients, namespace: data, scope: WorkloadSelector, action: Allow, rules: [[[{namespaces: [!Exact shop]}]]]}
- {name: no-admin-port, namespace: data, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [9000]}]]]}
";
const T: Duration = Duration::from_secs(30);

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated nodes (at least 2).
    pub nodes: usize,
    /// Extra pods per node, each talking to its twin on the next node (a scale check).
    pub load_pods: usize,
    /// Build in a lab named [`KEPT_ID`] that can outlive this process.
    pub keep: bool,
    /// The address families of nodes, pods and services; with both, every path is driven
    /// over each.
    pub family: IpFamily,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 2,
            load_pods: 0,
            keep: false,
            family: IpFamily::default(),
        }
    }
}

/// A pod of the demo: where it runs and who it is.
#[derive(Debug, Clone)]
pub struct DemoPod {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    pub in_mesh: bool,
    pub sandbox: Sandbox,
}

/// A running local mesh.
pub struct LocalMesh {
    pub mesh: Mesh,
    pub nets: Vec<NodeNet>,
    pub pods: Vec<DemoPod>,
    /// Each pod's CNI ADD time.
    pub cni_adds: Vec<Duration>,
    servers: Vec<EchoServer>,
    /// The stand-in waypoint's pod, and the waypoint while traffic runs.
    waypoint: Pod,
    relay: Option<crate::relay::Relay>,
}

impl std::fmt::Debug for LocalMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMesh")
            .field("lab", &self.mesh.lab.id())
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// A service VIP of the demo in the family of `like`: 198.19.100.<n> or fd00:19:100::<n>.
fn vip(like: IpAddr, n: u8) -> IpAddr {
    if like.is_ipv6() {
        format!("fd00:19:100::{n}").parse().expect("IPv6 VIP")
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 19, 100, n))
    }
}

/// `[v4, v6][family of ip]`.
fn per_family<T: Copy>(ip: IpAddr, pair: [T; 2]) -> T {
    pair[usize::from(ip.is_ipv6())]
}

impl LocalMesh {
    /// The lab to build in: [`KEPT_ID`] for `--keep`, else a fresh one. Its id is what a
    /// signal handler purges.
    pub fn lab(opts: &Options) -> Result<Lab, String> {
        if !(2..=50).contains(&opts.nodes) {
            return Err(format!("--nodes {} is out of range (2 to 50)", opts.nodes));
        }
        if opts.load_pods > 200 {
            return Err(format!(
                "--pods {} is out of range (0 to 200 per node)",
                opts.load_pods
            ));
        }
        crate::cni::check_plugins()?;
        for (tool, package) in [
            ("/usr/bin/dig", "bind9-dnsutils"),
            ("/usr/sbin/dnsmasq", "dnsmasq-base"),
        ] {
            if !std::path::Path::new(tool).exists() {
                return Err(format!(
                    "the DNS rows need {tool}: apt-get install {package}"
                ));
            }
        }
        if opts.keep && !std::path::Path::new("/bin/busybox").exists() {
            return Err(
                "--keep runs busybox echo servers in the pods: apt-get install busybox-static"
                    .into(),
            );
        }
        let lab = if opts.keep {
            Lab::named(KEPT_ID)
        } else {
            Lab::new()
        };
        Ok(lab.with_family(opts.family))
    }

    /// Builds the mesh in `lab` (from [`LocalMesh::lab`]): nodes, agents (installing the
    /// plugin), ztunnels, pods through CNI, then ztunnel's registry with the pods' addresses.
    /// `progress` hears each step.
    pub fn up(lab: Lab, opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Self, String> {
        let names: Vec<String> = (0..opts.nodes).map(node_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        progress(&format!(
            "creating {} nodes (network namespaces linked pairwise) and a local CA",
            opts.nodes
        ));
        let mut mesh = Mesh::in_lab(lab, &refs);
        mesh.log = "info".into();
        let nets = crate::cni::node_nets(&mesh.lab, &mesh.lab.dir().join("cni"));

        // Who runs where: the named demo pods on the first two nodes, load pods everywhere.
        let mut plan: Vec<(usize, &str, &str, &str, bool)> = vec![
            (0, "frontend", "shop", "frontend", true),
            (0, "outsider", "legacy", "default", false),
            (1, "backend", "shop", "backend", true),
            (1, "db", "data", "db", true),
        ];
        let load_names: Vec<String> = (0..opts.nodes * opts.load_pods)
            .map(|k| format!("load-{}-{}", k / opts.load_pods + 1, k % opts.load_pods))
            .collect();
        for (k, name) in load_names.iter().enumerate() {
            plan.push((k / opts.load_pods, name, "load", "load", true));
        }
        for (i, node) in names.iter().enumerate() {
            let mut y = String::from(
                "namespaces:\n\
                 - {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n\
                 - {name: data, labels: {istio.io/dataplane-mode: ambient}}\n\
                 - {name: load, labels: {istio.io/dataplane-mode: ambient}}\n\
                 - {name: legacy}\npods:\n",
            );
            for (_, name, ns, sa, _) in plan.iter().filter(|p| p.0 == i) {
                y += &format!(
                    "- {{name: {name}, namespace: {ns}, uid: {ns}/{name}, serviceAccount: {sa}}}\n"
                );
            }
            std::fs::write(mesh.pod_file(node), y).map_err(|e| e.to_string())?;
        }

        progress(&format!(
            "starting a stand-in waypoint on {} and an upstream DNS resolver (dnsmasq) on {}",
            names[1], names[0]
        ));
        let waypoint = mesh.lab.add_pod(&names[1], "waypoint");
        let resolver = mesh.lab.add_pod(&names[0], "resolver");
        let answers: Vec<&str> = resolver
            .ips
            .iter()
            .map(|ip| per_family(*ip, OUTSIDE_ANSWER))
            .collect();
        crate::apps::start_dnsmasq(&mut mesh.lab, &resolver, OUTSIDE_NAME, &answers);
        let upstream = SocketAddr::new(resolver.ip, 53).to_string();

        progress(
            "starting node-agent (installing the CNI plugin, capturing DNS) and ztunnel on every node",
        );
        let plugin = crate::binary("ambient-cni").display().to_string();
        for net in &nets {
            let conf = net.conf_dir.display().to_string();
            let bin = net.bin_dir.display().to_string();
            let flags = [
                "--install-cni",
                "--cni-conf-dir",
                &conf,
                "--cni-bin-dir",
                &bin,
                "--cni-plugin",
                &plugin,
                "--dns-capture",
            ];
            mesh.start_agent(&net.node, &flags);
            mesh.start_ztunnel(
                &net.node,
                &["--log-format", "json", "--dns-upstream", &upstream],
            );
        }
        for node in &names {
            if !eventually(T, || mesh.agent_get(node, "/readyz").0 == 200) {
                return Err(format!(
                    "the node agent on {node} is not ready: {}",
                    mesh.agent_get(node, "/readyz").1
                ));
            }
        }

        progress(&format!(
            "creating {} pods through CNI (bridge + host-local, then ambient-cni)",
            plan.len()
        ));
        let mut pods = Vec::new();
        let mut adds = Vec::new();
        for (i, name, ns, sa, in_mesh) in &plan {
            let net = &nets[*i];
            let netns = mesh.lab.add_netns(&net.node, name);
            let sandbox = Sandbox {
                container_id: format!("{}-{name}", mesh.lab.id()),
                netns: netns.path(),
                namespace: ns.to_string(),
                name: name.to_string(),
            };
            let (result, took) = net
                .add(&sandbox)
                .map_err(|e| format!("CNI ADD for {ns}/{name} on {}: {e}", net.node))?;
            adds.push(took);
            let ips = result_ips(&result);
            let Some(ip) = ips.first().copied() else {
                return Err(format!("CNI ADD for {name} returned no address: {result}"));
            };
            pods.push(DemoPod {
                pod: Pod {
                    name: name.to_string(),
                    node: net.node.clone(),
                    ns: netns,
                    ip,
                    ips,
                },
                namespace: ns.to_string(),
                service_account: sa.to_string(),
                in_mesh: *in_mesh,
                sandbox,
            });
        }

        progress(
            "publishing the pods' addresses and L4 policies to every ztunnel (the local config)",
        );
        let mut workloads: Vec<Workload> = pods
            .iter()
            .filter(|p| p.in_mesh)
            .map(|p| {
                let mut w = Workload::mesh(&p.pod, &p.namespace, &p.service_account);
                if p.pod.name == "db" {
                    w.policies = vec!["data/db-clients".into()];
                }
                w
            })
            .collect();
        workloads.push(Workload::mesh(&waypoint, "shop", "waypoint"));
        let waypoint_pod = waypoint.clone();
        // Report rows tell flows apart by destination port: checkout listens on 81.
        let service = |name: &str, n: u8, port: u16, waypoint: Option<String>| Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: waypoint_pod
                .ips
                .iter()
                .map(|ip| vip(*ip, n).to_string())
                .collect(),
            port,
            target_port: 8080,
            endpoints: vec!["backend".into()],
            waypoint,
        };
        let services = [
            service("backend", SERVICE_VIP, 80, None),
            service(
                "checkout",
                WAYPOINT_VIP,
                81,
                Some(format!("/{}", waypoint.ip)),
            ),
        ];
        let registry = crate::mesh::config_yaml(&workloads.iter().collect::<Vec<_>>(), &services);
        mesh.write_config_text(&format!("{registry}{POLICIES}"));
        for node in &names {
            if !eventually(T, || {
                mesh.ztunnel_log(node).contains("local config reloaded")
            }) {
                return Err(format!("ztunnel on {node} did not load the mesh config"));
            }
        }
        Ok(Self {
            mesh,
            nets,
            pods,
            cni_adds: adds,
            servers: Vec::new(),
            waypoint,
            relay: None,
        })
    }

    pub fn pod(&self, name: &str) -> &DemoPod {
        self.pods
            .iter()
            .find(|p| p.pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Drives traffic over every path and reads the access logs into a report.
    pub fn drive(&mut self, progress: &mut dyn FnMut(&str)) -> Report {
        let frontend = self.pod("frontend").pod.clone();
        let outsider = self.pod("outsider").pod.clone();
        let backend = self.pod("backend").pod.clone();
        let db = self.pod("db").pod.clone();
        self.servers = vec![
            EchoServer::start(&backend, 8080),
            EchoServer::start(&db, 5432),
            EchoServer::start(&db, DB_ADMIN_PORT),
            EchoServer::start(&outsider, 9090),
        ];
        let load: Vec<Pod> = self
            .pods
            .iter()
            .filter(|p| p.namespace == "load")
            .map(|p| p.pod.clone())
            .collect();
        for p in &load {
            self.servers.push(EchoServer::start(p, LOAD_PORT));
        }
        self.relay = Some(self.start_waypoint(&backend));
        let mut flows = Vec::new();
        for family_ip in backend.ips.clone() {
            flows.extend(Self::flows(family_ip, &frontend, &outsider, &backend, &db));
        }
        progress("driving a 64 KiB echo over each path");
        let measured: Vec<_> = flows
            .iter()
            .map(|(_, from, to, _, _)| exchange(from, *to))
            .collect();
        let load_measured: Vec<_> = if load.is_empty() {
            Vec::new()
        } else {
            progress(&format!(
                "driving {} load pods, each to its twin on the next node",
                load.len()
            ));
            let per_node = load.len() / self.nets.len();
            (0..load.len())
                .map(|k| {
                    let twin = load[(k + per_node) % load.len()].addr(LOAD_PORT);
                    (load[k].clone(), twin, exchange(&load[k], twin))
                })
                .collect()
        };
        // Access events are written when each side has closed; give the last ones a moment.
        let expected = flows.len() + load_measured.len();
        let mut events = Vec::new();
        eventually(Duration::from_secs(5), || {
            events = self.access_events();
            events
                .iter()
                .filter(|e| e["direction"] != "inbound")
                .count()
                >= expected
        });

        let mut rows = Vec::new();
        for ((label, from, to, to_name, deny), m) in flows.iter().zip(measured) {
            let event = find_event(&events, from, *to);
            rows.push(row(label, from, *to, to_name, event, m, *deny));
        }
        let load_summary = (!load_measured.is_empty()).then(|| {
            let mut lat: Vec<Duration> = load_measured.iter().map(|(_, _, m)| m.latency).collect();
            lat.sort();
            let mtls = load_measured
                .iter()
                .filter(|(from, to, m)| {
                    m.ok && find_event(&events, from, *to).is_some_and(|e| e["security"] == "mtls")
                })
                .count();
            LoadSummary {
                flows: load_measured.len(),
                ok: load_measured.iter().filter(|(_, _, m)| m.ok).count(),
                mtls,
                p50: lat[lat.len() / 2],
                p99: lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
            }
        });
        progress("asking DNS from frontend (dig, each family): a mesh name and an outside one");
        let dns = self.dns_rows(&frontend);
        Report {
            nodes: self.nets.len(),
            rows,
            dns,
            load: load_summary,
            cni_adds: self.cni_adds.clone(),
        }
    }

    /// Every path of the demo over the family of `family_ip`: (label, client, destination,
    /// destination's name, expected to be denied by policy).
    fn flows<'p>(
        family_ip: IpAddr,
        frontend: &'p Pod,
        outsider: &'p Pod,
        backend: &'p Pod,
        db: &'p Pod,
    ) -> Vec<(&'static str, &'p Pod, SocketAddr, &'static str, bool)> {
        let at = |pod: &Pod, port: u16| {
            SocketAddr::new(
                pod.ip_like(family_ip).expect("every pod has every family"),
                port,
            )
        };
        let service_vip = SocketAddr::new(vip(family_ip, SERVICE_VIP), 80);
        let waypoint_vip = SocketAddr::new(vip(family_ip, WAYPOINT_VIP), 81);
        vec![
            (
                "pod to pod, across nodes",
                frontend,
                at(backend, 8080),
                "backend",
                false,
            ),
            (
                "through a service VIP",
                frontend,
                service_vip,
                "backend (svc)",
                false,
            ),
            (
                "through a waypoint",
                frontend,
                waypoint_vip,
                "backend (wp)",
                false,
            ),
            ("across namespaces", frontend, at(db, 5432), "db", false),
            ("within one node", backend, at(db, 5432), "db", false),
            (
                "from outside the mesh",
                outsider,
                at(backend, 8080),
                "backend",
                false,
            ),
            (
                "to outside the mesh",
                frontend,
                at(outsider, 9090),
                "outsider",
                false,
            ),
            (
                "policy: port 9000 denied",
                frontend,
                at(db, DB_ADMIN_PORT),
                "db",
                true,
            ),
            ("policy: no identity", outsider, at(db, 5432), "db", true),
        ]
    }

    /// The stand-in waypoint: `checkout`'s connections (to its VIP of either family),
    /// re-tunnelled to backend's ztunnel in the same family.
    fn start_waypoint(&self, backend: &Pod) -> crate::relay::Relay {
        let identity =
            ztunnel::identity::Identity::new("cluster.local", "shop", "backend").expect("identity");
        let targets: Vec<(String, crate::relay::HboneTarget)> = backend
            .ips
            .iter()
            .map(|ip| {
                let target = crate::relay::HboneTarget {
                    addr: SocketAddr::new(*ip, 15008),
                    identity: identity.clone(),
                    authority: SocketAddr::new(*ip, 8080).to_string(),
                };
                (
                    SocketAddr::new(vip(*ip, WAYPOINT_VIP), 81).to_string(),
                    target,
                )
            })
            .collect();
        let route = std::sync::Arc::new(move |authority: &str| {
            targets
                .iter()
                .find(|(vip, _)| vip == authority)
                .map(|(_, target)| target.clone())
        });
        crate::relay::Relay::start(
            &self.mesh,
            &self.waypoint,
            "shop",
            "waypoint",
            crate::relay::Forward::Hbone(route),
        )
    }

    /// `dig` in `from`, in each of its families (A, AAAA), for a mesh name (ztunnel must
    /// answer it, dnsmasq never hear of it) and an outside name (forwarded: dnsmasq answers).
    /// Any resolver address does: the pod's port 53 is captured.
    fn dns_rows(&mut self, from: &Pod) -> Vec<DnsRow> {
        let mesh_name = "backend.shop.svc.cluster.local";
        let mut rows = Vec::new();
        let mut expected = Vec::new();
        for ip in &from.ips {
            let qtype = per_family(*ip, ["A", "AAAA"]);
            let wanted = [
                (mesh_name, vip(*ip, SERVICE_VIP).to_string(), "ztunnel"),
                (
                    OUTSIDE_NAME,
                    per_family(*ip, OUTSIDE_ANSWER).to_string(),
                    "upstream",
                ),
            ];
            for (name, answer, by) in wanted {
                let server = format!("@{}", per_family(*ip, RESOLVER));
                let out = from
                    .ns
                    .open()
                    .command("/usr/bin/dig")
                    .args([&server, "+short", "+time=2", "+tries=2", qtype, name])
                    .output();
                let got = out
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_else(|e| format!("dig failed: {e}"));
                rows.push(DnsRow {
                    name: name.to_string(),
                    qtype,
                    answer: if got.is_empty() { "(none)".into() } else { got },
                    answered_by: by,
                    ok: false,
                });
                expected.push(answer);
            }
        }
        let upstream_saw =
            |r: &DnsRow, log: &str| log.contains(&format!("query[{}] {}", r.qtype, r.name));
        eventually(Duration::from_secs(2), || {
            let log = self.mesh.lab.process("dnsmasq").log_text();
            rows.iter()
                .filter(|r| r.answered_by == "upstream")
                .all(|r| upstream_saw(r, &log))
        });
        let log = self.mesh.lab.process("dnsmasq").log_text();
        for (r, expected) in rows.iter_mut().zip(expected) {
            let heard = upstream_saw(r, &log);
            r.ok = r.answer == expected && heard == (r.answered_by == "upstream");
        }
        rows
    }

    /// Every access event of every ztunnel so far.
    fn access_events(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        for net in &self.nets {
            for line in self.mesh.ztunnel_log(&net.node).lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && v["target"] == "access"
                {
                    out.push(v);
                }
            }
        }
        out
    }

    /// Runs CNI DEL for every pod (as the runtime does when pods go), then removes the lab.
    /// Returns what DEL left behind, if anything.
    pub fn down(mut self) -> Result<(), String> {
        self.servers.clear();
        let mut left = Vec::new();
        for p in &self.pods {
            let net = self
                .nets
                .iter()
                .find(|n| n.node == p.pod.node)
                .expect("pod's node");
            if let Err(e) = net.del(&p.sandbox) {
                left.push(format!("{}: DEL failed: {e}", p.pod.name));
                continue;
            }
            let tables = p.pod.ns.exec("nft", &["list", "tables"]);
            if tables.contains("ztunnel") {
                left.push(format!("{}: rules left after DEL: {tables}", p.pod.name));
            }
            let links = p.pod.ns.exec("ip", &["-o", "link", "show"]);
            if links.lines().count() > 1 {
                left.push(format!(
                    "{}: interfaces left after DEL: {links}",
                    p.pod.name
                ));
            }
        }
        drop(self);
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join("\n"))
        }
    }

    /// Leaves the mesh running after this process exits, with echo servers as processes in
    /// the server pods; `local-mesh down` removes it.
    pub fn keep(mut self) -> PathBuf {
        self.servers.clear();
        // The stand-in waypoint lives in this process: `checkout` is refused once it exits.
        self.relay = None;
        for (name, port) in [("backend", 8080), ("db", 5432), ("outsider", 9090)] {
            let ns = self.pod(name).pod.ns.clone();
            let args: Vec<String> = ["nc", "-ll", "-p", &port.to_string(), "-e", "/bin/cat"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            self.mesh.lab.spawn(
                &format!("echo-{name}"),
                &ns,
                std::path::Path::new("/bin/busybox"),
                &args,
                &[],
            );
        }
        let dir = self.mesh.lab.dir().to_path_buf();
        self.mesh.lab.keep();
        dir
    }
}

/// The addresses of a CNI result, IPv4 first.
fn result_ips(result: &Value) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips
}
