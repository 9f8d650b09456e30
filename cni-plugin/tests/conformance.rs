//! CNI spec conformance of the plugin: every command at every supported version, result
//! conversion, error codes, and hostile input. The agent is a scripted double; a few cases
//! run the real binary to cover the process boundary (environment, stdin, exit status).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cni_plugin::agent::{Agent, AgentError, Reply};
use cni_plugin::spec::{SUPPORTED, code};
use cni_plugin::{Output, run};
use serde_json::{Value, json};

/// Answers every call with a fixed reply (or failure) and records the calls.
struct Scripted {
    reply: Result<Reply, fn() -> AgentError>,
    calls: RefCell<Vec<(String, Value)>>,
}

impl Scripted {
    fn ok(body: Value) -> Self {
        Self {
            reply: Ok(Reply { status: 200, body }),
            calls: RefCell::default(),
        }
    }
    fn status(status: u16, body: Value) -> Self {
        Self {
            reply: Ok(Reply { status, body }),
            calls: RefCell::default(),
        }
    }
    fn down() -> Self {
        Self {
            reply: Err(|| AgentError::NotRunning {
                socket: "/var/run/istio-cni/pluginevent.sock".into(),
                why: "No such file or directory".into(),
            }),
            calls: RefCell::default(),
        }
    }
}

impl Agent for Scripted {
    fn call(
        &self,
        _s: &Path,
        _m: &str,
        path: &str,
        body: Option<&mesh_contract::cni_event::Event>,
        _t: Duration,
    ) -> Result<Reply, AgentError> {
        self.calls
            .borrow_mut()
            .push((path.to_string(), serde_json::to_value(body).unwrap()));
        match &self.reply {
            Ok(r) => Ok(r.clone()),
            Err(f) => Err(f()),
        }
    }
}

fn env(command: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/run/netns/test"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn prev(version: &str) -> Value {
    let mut ip = json!({"address": "198.18.1.10/24", "gateway": "198.18.1.1", "interface": 0});
    if version.starts_with("0.") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/test"}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(version: &str, with_prev: bool) -> Vec<u8> {
    let mut c = json!({"cniVersion": version, "name": "podnet", "type": "ambient-cni"});
    if with_prev {
        c["prevResult"] = prev(version);
    }
    c.to_string().into_bytes()
}

fn error_code(out: &Output) -> u64 {
    assert_ne!(out.exit, 0, "expected failure, got {}", out.stdout);
    let v: Value = serde_json::from_str(&out.stdout).expect("error is JSON");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v.get("details").is_some());
    assert!(v["cniVersion"].is_string());
    v["code"].as_u64().expect("code")
}

#[test]
fn every_command_at_every_version() {
    for version in SUPPORTED {
        let enrolled = Scripted::ok(json!({"enrolled": true}));
        // ADD prints the previous result back in the config's version.
        let out = run(&env("ADD"), &config(version, true), &enrolled);
        assert_eq!(out.exit, 0, "{version}: {}", out.stdout);
        let result: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(result, prev(version), "{version}");
        let (path, body) = enrolled.calls.borrow()[0].clone();
        assert_eq!(path, "/cmdadd");
        assert_eq!(body["PodName"], "web-0");
        assert_eq!(body["PodNamespace"], "shop");
        assert_eq!(body["Netns"], "/run/netns/test");
        assert_eq!(body["IPs"][0]["Address"]["IP"], "198.18.1.10");
        assert_eq!(body["IPs"][0]["Address"]["Mask"], "////AA==");

        // DEL: no output, success, with or without prevResult.
        for with_prev in [true, false] {
            let out = run(&env("DEL"), &config(version, with_prev), &enrolled);
            assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{version}");
        }
        // CHECK from 0.4.0; before that it is not part of the spec.
        let out = run(&env("CHECK"), &config(version, true), &enrolled);
        if version.starts_with("0.3.") {
            assert_eq!(
                error_code(&out),
                u64::from(code::INCOMPATIBLE_VERSION),
                "{version}"
            );
        } else {
            assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{version}");
        }
        // STATUS and GC only at 1.1.0.
        for cmd in ["STATUS", "GC"] {
            let out = run(
                &env(cmd),
                &config(version, false),
                &Scripted::ok(Value::Null),
            );
            if version == "1.1.0" {
                assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{cmd}");
            } else {
                assert_eq!(
                    error_code(&out),
                    u64::from(code::INCOMPATIBLE_VERSION),
                    "{cmd} {version}"
                );
            }
        }
        // VERSION answers in the requested version with the full list.
        let out = run(&env("VERSION"), &config(version, false), &enrolled);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], version);
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
    }
}

#[test]
fn prev_result_is_converted_to_the_config_version() {
    for from in SUPPORTED {
        for to in SUPPORTED {
            let mut c: Value = serde_json::from_slice(&config(to, false)).unwrap();
            c["prevResult"] = prev(from);
            let out = run(
                &env("ADD"),
                c.to_string().as_bytes(),
                &Scripted::ok(json!({"enrolled": true})),
            );
            assert_eq!(out.exit, 0, "{from}->{to}: {}", out.stdout);
            let result: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(result, prev(to), "{from}->{to}");
        }
    }
}

