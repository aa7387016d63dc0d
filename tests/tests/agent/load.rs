//! Intake pressure: 50 scrapers at once and an OTLP flood, while a target keeps making
//! syscalls. Scrapes are all answered, the flood is taken or refused with 503 and every refused
//! span is counted, and the probes keep counting throughout.
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use pipeprobe_tests::{Agent, Proc, config_file, find};
use prost::Message as _;

/// An OTLP/HTTP POST of `spans` spans (each with a few attributes, as an SDK sends them).
fn otlp_post(spans: usize) -> Vec<u8> {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    let attr = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..KeyValue::default()
    };
    let body = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![attr("service.name", "flood")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: (0..spans)
                    .map(|i| Span {
                        name: format!("op{}", i % 7),
                        trace_id: vec![7; 16],
                        span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                        start_time_unix_nano: 1_000_000_000,
                        end_time_unix_nano: 1_000_000_000 + 1_000_000 * (i as u64 % 50),
                        attributes: vec![attr("http.route", "/v1/tts"), attr("gen_ai.system", "x")],
                        ..Span::default()
                    })
                    .collect(),
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
    .encode_to_vec();
    let mut post = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    post.extend_from_slice(&body);
    post
}

/// `clients` threads posting `post` to `otlp` as fast as they can for 3 s; their status codes.
fn flood<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    clients: usize,
    otlp: &'s str,
    post: &'s [u8],
) -> Vec<std::thread::ScopedJoinHandle<'s, Vec<u16>>> {
    (0..clients)
        .map(|_| {
            s.spawn(move || {
                let end = Instant::now() + Duration::from_secs(3);
                let mut codes = Vec::new();
                while Instant::now() < end {
                    codes.push(status_of(otlp, post));
                }
                codes
            })
        })
        .collect()
}

/// One request on a fresh connection: the status code.
fn status_of(addr: &str, request: &[u8]) -> u16 {
    pipeprobe_tests::http(addr, request).0
}

#[test]
fn fifty_scrapers_and_an_otlp_flood_do_not_stop_the_probes() {
    let cfg = config_file(
        "[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[gpu]\nenabled = false\n\
         [targets.work]\ncomm = \"^workload$\"\n",
    );
    let agent = Agent::start(&["--config", cfg.path().to_str().unwrap()]);
    let _work = Proc::workload(&["nanosleep", "--ms", "1", "--count", "100000"]);
    let sleeps = |s: &[pipeprobe_tests::Sample]| {
        s.iter()
            .filter(|x| {
                x.name == "pipeprobe_syscall_duration_seconds_count"
                    && x.labels.get("syscall").map(String::as_str) == Some("clock_nanosleep")
            })
            .map(|x| x.value)
            .sum::<f64>()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = sleeps(&agent.scrape());

    let metrics = agent.addr.to_string();
    let otlp = agent.otlp_addr("http").to_string();
    // One span a post: the dropped-span counter then counts refused posts.
    let post = otlp_post(1);
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();

    let (scrapes, floods) = std::thread::scope(|s| {
        let flooders = flood(s, 4, &otlp, &post);
        let scrapers: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(|| {
                    (0..10)
                        .map(|_| {
                            let t = Instant::now();
                            (status_of(&metrics, &scrape), t.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        (
            scrapers
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            flooders
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
        )
    });

    let mut times: Vec<Duration> = scrapes.iter().map(|(_, t)| *t).collect();
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    let refused = floods.iter().filter(|c| **c == 503).count() as f64;
    let taken = floods.iter().filter(|c| **c == 200).count();
    let s = agent.scrape();
    let after = sleeps(&s);
    let dropped = find(
        &s,
        "pipeprobe_spans_dropped_total",
        "reason",
        "intake_queue_full",
    );
    eprintln!(
        "{} scrapes, p99 {p99:?}; {} OTLP posts: {taken} taken, {refused} refused (503), dropped counter {dropped:?}; \
         clock_nanosleep counted {before} -> {after}",
        scrapes.len(),
        floods.len()
    );
    assert!(scrapes.iter().all(|(c, _)| *c == 200), "a scrape failed");
    assert!(
        floods.iter().all(|c| *c == 200 || *c == 503),
        "the flood got other answers: {:?}",
        floods
            .iter()
            .filter(|c| **c != 200 && **c != 503)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(dropped, Some(refused), "every refused span is counted");
    assert!(
        after > before + 500.0,
        "the probes stopped counting: {before} -> {after}"
    );
    assert!(p99 < Duration::from_secs(5), "scrape p99 {p99:?}");
}

/// A flood that enrichment cannot keep up with (one-request queue, 1,000 spans a request, eight
/// clients): the receiver refuses with 503 rather than queueing without bound, every refused span
/// is counted, every taken span is processed, nothing is left unaccounted, and it answers
/// normally as soon as the flood stops.
#[test]
fn an_otlp_flood_past_the_intake_queue_is_refused_counted_and_survived() {
    const SPANS: usize = 1000;
    let cfg = config_file(
        "[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nintake_queue = 1\n\
         [gpu]\nenabled = false\n[targets.work]\ncomm = \"^no-such-process$\"\n",
    );
    let agent = Agent::start(&["--config", cfg.path().to_str().unwrap()]);
    let otlp = agent.otlp_addr("http").to_string();
    let post = otlp_post(SPANS);

    let codes: Vec<u16> = std::thread::scope(|s| {
        let flooders = flood(s, 8, &otlp, &post);
        flooders
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let taken = codes.iter().filter(|c| **c == 200).count() as f64;
    let refused = codes.iter().filter(|c| **c == 503).count() as f64;
    let counter = |s: &[pipeprobe_tests::Sample], name: &str| {
        s.iter()
            .filter(|x| x.name == name)
            .map(|x| x.value)
            .sum::<f64>()
    };
    // What was taken is processed after the flood: wait for the queue to drain.
    let mut received = 0.0;
    pipeprobe_tests::wait_until(Duration::from_secs(20), || {
        received = counter(&agent.scrape(), "pipeprobe_spans_received_total");
        received >= taken * SPANS as f64
    });
    let s = agent.scrape();
    let dropped = find(
        &s,
        "pipeprobe_spans_dropped_total",
        "reason",
        "intake_queue_full",
    );
    let after = status_of(&otlp, &otlp_post(1));
    eprintln!(
        "{} posts of {SPANS} spans: {taken} taken, {refused} refused (503); spans received {received}, \
         dropped {dropped:?}; a post after the flood: {after}",
        codes.len()
    );
    assert!(
        codes.iter().all(|c| *c == 200 || *c == 503),
        "the flood got other answers: {:?}",
        codes
            .iter()
            .filter(|c| **c != 200 && **c != 503)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(
        refused > 0.0,
        "the flood never filled the intake queue ({taken} posts taken): it tests nothing"
    );
    assert!(taken > 0.0, "no post was taken during the flood");
    assert_eq!(
        dropped,
        Some(refused * SPANS as f64),
        "each refused span is counted"
    );
    assert_eq!(
        received,
        taken * SPANS as f64,
        "every taken span is processed"
    );
    assert_eq!(after, 200, "the receiver refuses after the flood ended");
}
