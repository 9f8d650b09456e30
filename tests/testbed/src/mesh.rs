//! A mesh of simulated nodes, each running a real `ztunnel` process fed by a stand-in node
//! agent, with a local CA and a local config file. Used by the end-to-end tests and the
//! benchmarks.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::FakeAgent;
use crate::lab::{IpFamily, Lab, Pod};

/// How a workload is listed in the local config.
#[derive(Debug, Clone)]
pub struct Workload {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    pub hbone: bool,
    /// Workload-selector policies (`namespace/name`) that apply to it.
    pub policies: Vec<String>,
}

impl Workload {
    pub fn mesh(pod: &Pod, namespace: &str, service_account: &str) -> Self {
        Self {
            pod: pod.clone(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            hbone: true,
            policies: Vec::new(),
        }
    }

    pub fn uid(&self) -> String {
        format!("{}/{}", self.namespace, self.pod.name)
    }
}

/// A service in the local config: `vip:port` (each of `vips`) → `target_port` on `endpoints`, named
/// `<name>.<namespace>.svc.cluster.local` as in Kubernetes.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<String>,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<String>,
    /// The waypoint's address (`<network>/<ip>` or `<namespace>/<hostname>`), HBONE on 15008.
    pub waypoint: Option<String>,
}

impl Service {
    /// The tests' usual service: `echo.ns-b`, `vip:80` → 8080 on pod `b1`.
    pub fn echo(vip: &str) -> Self {
        Self {
            name: "echo".into(),
            namespace: "ns-b".into(),
            vips: vec![vip.into()],
            port: 80,
            target_port: 8080,
            endpoints: vec!["b1".into()],
            waypoint: None,
        }
    }

    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// A pod's addresses as strings, for a YAML flow list.
fn ips(pod: &Pod) -> Vec<String> {
    pod.ips.iter().map(|ip| ip.to_string()).collect()
}

/// Renders the local config for `workloads` and `services` in Istio's format.
pub fn config_yaml(workloads: &[&Workload], services: &[Service]) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        let _ = writeln!(y, "- uid: {}", w.uid());
        let _ = writeln!(y, "  name: {}", w.pod.name);
        let _ = writeln!(y, "  namespace: {}", w.namespace);
        let _ = writeln!(y, "  serviceAccount: {}", w.service_account);
        let _ = writeln!(y, "  workloadIps: {:?}", ips(&w.pod));
        let _ = writeln!(y, "  protocol: {}", if w.hbone { "HBONE" } else { "TCP" });
        let _ = writeln!(y, "  node: {}", w.pod.node);
        if !w.policies.is_empty() {
            let _ = writeln!(y, "  authorizationPolicies: {:?}", w.policies);
        }
        let svcs: Vec<String> = services
            .iter()
            .filter(|s| s.endpoints.contains(&w.pod.name))
            .map(|s| {
                format!(
                    "\"{}/{}\": {{{}: {}}}",
                    s.namespace,
                    s.hostname(),
                    s.port,
                    s.target_port
                )
            })
            .collect();
        let _ = writeln!(y, "  services: {{{}}}", svcs.join(", "));
    }
    y.push_str("services:\n");
    for s in services {
        let _ = writeln!(y, "- name: {}", s.name);
        let _ = writeln!(y, "  namespace: {}", s.namespace);
        let _ = writeln!(y, "  hostname: {}", s.hostname());
        let vips: Vec<String> = s.vips.iter().map(|v| format!("/{v}")).collect();
        let _ = writeln!(y, "  vips: {vips:?}");
        let _ = writeln!(y, "  ports: {{{}: {}}}", s.port, s.target_port);
        if let Some(w) = &s.waypoint {
            let _ = writeln!(
                y,
                "  waypoint: {{destination: \"{w}\", hboneMtlsPort: 15008}}"
            );
        }
    }
    y
}

/// Simulated nodes, each with a ztunnel and a stand-in agent.
#[derive(Debug)]
pub struct Mesh {
    pub lab: Lab,
    pub agents: HashMap<String, FakeAgent>,
    pub ca_dir: PathBuf,
    pub config: PathBuf,
    /// ztunnel's `--log` filter.
    pub log: String,
    /// Nodes whose pods are enrolled by the real node agent, not the stand-in.
    pub real_agents: std::collections::BTreeSet<String>,
    /// ztunnel signs with the lab's local CA (`--ca-dir`); false when a test gives
    /// `--ca-address` instead.
    pub local_ca: bool,
}

impl Mesh {
    /// Nodes named `nodes`, a fresh CA and an empty config. No ztunnel runs yet.
    pub fn new(nodes: &[&str]) -> Self {
        Self::in_lab(Lab::new(), nodes)
    }

    /// The same with nodes and pods of `family`.
    pub fn with_family(nodes: &[&str], family: IpFamily) -> Self {
        Self::in_lab(Lab::new().with_family(family), nodes)
    }

