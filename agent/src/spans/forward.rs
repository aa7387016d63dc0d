//! Forwards enriched spans to the configured OTLP/HTTP backend (a Collector, Tempo, Jaeger),
//! from a bounded queue the intake never waits on. Plain `http://` only: on a node, the next
//! hop is a local or in-cluster collector.
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};

use super::SpanMetrics;

/// `http://HOST:PORT[/PATH]` split into the address and the path (default `/v1/traces`).
pub fn parse_endpoint(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/v1/traces"),
    };
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    let path = if path == "/" { "/v1/traces" } else { path };
    Some((host, path.to_owned()))
}

async fn post(addr: &str, path: &str, body: &[u8]) -> Result<u16, String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let exchange = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let status = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
        .map_err(|e| e.to_string())?;
    status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status:?}"))
}

/// Sends queued requests one by one; a failed send drops its spans (counted), it is not retried:
/// the backend's outage must not grow the agent's memory.
pub async fn run(
    mut queue: mpsc::Receiver<ExportTraceServiceRequest>,
    addr: String,
    path: String,
    metrics: SpanMetrics,
) {
    let mut logged = false;
    while let Some(req) = queue.recv().await {
        let n = super::span_count(&req);
        match post(&addr, &path, &req.encode_to_vec()).await {
            Ok(code) if (200..300).contains(&code) => {
                metrics.forwarded.inc_by(n);
                logged = false;
            }
            Ok(code) => {
                metrics.dropped_n("backend_error", n);
                if !logged {
                    tracing::warn!(%addr, code, "the span backend refused spans; dropping them");
                    logged = true;
                }
            }
            Err(e) => {
                metrics.dropped_n("backend_unreachable", n);
                if !logged {
                    tracing::warn!(%addr, "cannot reach the span backend: {e}; dropping spans until it answers");
                    logged = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("http://collector:4318"),
            Some(("collector:4318".into(), "/v1/traces".into()))
        );
        assert_eq!(
            parse_endpoint("http://10.0.0.1:4318/custom/traces"),
            Some(("10.0.0.1:4318".into(), "/custom/traces".into()))
        );
        assert_eq!(
            parse_endpoint("http://tempo"),
            Some(("tempo:80".into(), "/v1/traces".into()))
        );
        assert_eq!(parse_endpoint("https://x:4318"), None);
    }
}
