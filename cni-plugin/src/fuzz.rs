//! The fuzz entry point over one whole plugin run (`fuzz/` target `cni_invocation`).

use crate::agent::{Agent, AgentError};
use crate::*;

/// Fuzz entry point (`fuzz/`, replayed by `tests/tests/fuzz_corpora.rs`): bytes as one
/// invocation. The environment as `KEY=VALUE` lines, a NUL, stdin, a NUL, then the agent's
/// answer: one byte choosing a transport failure or a status, then its body.
///
/// Whatever the input: the exit is 0 or 1, a failure prints a CNI error object, and an ADD the
/// agent was asked about succeeds only when the agent answered 200 (no bypass).
pub fn fuzz_invocation(data: &[u8]) {
    use std::cell::Cell;

    struct Scripted<'a> {
        answer: &'a [u8],
        add_status: Cell<Option<u16>>,
    }
    impl Agent for Scripted<'_> {
        fn call(
            &self,
            socket: &std::path::Path,
            _method: &str,
            path: &str,
            _body: Option<&Event>,
            timeout: Duration,
        ) -> Result<agent::Reply, AgentError> {
            let (&pick, body) = self.answer.split_first().unwrap_or((&0, &[]));
            let status = match pick % 8 {
                0 => {
                    return Err(AgentError::NotRunning {
                        socket: socket.to_path_buf(),
                        why: "fuzz".into(),
                    });
                }
                1 => {
                    return Err(AgentError::Timeout {
                        socket: socket.to_path_buf(),
                        after: timeout,
                    });
                }
                2 => return Err(AgentError::Garbled("fuzz".into())),
                3 => 400,
                4 => 409,
                5 => 500,
                6 => 503,
                _ => 200,
            };
            if path == path::ADD {
                self.add_status.set(Some(status));
            }
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            Ok(agent::Reply { status, body })
        }
    }

    let mut parts = data.splitn(3, |b| *b == 0);
    let env_text = parts.next().unwrap_or_default();
    let stdin = parts.next().unwrap_or_default();
    let agent = Scripted {
        answer: parts.next().unwrap_or_default(),
        add_status: Cell::new(None),
    };
    let env: BTreeMap<String, String> = String::from_utf8_lossy(env_text)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let out = run(&env, stdin, &agent);
    match out.exit {
        0 => {
            if env.get("CNI_COMMAND").map(String::as_str) == Some("ADD")
                && let Some(status) = agent.add_status.get()
            {
                assert_eq!(
                    status, 200,
                    "ADD succeeded although the agent said {status}"
                );
            }
        }
        1 => {
            let error: Value = serde_json::from_str(&out.stdout).expect("a CNI error object");
            assert!(
                error["code"].is_u64() && error["msg"].is_string(),
                "{error}"
            );
        }
        other => panic!("exit status {other}"),
    }
}
