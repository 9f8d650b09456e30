//! Talking to the node agent: HTTP/1.1 over its Unix socket, with blocking std I/O (the
//! plugin is a short-lived process; an async runtime would only slow its start).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_contract::cni_event::{Answer, Event};
use serde_json::Value;

/// Why the agent could not be asked.
#[derive(Debug)]
pub enum AgentError {
    /// Nothing listens on the socket.
    NotRunning {
        socket: PathBuf,
        why: String,
    },
    /// It did not answer in time.
    Timeout {
        socket: PathBuf,
        after: Duration,
    },
    /// It answered something that is not HTTP.
    Garbled(String),
    Io(std::io::Error),
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    /// As sent: JSON (an [`Answer`] from our agent), or the text of a body that is not JSON.
    pub body: Value,
}

impl Reply {
    /// The body as an [`Answer`]; empty if it is not one (an older or foreign agent).
    pub fn answer(&self) -> Answer {
        serde_json::from_value(self.body.clone()).unwrap_or_default()
    }
}

/// Something that can carry a request to the agent (a socket, or a test double).
pub trait Agent {
    fn call(
        &self,
        socket: &Path,
        method: &str,
        path: &str,
        body: Option<&Event>,
        timeout: Duration,
    ) -> Result<Reply, AgentError>;
}

/// The real transport.
#[derive(Debug, Default)]
pub struct UnixAgent;

impl Agent for UnixAgent {
    fn call(
        &self,
        socket: &Path,
        method: &str,
        path: &str,
        body: Option<&Event>,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        let mut stream = UnixStream::connect(socket).map_err(|e| AgentError::NotRunning {
            socket: socket.to_path_buf(),
            why: e.to_string(),
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let payload = body
            .map(|b| serde_json::to_string(b).expect("events serialize"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: node-agent\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            payload.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(AgentError::Io)?;
        let mut raw = Vec::new();
        match stream.take(1 << 20).read_to_end(&mut raw) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AgentError::Timeout {
                    socket: socket.to_path_buf(),
                    after: timeout,
                });
            }
            Err(e) => return Err(AgentError::Io(e)),
        }
        parse_response(&raw)
    }
}

fn parse_response(raw: &[u8]) -> Result<Reply, AgentError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| AgentError::Garbled("no end of headers".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| AgentError::Garbled(format!("bad status line {:?}", head.lines().next())))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    Ok(Reply { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"enrolled\":true}")
            .unwrap();
        assert_eq!((r.status, r.body["enrolled"].as_bool()), (200, Some(true)));
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, Some("hello")));
        assert!(matches!(
            parse_response(b"garbage"),
            Err(AgentError::Garbled(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 abc\r\n\r\n"),
            Err(AgentError::Garbled(_))
        ));
    }
}
