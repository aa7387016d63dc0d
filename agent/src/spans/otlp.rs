//! OTLP trace intake: HTTP/protobuf (`POST /v1/traces`) and gRPC (`TraceService/Export`), on
//! their own listeners, never the metrics port. Requests are size-limited before and after
//! decompression, decoded, and handed to the processing queue without waiting: a full queue
//! answers "retry later" (HTTP 503, gRPC UNAVAILABLE) and is counted, a malformed request gets
//! HTTP 400 or gRPC INVALID_ARGUMENT with the decoder's reason.
//!
//! gRPC is served by hand on axum's HTTP/2 (one unary method needs no framework): the 5-byte
//! message framing, and grpc-status in the trailers, or in the headers for errors.
use std::{
    io::Read as _,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::sync::mpsc;

use super::SpanMetrics;

/// What the receivers share.
#[derive(Clone)]
pub struct Intake {
    pub queue: mpsc::Sender<ExportTraceServiceRequest>,
    pub max_bytes: usize,
    pub metrics: SpanMetrics,
}

#[derive(Debug)]
enum Reject {
    /// The payload is not what OTLP says (reason for the client).
    Invalid(String),
    /// The intake queue is full: the client should retry.
    Busy,
}

impl Intake {
    /// Decodes (after gunzip when `gzip`) and queues one request.
    fn take(&self, body: &[u8], gzip: bool) -> Result<(), Reject> {
        let raw;
        let bytes = if gzip {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .take(self.max_bytes as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Reject::Invalid(format!("bad gzip body: {e}")))?;
            if out.len() > self.max_bytes {
                return Err(Reject::Invalid(format!(
                    "request larger than {} bytes once decompressed",
                    self.max_bytes
                )));
            }
            raw = out;
            &raw[..]
        } else {
            body
        };
        let req = ExportTraceServiceRequest::decode(bytes)
            .map_err(|e| Reject::Invalid(format!("not an OTLP ExportTraceServiceRequest: {e}")))?;
        self.queue.try_send(req).map_err(|e| {
            // The counter counts spans, as the forwarding drops do: a refused request of 500
            // spans is 500 spans the pipeline's traces lack unless the exporter retries.
            let spans = match &e {
                tokio::sync::mpsc::error::TrySendError::Full(r)
                | tokio::sync::mpsc::error::TrySendError::Closed(r) => super::span_count(r),
            };
            self.metrics.dropped_n("intake_queue_full", spans);
            Reject::Busy
        })
    }

    /// For `crate::fuzzing`: an intake of its own, drained after each body.
    #[doc(hidden)]
    pub fn fuzz_take(body: &[u8], gzip: bool) {
        use std::sync::{Mutex, OnceLock};
        static INTAKE: OnceLock<(Intake, Mutex<mpsc::Receiver<ExportTraceServiceRequest>>)> =
            OnceLock::new();
        let (intake, rx) = INTAKE.get_or_init(|| {
            let (queue, rx) = mpsc::channel(1);
            let mut registry = prometheus_client::registry::Registry::default();
            let intake = Intake {
                queue,
                max_bytes: 1 << 20,
                metrics: super::SpanMetrics::new(&mut registry),
            };
            (intake, Mutex::new(rx))
        });
        let taken = intake.take(body, gzip).is_ok();
        let drained = rx.lock().map(|mut r| r.try_recv().is_ok()).unwrap_or(false);
        assert_eq!(
            taken, drained,
            "a taken request must be queued, a refused one not"
        );
    }

    fn rejected(&self, kind: &'static str) {
        self.metrics.rejected(kind);
    }
}

fn gzip(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
}

fn too_large(max: usize) -> String {
    format!("request larger than otlp.max_request_bytes ({max} bytes)")
}

async fn http_export(
    State(intake): State<Intake>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        intake.rejected("http");
        return (StatusCode::BAD_REQUEST, too_large(intake.max_bytes) + "\n").into_response();
    };
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.starts_with("application/x-protobuf") {
        intake.rejected("http");
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {ctype:?}: this receiver takes OTLP/HTTP protobuf (application/x-protobuf)\n"),
        )
            .into_response();
    }
    match intake.take(&body, gzip(&headers, "content-encoding")) {
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportTraceServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Err(Reject::Invalid(why)) => {
            intake.rejected("http");
            (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
        }
        Err(Reject::Busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "span intake queue full, retry later\n",
        )
            .into_response(),
    }
}

/// gRPC status codes used here.
const GRPC_OK: &str = "0";
const GRPC_INVALID_ARGUMENT: &str = "3";
const GRPC_UNAVAILABLE: &str = "14";

/// A trailers-only gRPC answer: the status in the headers, no message.
fn grpc_error(code: &'static str, message: &str) -> Response {
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static(code));
    // grpc-message is percent-encoded; keep it to printable ASCII.
    let msg: String = message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&msg.replace('%', "%25")) {
        h.insert("grpc-message", v);
    }
    r
}