#[test]
fn failures_map_to_spec_codes() {
    let ok = || Scripted::ok(json!({"enrolled": true}));
    let mut no_env = env("ADD");
    no_env.remove("CNI_NETNS");
    let mut no_container = env("ADD");
    no_container.remove("CNI_CONTAINERID");
    let mut bad_args = env("ADD");
    bad_args.insert("CNI_ARGS".into(), "K8S_POD_NAME".into());
    let mut no_name = env("ADD");
    no_name.insert("CNI_ARGS".into(), "K8S_POD_NAMESPACE=shop".into());
    let mut bad_cmd = env("ADD");
    bad_cmd.insert("CNI_COMMAND".into(), "EXPLODE".into());
    let mut no_cmd = env("ADD");
    no_cmd.remove("CNI_COMMAND");
    let mut hostile_id = env("ADD");
    hostile_id.insert("CNI_CONTAINERID".into(), "../../etc".into());
    let huge = vec![b' '; cni_plugin::MAX_STDIN + 1];
    type Case<'a> = (&'a str, BTreeMap<String, String>, Vec<u8>, u32);
    let cases: Vec<Case> = vec![
        (
            "not json",
            env("ADD"),
            b"{not json".to_vec(),
            code::DECODE_FAILURE,
        ),
        (
            "json but not an object",
            env("ADD"),
            b"[1,2]".to_vec(),
            code::DECODE_FAILURE,
        ),
        ("empty stdin", env("ADD"), Vec::new(), code::DECODE_FAILURE),
        ("huge stdin", env("ADD"), huge, code::INVALID_CONFIG),
        (
            "unknown version",
            env("ADD"),
            br#"{"cniVersion":"9.9.9","type":"ambient-cni"}"#.to_vec(),
            code::INCOMPATIBLE_VERSION,
        ),
        (
            "no version",
            env("ADD"),
            br#"{"type":"ambient-cni"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "version not a string",
            env("ADD"),
            br#"{"cniVersion":1,"type":"ambient-cni"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "no type",
            env("ADD"),
            br#"{"cniVersion":"1.0.0"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "enabled not bool",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","ambient_enabled":"yes"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "exclude not a list",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","exclude_namespaces":"a"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "bad log level",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","plugin_log_level":"loud"}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "bad timeout",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","agent_timeout_seconds":-3}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "prevResult not an object",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","prevResult":[]}"#.to_vec(),
            code::INVALID_CONFIG,
        ),
        (
            "no prevResult on ADD",
            env("ADD"),
            config("1.0.0", false),
            code::INVALID_CONFIG,
        ),
        (
            "bad prevResult ip",
            env("ADD"),
            br#"{"cniVersion":"1.0.0","type":"t","prevResult":{"ips":[{"address":"nope/24"}]}}"#
                .to_vec(),
            code::DECODE_FAILURE,
        ),
        (
            "no CNI_NETNS",
            no_env,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "no CNI_CONTAINERID",
            no_container,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "bad CNI_ARGS",
            bad_args,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "no pod name",
            no_name,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "unknown command",
            bad_cmd,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "no command",
            no_cmd,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
        (
            "hostile container id",
            hostile_id,
            config("1.0.0", true),
            code::INVALID_ENV,
        ),
    ];
    for (name, e, stdin, want) in cases {
        let out = run(&e, &stdin, &ok());
        assert_eq!(error_code(&out), u64::from(want), "{name}: {}", out.stdout);
    }
}

