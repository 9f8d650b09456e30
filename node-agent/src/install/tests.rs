use std::os::unix::fs::PermissionsExt;

use super::*;

const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "podman",
  "plugins": [
    {"type": "bridge", "bridge": "cni-podman0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall"},
    {"type": "tuning"}
  ]
}"#;

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node-1",
     "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}"#;

const CILIUM: &str = r#"{"cniVersion": "0.3.1", "name": "cilium", "type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}"#;

fn installer(dir: &tempfile::TempDir) -> Installer {
    let bin = dir.path().join("src-bin");
    fs::write(&bin, b"#!plugin v1").unwrap();
    Installer {
        binary: bin,
        bin_dir: dir.path().join("bin"),
        conf_dir: dir.path().join("net.d"),
        entry: entry(
            Path::new("/var/run/istio-cni"),
            &["kube-system".into(), "ambient".into()],
            "warn",
        ),
    }
}

fn write(i: &Installer, name: &str, text: &str, mode: u32) {
    fs::create_dir_all(&i.conf_dir).unwrap();
    let p = i.conf_dir.join(name);
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn read(i: &Installer, name: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(i.conf_dir.join(name)).unwrap()).unwrap()
}

fn ours_count(v: &Value) -> usize {
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] == PLUGIN_TYPE)
        .count()
}

#[test]
fn picks_the_first_valid_config_in_lexical_order() {
    let files: Vec<(String, String)> = [
        ("00-broken.conflist", "{not json"),
        (
            "01-empty.conflist",
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
        ),
        ("02-notype.conf", r#"{"cniVersion":"1.0.0","name":"x"}"#),
        ("README.md", "hello"),
        ("10-calico.conflist", CALICO),
        ("87-podman-bridge.conflist", BRIDGE),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let (chosen, skipped) = primary(&files);
    assert_eq!(chosen.unwrap().file, "10-calico.conflist");
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(primary(&[]).0.is_none());
}

#[test]
fn inserts_once_into_a_conflist_keeping_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let i = installer(&dir);
    write(&i, "10-calico.conflist", CALICO, 0o600);
    write(&i, "87-podman-bridge.conflist", BRIDGE, 0o644);
    assert_eq!(
        i.pass().unwrap(),
        Pass::Inserted("10-calico.conflist".into())
    );
    assert_eq!(i.pass().unwrap(), Pass::Intact("10-calico.conflist".into()));
    let v = read(&i, "10-calico.conflist");
    assert_eq!(ours_count(&v), 1);
    assert_eq!(
        v["plugins"].as_array().unwrap().last().unwrap()["type"],
        PLUGIN_TYPE
    );
    assert_eq!(v["plugins"][0]["type"], "calico");
    let mode = fs::metadata(i.conf_dir.join("10-calico.conflist"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The lower-priority file is left alone.
    assert_eq!(ours_count(&read(&i, "87-podman-bridge.conflist")), 0);
}

#[test]
fn wraps_a_conf_into_a_conflist_that_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let i = installer(&dir);
    write(&i, "05-cilium.conf", CILIUM, 0o640);
    assert_eq!(
        i.pass().unwrap(),
        Pass::Inserted("05-cilium.conflist".into())
    );
    assert!(!i.conf_dir.join("05-cilium.conf").exists());
    let v = read(&i, "05-cilium.conflist");
    assert_eq!(
        (v["name"].as_str(), v["cniVersion"].as_str()),
        (Some("cilium"), Some("0.3.1"))
    );
    assert_eq!(v["plugins"][0]["type"], "cilium-cni");
    assert_eq!(
        v["plugins"][0]["log-file"],
        "/var/run/cilium/cilium-cni.log"
    );
    assert_eq!(ours_count(&v), 1);
    let mode = fs::metadata(i.conf_dir.join("05-cilium.conflist"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(i.pass().unwrap(), Pass::Intact("05-cilium.conflist".into()));
}

#[test]
fn rewrites_by_another_component_are_undone() {
    let dir = tempfile::tempdir().unwrap();
    let i = installer(&dir);
    write(&i, "10-calico.conflist", CALICO, 0o644);
    i.pass().unwrap();
    // Calico's install container rewrites its file at startup.
    write(&i, "10-calico.conflist", CALICO, 0o644);
    assert_eq!(
        i.pass().unwrap(),
        Pass::Inserted("10-calico.conflist".into())
    );
    assert_eq!(ours_count(&read(&i, "10-calico.conflist")), 1);
    // A Cilium agent writes its .conf again next to our wrapped .conflist: it sorts first.
    write(&i, "05-cilium.conf", CILIUM, 0o644);
    assert_eq!(
        i.pass().unwrap(),
        Pass::Inserted("05-cilium.conflist".into())
    );
    // A new, higher-priority file appears.
    write(&i, "01-new.conflist", BRIDGE, 0o644);
    assert_eq!(i.pass().unwrap(), Pass::Inserted("01-new.conflist".into()));
}

#[test]
fn waits_for_a_primary_config() {
    let dir = tempfile::tempdir().unwrap();
    let i = installer(&dir);
    assert_eq!(i.pass().unwrap(), Pass::NoPrimary);
    write(&i, "00-broken.conflist", "{", 0o644);
    assert_eq!(i.pass().unwrap(), Pass::NoPrimary);
    write(&i, "87-podman-bridge.conflist", BRIDGE, 0o644);
    assert_eq!(
        i.pass().unwrap(),
        Pass::Inserted("87-podman-bridge.conflist".into())
    );
}

#[test]
fn binary_is_installed_atomically_and_uninstall_removes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let i = installer(&dir);
    write(&i, "10-calico.conflist", CALICO, 0o644);
    write(&i, "87-podman-bridge.conflist", BRIDGE, 0o644);
    i.install_binary().unwrap();
    i.pass().unwrap();
    let bin = i.bin_dir.join(PLUGIN_TYPE);
    assert_eq!(fs::read(&bin).unwrap(), b"#!plugin v1");
    assert_eq!(
        fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // An upgrade: a new binary replaces the old one; the config entry stays.
    fs::write(&i.binary, b"#!plugin v2").unwrap();
    i.install_binary().unwrap();
    assert_eq!(fs::read(&bin).unwrap(), b"#!plugin v2");
    assert_eq!(i.pass().unwrap(), Pass::Intact("10-calico.conflist".into()));
    // No temp files left behind.
    let leftovers: Vec<_> = fs::read_dir(&i.bin_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());
    // Uninstall.
    i.uninstall().unwrap();
    assert!(!bin.exists());
    let v = read(&i, "10-calico.conflist");
    assert_eq!(ours_count(&v), 0);
    assert_eq!(v, serde_json::from_str::<Value>(CALICO).unwrap());
    i.uninstall().unwrap();
}