/// One gRPC message, then the OK trailers.
struct GrpcOk {
    data: Option<Bytes>,
    trailers_sent: bool,
}

impl http_body::Body for GrpcOk {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        if self.trailers_sent {
            return Poll::Ready(None);
        }
        self.trailers_sent = true;
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static(GRPC_OK));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(t))))
    }
}

async fn grpc_export(
    State(intake): State<Intake>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(body) = body else {
        intake.rejected("grpc");
        return grpc_error(GRPC_INVALID_ARGUMENT, &too_large(intake.max_bytes));
    };
    if body.len() < 5 {
        intake.rejected("grpc");
        return grpc_error(
            GRPC_INVALID_ARGUMENT,
            "gRPC message shorter than its 5-byte prefix",
        );
    }
    let compressed = body[0] == 1;
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > intake.max_bytes {
        intake.rejected("grpc");
        return grpc_error(GRPC_INVALID_ARGUMENT, &too_large(intake.max_bytes));
    }
    if body.len() != 5 + len {
        intake.rejected("grpc");
        return grpc_error(
            GRPC_INVALID_ARGUMENT,
            "gRPC frame length does not match the body",
        );
    }
    if compressed && !gzip(&headers, "grpc-encoding") {
        intake.rejected("grpc");
        return grpc_error(
            GRPC_INVALID_ARGUMENT,
            "compressed message without grpc-encoding gzip",
        );
    }
    match intake.take(&body[5..], compressed) {
        Ok(()) => {
            let msg = ExportTraceServiceResponse::default().encode_to_vec();
            let mut framed = Vec::with_capacity(5 + msg.len());
            framed.push(0);
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            let mut r = Response::new(Body::new(GrpcOk {
                data: Some(framed.into()),
                trailers_sent: false,
            }));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r
        }
        Err(Reject::Invalid(why)) => {
            intake.rejected("grpc");
            grpc_error(GRPC_INVALID_ARGUMENT, &why)
        }
        Err(Reject::Busy) => grpc_error(GRPC_UNAVAILABLE, "span intake queue full, retry later"),
    }
}

/// The OTLP/HTTP router.
pub fn http_router(intake: Intake) -> Router {
    let limit = intake.max_bytes;
    Router::new()
        .route("/v1/traces", post(http_export))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(intake)
}

/// The OTLP/gRPC router (HTTP/2 only, as gRPC is).
pub fn grpc_router(intake: Intake) -> Router {
    // The body limit counts the 5-byte prefix.
    let limit = intake.max_bytes + 5;
    Router::new()
        .route(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            post(grpc_export),
        )
        .layer(DefaultBodyLimit::max(limit))
        .with_state(intake)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value::Value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    fn new_intake(max_bytes: usize) -> (Intake, mpsc::Receiver<ExportTraceServiceRequest>) {
        let (tx, rx) = mpsc::channel(4);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = SpanMetrics::new(&mut registry);
        (
            Intake {
                queue: tx,
                max_bytes,
                metrics,
            },
            rx,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Any body, plain or claimed gzip, is taken or refused as invalid: never a panic, never
        /// more than max_bytes decompressed.
        #[test]
        fn any_otlp_body_is_taken_or_refused(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            gz in proptest::prelude::any::<bool>(),
        ) {
            let (intake, mut rx) = new_intake(1024);
            match intake.take(&body, gz) {
                Ok(()) => proptest::prop_assert!(rx.try_recv().is_ok()),
                Err(Reject::Invalid(_)) | Err(Reject::Busy) => {}
            }
        }
    }

    #[test]
    fn a_gzip_bomb_stops_at_max_bytes() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        let (intake, _rx) = new_intake(1 << 20);
        assert!(bomb.len() < 200_000, "{} bytes compressed", bomb.len());
        match intake.take(&bomb, true) {
            Err(Reject::Invalid(why)) => assert!(why.contains("once decompressed"), "{why}"),
            other => panic!("a 64 MiB bomb was not refused: {other:?}"),
        }
    }

    #[test]
    fn a_span_with_10k_attributes_is_taken() {
        let attributes: Vec<KeyValue> = (0..10_000)
            .map(|i| KeyValue {
                key: format!("k{i}"),
                value: Some(AnyValue {
                    value: Some(Value::StringValue("v".repeat(8))),
                }),
                ..KeyValue::default()
            })
            .collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource::default()),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        name: "wide".into(),
                        attributes,
                        ..Span::default()
                    }],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let body = req.encode_to_vec();
        let (intake, mut rx) = new_intake(4 << 20);
        assert!(intake.take(&body, false).is_ok());
        assert_eq!(
            rx.try_recv().unwrap().resource_spans[0].scope_spans[0].spans[0]
                .attributes
                .len(),
            10_000
        );
    }
}