    /// The same in a lab made by the caller (e.g. [`Lab::named`]).
    pub fn in_lab(mut lab: Lab, nodes: &[&str]) -> Self {
        for n in nodes {
            lab.add_node(n);
        }
        let ca_dir = lab.dir().join("ca");
        ztunnel::identity::ca::generate(&ca_dir, "cluster.local", Duration::from_secs(86400))
            .expect("CA");
        let config = lab.dir().join("mesh.yaml");
        std::fs::write(&config, "").expect("config");
        Self {
            lab,
            agents: HashMap::new(),
            ca_dir,
            config,
            log: "info,ztunnel=debug".into(),
            real_agents: Default::default(),
            local_ca: true,
        }
    }

    pub fn write_config(&self, workloads: &[&Workload], services: &[Service]) {
        self.write_config_text(&config_yaml(workloads, services));
    }

    /// Replaces the config file atomically with `yaml`.
    pub fn write_config_text(&self, yaml: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    pub fn zds_socket(&self, node: &str) -> PathBuf {
        self.lab.dir().join(format!("{node}-zds.sock"))
    }

    /// Starts ztunnel on `node` (with `extra` flags) and waits for it to connect to the
    /// node's stand-in agent.
    pub fn start_ztunnel(&mut self, node: &str, extra: &[&str]) {
        self.start_ztunnel_as(node, &format!("ztunnel-{node}"), extra);
    }

    /// As [`Mesh::start_ztunnel`], as lab process `name` (a second ztunnel beside the first,
    /// as in a rolling update; give it its own `--admin-addr`, `--metrics-addr` and
    /// `--readiness-addr`).
    pub fn start_ztunnel_as(&mut self, node: &str, name: &str, extra: &[&str]) {
        let sock = self.zds_socket(node);
        let real_agent = self.real_agents.contains(node);
        if !real_agent && !self.agents.contains_key(node) {
            self.agents.insert(node.to_string(), FakeAgent::bind(&sock));
        }
        let mut args: Vec<String> = [
            "run",
            "--zds-socket",
            &sock.to_string_lossy(),
            "--local-config",
            &self.config.to_string_lossy(),
            "--workers",
            "2",
            "--config-poll",
            "100ms",
            "--log",
            &self.log,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.local_ca {
            args.extend(["--ca-dir".to_string(), self.ca_dir.display().to_string()]);
        }
        if !extra.contains(&"--drain-timeout") {
            args.extend(["--drain-timeout".to_string(), "5s".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let ns = self.lab.node(node).ns.clone();
        let bin = crate::binary("ztunnel");
        self.lab.spawn(name, &ns, &bin, &args, &[]);
        if !real_agent {
            self.agent(node).accept(Duration::from_secs(20));
        }
    }

    /// The real node agent's `--run-dir` on `node` (its CNI event socket lives there).
    pub fn agent_run_dir(&self, node: &str) -> PathBuf {
        self.lab.dir().join(format!("{node}-run"))
    }

    /// The pod file the real node agent of `node` reads.
    pub fn pod_file(&self, node: &str) -> PathBuf {
        self.lab.dir().join(format!("{node}-pods.yaml"))
    }

    /// Writes `node`'s pod file: these workloads' pods (their netns by path), each namespace
    /// labelled for ambient unless listed in `plain_namespaces`.
    pub fn write_pods(&self, node: &str, workloads: &[&Workload], extra_pod_yaml: &str) {
        let mut y = String::from("namespaces:\n");
        let mut seen = std::collections::BTreeSet::new();
        for w in workloads {
            if seen.insert(w.namespace.clone()) {
                let _ = writeln!(
                    y,
                    "- name: {}\n  labels: {{istio.io/dataplane-mode: ambient}}",
                    w.namespace
                );
            }
        }
        y.push_str("pods:\n");
        for w in workloads {
            let _ = writeln!(
                y,
                "- {{name: {}, namespace: {}, uid: {}, serviceAccount: {}, ips: {:?}, netns: {}}}",
                w.pod.name,
                w.namespace,
                w.uid(),
                w.service_account,
                ips(&w.pod),
                w.pod.ns.path().display()
            );
        }
        y.push_str(extra_pod_yaml);
        let file = self.pod_file(node);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, y).expect("write pod file");
        std::fs::rename(&tmp, &file).expect("rename pod file");
    }

    /// Starts the real node agent on `node`, reading [`Mesh::pod_file`], serving ZDS where
    /// this node's ztunnel connects. Waits until its endpoint answers.
    pub fn start_agent(&mut self, node: &str, extra: &[&str]) {
        let file = self.pod_file(node);
        if !file.exists() {
            std::fs::write(&file, "").expect("pod file");
        }
        let source = [
            "--pod-file".to_string(),
            file.to_string_lossy().into_owned(),
        ];
        self.start_agent_with(node, &source, extra);
    }

    /// Starts the real node agent on `node` watching the Kubernetes API described by
    /// `kubeconfig`, as node `node_name`.
    pub fn start_agent_kube(&mut self, node: &str, kubeconfig: &std::path::Path, node_name: &str) {
        let source = [
            "--kubeconfig".to_string(),
            kubeconfig.to_string_lossy().into_owned(),
            "--node-name".to_string(),
            node_name.to_string(),
        ];
        self.start_agent_with(node, &source, &[]);
    }

    fn start_agent_with(&mut self, node: &str, source: &[String], extra: &[&str]) {
        self.real_agents.insert(node.to_string());
        let state = self.lab.dir().join(format!("{node}-agent-state"));
        let mut args: Vec<String> = [
            "run",
            "--zds-socket",
            &self.zds_socket(node).to_string_lossy(),
            "--run-dir",
            &self.agent_run_dir(node).to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--http-addr",
            "127.0.0.1:8000",
            "--netns-dir",
            &self.lab.node_netns_dir(node).to_string_lossy(),
            // Lab pods run no processes; the machine's /proc belongs to other tests.
            "--proc-dir",
            &self.lab.dir().join("no-proc").to_string_lossy(),
            "--drift-interval",
            "1s",
            "--pod-file-poll",
            "100ms",
            "--log",
            "info,node_agent=debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(source.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let ns = self.lab.node(node).ns.clone();
        let bin = crate::binary("node-agent");
        self.lab
            .spawn(&format!("agent-{node}"), &ns, &bin, &args, &[]);
        let up = eventually(Duration::from_secs(20), || {
            ns.http_get("127.0.0.1:8000".parse().expect("addr"), "/metrics")
                .is_ok()
        });
        assert!(
            up,
            "node agent on {node} did not come up: {}",
            self.lab.process(&format!("agent-{node}")).log_text()
        );
    }

    /// `GET path` on `node`'s agent endpoint: (status, body).
    pub fn agent_get(&self, node: &str, path: &str) -> (u16, String) {
        self.lab
            .node(node)
            .ns
            .http_get("127.0.0.1:8000".parse().expect("addr"), path)
            .unwrap_or_else(|e| panic!("agent endpoint on {node}: {e}"))
    }

    /// The node agent log of `node` so far.
    pub fn agent_log(&mut self, node: &str) -> String {
        self.lab.process(&format!("agent-{node}")).log_text()
    }

    pub fn agent(&mut self, node: &str) -> &mut FakeAgent {
        self.agents
            .get_mut(node)
            .unwrap_or_else(|| panic!("no agent on {node}"))
    }

    /// Installs redirection in the workload's pod and hands it to its node's ztunnel.
    pub fn enroll(&mut self, w: &Workload) {
        let node = w.pod.node.clone();
        self.agent(&node)
            .enroll(&w.pod, &w.uid(), &w.namespace, &w.service_account);
    }

    /// The ztunnel log of `node` so far.
    pub fn ztunnel_log(&mut self, node: &str) -> String {
        self.lab.process(&format!("ztunnel-{node}")).log_text()
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The usual scene: nodes `a` and `b`, a client pod `a1` (`ns-a/client`) on `a` and a server
/// pod `b1` (`ns-b/server`) on `b`. Nothing is configured or running until [`Scene::run`].
#[derive(Debug)]
pub struct Scene {
    pub m: Mesh,
    pub a1: Pod,
    pub b1: Pod,
    pub wa: Workload,
    pub wb: Workload,
}

impl Scene {
    pub fn new() -> Self {
        Self::with_family(IpFamily::Ipv4)
    }

    /// The scene with nodes and pods of `family`.
    pub fn with_family(family: IpFamily) -> Self {
        let mut m = Mesh::with_family(&["a", "b"], family);
        let a1 = m.lab.add_pod("a", "a1");
        let b1 = m.lab.add_pod("b", "b1");
        let wa = Workload::mesh(&a1, "ns-a", "client");
        let wb = Workload::mesh(&b1, "ns-b", "server");
        Self { m, a1, b1, wa, wb }
    }

    /// Lists both pods in the config, starts ztunnel on both nodes (`a_flags` for node `a`)
    /// and enrolls both pods.
    pub fn run(&mut self, a_flags: &[&str]) {
        self.m.write_config(&[&self.wa, &self.wb], &[]);
        self.m.start_ztunnel("a", a_flags);
        self.m.start_ztunnel("b", &[]);
        self.m.enroll(&self.wa);
        self.m.enroll(&self.wb);
    }

    /// As [`Scene::run`] with the real node agent on both nodes (each pod in its node's pod
    /// file, `ztunnel_flags` for both ztunnels); returns once both pods are proxied.
    pub fn run_with_agents(&mut self, ztunnel_flags: &[&str]) {
        self.m.write_config(&[&self.wa, &self.wb], &[]);
        for (node, w) in [("a", self.wa.clone()), ("b", self.wb.clone())] {
            self.m.write_pods(node, &[&w], "");
            self.m.start_agent(node, &[]);
            self.m.start_ztunnel(node, ztunnel_flags);
        }
        assert!(
            eventually(Duration::from_secs(10), || crate::apps::proxied(&self.a1)
                && crate::apps::proxied(&self.b1)),
            "the agents did not enroll both pods"
        );
    }
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}
