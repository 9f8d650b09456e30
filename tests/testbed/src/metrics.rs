//! Reading a Prometheus endpoint the way a scraper would: the text is parsed by the
//! Prometheus project's own Python client (its strict OpenMetrics parser), not by code of
//! ours, so a malformed exposition fails the test that scrapes it.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::lab::Ns;

/// One sample: metric name (with `_total` etc.), labels, value.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// Parses OpenMetrics `text`; panics with the parser's complaint if it is not valid.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (installed by ./x)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding the parser");
    let out = child.wait_with_output().expect("parser");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the Prometheus parser is missing; `./x test` installs prometheus-client: {stderr}"
    );
    assert!(
        out.status.success(),
        "not valid OpenMetrics text: {stderr}\n--- text ---\n{text}"
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// GETs `/metrics` at `addr` inside `ns` and parses it.
pub fn scrape(ns: &Ns, addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = ns.http_get(addr, "/metrics").expect("scraping metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}
