//! The read-only HTTP endpoint: `/metrics` (OpenMetrics or classic text by the Accept header),
//! `/healthz` and `/readyz`. Nothing here changes the agent; control lives on a Unix socket.
use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn scrape(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    let openmetrics = wants_openmetrics(&headers);
    // Collectors read BPF maps with syscalls: keep them off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode(openmetrics)).await {
        Ok(body) => {
            let ctype = HeaderValue::from_static(if openmetrics { OPENMETRICS } else { CLASSIC });
            ([(header::CONTENT_TYPE, ctype)], body).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> Response {
    if metrics.is_ready() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let mut h = HeaderMap::new();
        assert!(!wants_openmetrics(&h));
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
                .parse()
                .unwrap(),
        );
        assert!(wants_openmetrics(&h));
    }
}