#[test]
fn the_agent_decides_and_its_absence_fails_closed_with_the_fix() {
    // Agent down: ADD fails, retryable, naming the cause and the fix.
    let out = run(&env("ADD"), &config("1.0.0", true), &Scripted::down());
    assert_eq!(error_code(&out), u64::from(code::TRY_AGAIN_LATER));
    assert!(
        out.stdout.contains("node agent is not running"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("ambient_enabled"), "{}", out.stdout);
    // Agent not ready (e.g. no ztunnel): its reason is passed on.
    let busy = Scripted::status(
        503,
        json!({"error": "no ztunnel is connected to the node agent"}),
    );
    let out = run(&env("ADD"), &config("1.0.0", true), &busy);
    assert_eq!(error_code(&out), u64::from(code::TRY_AGAIN_LATER));
    assert!(
        out.stdout.contains("no ztunnel is connected"),
        "{}",
        out.stdout
    );
    // Not meant for the mesh: success, prevResult back.
    let skip = Scripted::ok(json!({"enrolled": false, "reason": "namespace not in ambient mode"}));
    assert_eq!(run(&env("ADD"), &config("1.0.0", true), &skip).exit, 0);
    // DEL and CHECK with the agent down: DEL still succeeds, CHECK says try later.
    assert_eq!(
        run(&env("DEL"), &config("1.0.0", false), &Scripted::down()).exit,
        0
    );
    let out = run(&env("CHECK"), &config("1.0.0", true), &Scripted::down());
    assert_eq!(error_code(&out), u64::from(code::TRY_AGAIN_LATER));
    // CHECK reports missing redirection.
    let missing = Scripted::status(409, json!({"reason": "nftables table missing"}));
    let out = run(&env("CHECK"), &config("1.0.0", true), &missing);
    assert_eq!(error_code(&out), u64::from(code::REDIRECTION_MISSING));
    // STATUS reflects the agent.
    let out = run(&env("STATUS"), &config("1.1.0", false), &Scripted::down());
    assert_eq!(error_code(&out), u64::from(code::NOT_AVAILABLE));
    let out = run(
        &env("STATUS"),
        &config("1.1.0", false),
        &Scripted::status(503, json!("not ready: waiting for a ztunnel")),
    );
    assert_eq!(error_code(&out), u64::from(code::NOT_AVAILABLE));
}

#[test]
fn switches_and_excluded_namespaces_pass_pods_through_without_the_agent() {
    let agent = Scripted::down();
    let mut c: Value = serde_json::from_slice(&config("1.0.0", true)).unwrap();
    c["ambient_enabled"] = json!(false);
    assert_eq!(run(&env("ADD"), c.to_string().as_bytes(), &agent).exit, 0);
    let mut c: Value = serde_json::from_slice(&config("1.0.0", true)).unwrap();
    c["exclude_namespaces"] = json!(["shop"]);
    assert_eq!(run(&env("ADD"), c.to_string().as_bytes(), &agent).exit, 0);
    // kube-system is excluded by default.
    let mut e = env("ADD");
    e.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns".into(),
    );
    assert_eq!(run(&e, &config("1.0.0", true), &agent).exit, 0);
    assert!(agent.calls.borrow().is_empty());
}

fn exec(envs: &[(&str, &str)], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambient-cni"))
        .env_clear()
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_binary_behaves_at_its_boundary() {
    let (code_, out) = exec(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(code_, 0);
    assert!(out.contains("\"supportedVersions\""));
    // Garbage, empty and huge stdin, no environment at all: spec errors, never a crash.
    let huge = vec![b'{'; cni_plugin::MAX_STDIN * 2];
    for (envs, stdin) in [
        (vec![("CNI_COMMAND", "ADD")], b"\xff\xfe garbage".to_vec()),
        (vec![], b"{}".to_vec()),
        (vec![("CNI_COMMAND", "ADD")], huge),
    ] {
        let (status, out) = exec(&envs, &stdin);
        assert_eq!(status, 1, "{out}");
        let v: Value = serde_json::from_str(&out).expect("JSON error");
        assert!(v["code"].as_u64().is_some(), "{v}");
    }
    // A real ADD with no agent on the socket fails closed.
    let dir = tempfile::tempdir().unwrap();
    let mut c: Value = serde_json::from_slice(&config("1.0.0", true)).unwrap();
    c["cni_agent_run_dir"] = json!(dir.path());
    let e = env("ADD");
    let envs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, out) = exec(&envs, c.to_string().as_bytes());
    assert_eq!(status, 1);
    assert!(
        out.contains("\"code\":11") && out.contains("not running"),
        "{out}"
    );
}

#[test]
fn gc_sends_the_valid_attachments_and_refuses_malformed_ones() {
    let with = |attachments: Value| {
        let mut c = json!({"cniVersion": "1.1.0", "name": "podnet", "type": "ambient-cni"});
        c["cni.dev/valid-attachments"] = attachments;
        c.to_string().into_bytes()
    };
    let agent = Scripted::ok(json!({"removed": 1}));
    let out = run(
        &env("GC"),
        &with(
            json!([{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]),
        ),
        &agent,
    );
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""));
    let (path, body) = agent.calls.borrow()[0].clone();
    assert_eq!(path, "/cmdgc");
    assert_eq!(body, json!({"ValidContainerIDs": ["c1", "c2"]}));

    // An empty list is a real answer (nothing is attached), not "no list".
    let agent = Scripted::ok(json!({"removed": 0}));
    let out = run(&env("GC"), &with(json!([])), &agent);
    assert_eq!(out.exit, 0, "{}", out.stdout);
    assert_eq!(agent.calls.borrow()[0].1, json!({"ValidContainerIDs": []}));

    for bad in [
        json!("c1"),
        json!([{"ifname": "eth0"}]),
        json!([{"containerID": ""}]),
        json!([7]),
    ] {
        let agent = Scripted::ok(Value::Null);
        let out = run(&env("GC"), &with(bad.clone()), &agent);
        assert_eq!(error_code(&out), u64::from(code::INVALID_CONFIG), "{bad}");
        assert!(agent.calls.borrow().is_empty(), "{bad}: sent anyway");
    }

    // The agent down: GC says so (try again later), it does not pretend to have collected.
    let out = run(&env("GC"), &with(json!([])), &Scripted::down());
    assert_eq!(error_code(&out), u64::from(code::TRY_AGAIN_LATER));
}
