//! Container networks on simulated nodes, and a minimal CNI runtime that drives them the way
//! libcni does: the first config in the node's conf dir (lexical order), each plugin of its
//! chain exec'd with the `CNI_*` environment and the previous plugin's result as
//! `prevResult`, DEL in reverse order.
//!
//! Each node gets a conf dir holding a `bridge` + `host-local` conflist for a pod subnet of its
//! own per address family of the lab (198.18.(100+i).0/24, fd00:18:(100+i)::/64), routed from
//! the other nodes, and a bin dir where the node agent installs our plugin. The same networks serve podman ([`crate::podman`]) and the local mesh.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::lab::{IpFamily, Lab, Ns};

/// Where Debian puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// One node's container network.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pub node: String,
    pub ns: Ns,
    pub network: String,
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The node's container subnet's third octet: containers are 198.18.{octet}.N (and
    /// fd00:18:{octet}::N).
    pub octet: u8,
    pub family: IpFamily,
}

/// Whether the reference plugins are installed, and if not what to do.
pub fn check_plugins() -> Result<(), String> {
    for plugin in ["bridge", "host-local"] {
        if !Path::new(REFERENCE_PLUGINS).join(plugin).exists() {
            return Err(format!(
                "the CNI reference plugin {plugin} is missing: apt-get install containernetworking-plugins"
            ));
        }
    }
    Ok(())
}

/// Panics with a clear message unless the reference plugins are installed.
pub fn require_plugins() {
    if let Err(why) = check_plugins() {
        panic!("{why}");
    }
}

/// Prepares a container network on every node of `lab`, under `base`.
pub fn node_nets(lab: &Lab, base: &Path) -> Vec<NodeNet> {
    require_plugins();
    let mut nets = Vec::new();
    for node in lab.nodes() {
        let octet = 100 + node.index;
        let network = format!("{}-{}", lab.id(), node.name);
        let conf_dir = base.join(format!("net.d-{}", node.name));
        let bin_dir = base.join(format!("bin-{}", node.name));
        std::fs::create_dir_all(&conf_dir).expect("conf dir");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        let family = lab.family();
        let mut ranges = Vec::new();
        let mut routes = Vec::new();
        let mut subnets = Vec::new();
        if family.has_v4() {
            let subnet = format!("198.18.{octet}.0/24");
            ranges.push(json!([{"subnet": subnet, "gateway": format!("198.18.{octet}.1")}]));
            routes.push(json!({"dst": "0.0.0.0/0"}));
            subnets.push(subnet);
        }
        if family.has_v6() {
            let subnet = format!("fd00:18:{octet}::/64");
            ranges.push(json!([{"subnet": subnet, "gateway": format!("fd00:18:{octet}::1")}]));
            routes.push(json!({"dst": "::/0"}));
            subnets.push(subnet);
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-mesh",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": base.join("ipam").display().to_string(),
                }
            }]
        });
        std::fs::write(
            conf_dir.join("10-mesh.conflist"),
            serde_json::to_string_pretty(&conflist).expect("json"),
        )
        .expect("conflist");
        for subnet in &subnets {
            lab.route_to_node(subnet, &node.name);
        }
        nets.push(NodeNet {
            node: node.name.clone(),
            ns: node.ns.clone(),
            network,
            conf_dir,
            bin_dir,
            octet,
            family,
        });
    }
    nets
}

impl NodeNet {
    /// Host `host`'s address in the IPv4 subnet (whether or not the network has one).
    pub fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet, host)
    }

    /// Host `host`'s address in the IPv6 subnet: `fd00:18:<octet>::<host>`, the groups
    /// spelled with the decimal digits as in [`crate::lab`].
    pub fn ip6(&self, host: u8) -> Ipv6Addr {
        format!("fd00:18:{}::{host}", self.octet)
            .parse()
            .expect("IPv6 address")
    }

    /// Host `host`'s addresses in the network's families, IPv4 first.
    pub fn ips(&self, host: u8) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        if self.family.has_v4() {
            ips.push(self.ip(host).into());
        }
        if self.family.has_v6() {
            ips.push(self.ip6(host).into());
        }
        ips
    }

    /// The config the runtime uses: the first `.conf`/`.conflist`/`.json` file in lexical
    /// order, as a conflist.
    pub fn conflist(&self) -> Result<Value, String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| format!("{}: {e}", self.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "conf" || x == "conflist" || x == "json")
            })
            .collect();
        files.sort();
        let file = files
            .first()
            .ok_or_else(|| format!("no CNI config in {}", self.conf_dir.display()))?;
        let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
        let mut v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        if v.get("plugins").is_none() {
            v = json!({"cniVersion": v["cniVersion"], "name": v["name"], "plugins": [v]});
        }
        Ok(v)
    }

    /// Runs the chain's ADD for a pod sandbox; the final result, and how long it took.
    pub fn add(&self, sandbox: &Sandbox) -> Result<(Value, Duration), String> {
        let list = self.conflist()?;
        let start = Instant::now();
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let conf = plugin_conf(&list, plugin, prev.as_ref());
            prev = Some(self.exec("ADD", sandbox, &conf)?);
        }
        Ok((prev.unwrap_or(Value::Null), start.elapsed()))
    }

    /// Runs the chain's DEL in reverse order; every plugin runs even if one fails.
    pub fn del(&self, sandbox: &Sandbox) -> Result<(), String> {
        let list = self.conflist()?;
        let mut first_error = None;
        for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
            let conf = plugin_conf(&list, plugin, None);
            if let Err(e) = self.exec("DEL", sandbox, &conf) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn exec(&self, command: &str, sandbox: &Sandbox, conf: &Value) -> Result<Value, String> {
        let kind = conf["type"].as_str().unwrap_or_default();
        let binary = [self.bin_dir.as_path(), Path::new(REFERENCE_PLUGINS)]
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.exists())
            .ok_or_else(|| format!("CNI plugin {kind} not found"))?;
        let (out, _) = exec_plugin(&self.ns, &binary, command, sandbox, &self.cni_path(), conf);
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{kind} {command}: {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn cni_path(&self) -> String {
        format!("{}:{REFERENCE_PLUGINS}", self.bin_dir.display())
    }
}

/// The chain's plugin `plugin` as a standalone network config.
fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    conf
}

/// What the runtime knows of a pod sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: PathBuf,
    pub namespace: String,
    pub name: String,
}

/// Runs one CNI plugin inside `ns` (the node's netns) with the `CNI_*` environment for
/// `sandbox` and `conf` on stdin; its output and how long it ran.
pub fn exec_plugin(
    ns: &Ns,
    binary: &Path,
    command: &str,
    sandbox: &Sandbox,
    cni_path: &str,
    conf: &Value,
) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
        sandbox.namespace, sandbox.name, sandbox.container_id
    );
    let mut child = ns
        .open()
        .command(binary)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.container_id)
        .env("CNI_NETNS", &sandbox.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let mut stdin = child.stdin.take().expect("piped");
    let _ = stdin.write_all(conf.to_string().as_bytes());
    drop(stdin);
    let out = child.wait_with_output().expect("plugin output");
    (out, start.elapsed())
}
