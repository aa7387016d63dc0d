//! Spans of the synthetic pipeline's stages, exported with the OpenTelemetry SDK over
//! OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (as a real service would be configured),
//! to the node's pipeprobe agent in the demo.
use opentelemetry::{
    KeyValue,
    trace::{Span as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracer, SdkTracerProvider},
};

pub struct Spans {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Spans {
    /// The stage's tracer, if the environment asks for spans.
    pub fn from_env(service: &str) -> Option<Self> {
        std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT")?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| eprintln!("{service}: no span exporter: {e}"))
            .ok()?;
        // What the SDKs' process detector sets: how pipeprobe ties spans to processes.
        let resource = Resource::builder()
            .with_service_name(service.to_owned())
            .with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("pipeprobe-synthetic-pipeline");
        Some(Self { provider, tracer })
    }

    /// Runs `f` inside a span named `name` on this thread.
    pub fn span<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let mut span = self.tracer.start(name);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        span.set_attribute(KeyValue::new("thread.id", i64::from(tid)));
        let out = f();
        span.end();
        out
    }
}

impl Drop for Spans {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}
