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
    let body = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    name: "flood".into(),
                    trace_id: vec![7; 16],
                    span_id: vec![9; 8],
                    ..Span::default()
                }],
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
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();

    let (scrapes, floods) = std::thread::scope(|s| {
        let flooders: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let end = Instant::now() + Duration::from_secs(3);
                    let mut codes = Vec::new();
                    while Instant::now() < end {
                        codes.push(status_of(&otlp, &post));
                    }
                    codes
                })
            })
            .collect();
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
