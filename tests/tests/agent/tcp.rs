//! TCP connect latency, RTT, retransmits and attribution, against libbpf-tools tcpstates,
//! `ss -ti` and the application's own measurements.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pipeprobe_tests::{Agent, Histogram, Netns, Proc, Sample, find, wait_until};

const CONNECT: &str = "pipeprobe_tcp_connect_duration_seconds";
const RTT: &str = "pipeprobe_tcp_rtt_seconds";

fn hist(s: &[Sample], name: &str, target: &str) -> Histogram {
    Histogram::find(s, name, "target", target)
        .unwrap_or_else(|| panic!("{name}{{target={target}}} missing"))
}

/// Bucket (le, in seconds) that a duration falls in, as the agent's histograms define them.
fn le_of(secs: f64) -> f64 {
    let us = (secs * 1e6).ceil().max(1.0);
    2f64.powi(us.log2().ceil() as i32) / 1e6
}

#[test]
fn slow_accept_connects_match_application_and_tcpstates() {
    let mut server = Proc::workload_piped(None, &["slow-server", "--accept-every-ms", "500"]);
    let addr = server.read_line_starting("LISTEN ");
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let mut client = Proc::workload_piped(
        None,
        &[
            "connector",
            "--addr",
            &addr,
            "--count",
            "5",
            "--delay-ms",
            "1500",
        ],
    );
    let agent = Agent::start(&["--target", &format!("client=pid:{}", client.pid())]);
    let mut tcpstates = Proc::spawn(
        Command::new("tcpstates")
            .args(["-D", &port])
            .stdout(Stdio::piped()),
    );
    let before = agent.scrape();

    let app: Vec<f64> = std::iter::from_fn(|| Some(client.read_line_starting("CONNECT_MS ")))
        .take(5)
        .map(|ms| ms.parse::<f64>().unwrap() / 1e3)
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let after = agent.scrape();
    // SAFETY: signalling our own child so it prints its buffered output and exits.
    unsafe { libc::kill(tcpstates.pid() as i32, libc::SIGINT) };
    let out = tcpstates.0.stdout.take().map(|mut o| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut o, &mut s).unwrap();
        s
    });
    let reference: Vec<f64> = out
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("SYN_SENT    -> ESTABLISHED") || l.contains("SYN_SENT -> ESTABLISHED")
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|ms| ms / 1e3)
        .collect();

    let ours = hist(&after, CONNECT, "client").since(&hist(&before, CONNECT, "client"));
    eprintln!(
        "application: {app:?}\ntcpstates: {reference:?}\nagent buckets: {:?}",
        ours.buckets
    );
    assert_eq!(ours.count, 5.0, "agent connect count");
    assert_eq!(reference.len(), 5, "tcpstates connect count");
    let slow: Vec<f64> = app.iter().copied().filter(|s| *s > 0.5).collect();
    assert!(
        slow.len() >= 2,
        "expected connects slowed to ~1 s by the retransmitted SYN: {app:?}"
    );
    // Every slow connect is in the bucket holding ~1 s, as the application and tcpstates saw it.
    let second = le_of(1.0);
    let in_bucket = |b: &Histogram| {
        let i = b
            .buckets
            .iter()
            .position(|(le, _)| (*le - second).abs() < 1e-9)
            .unwrap();
        b.buckets[i].1 - b.buckets[i - 1].1
    };
    let app_in = app.iter().filter(|s| le_of(**s) == second).count() as f64;
    let ref_in = reference.iter().filter(|s| le_of(**s) == second).count() as f64;
    assert_eq!(
        in_bucket(&ours),
        app_in,
        "agent vs application in the ~1 s bucket"
    );
    assert_eq!(
        in_bucket(&ours),
        ref_in,
        "agent vs tcpstates in the ~1 s bucket"
    );
    server.0.kill().ok();
}

#[test]
fn refused_connects_are_failures() {
    // A port nobody listens on: the connect is refused (SYN_SENT -> CLOSE).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = Proc::workload_piped(
        None,
        &[
            "connector",
            "--addr",
            &closed.to_string(),
            "--count",
            "1",
            "--delay-ms",
            "1500",
        ],
    );
    let agent = Agent::start(&["--target", &format!("c=pid:{}", c.pid())]);
    let _ = c.0.wait();
    assert!(
        wait_until(Duration::from_secs(2), || agent.value(
            "pipeprobe_tcp_connect_failures_total",
            "target",
            "c"
        ) == Some(1.0))
        .is_some(),
        "refused connect not counted: {:?}",
        agent.value("pipeprobe_tcp_connect_failures_total", "target", "c")
    );
}

/// `ss -tin` rtt (ms) and total retransmits of the socket to `port`, inside `ns`.
fn ss_sample(ns: &Netns, port: &str) -> Option<(f64, u64)> {
    let out = ns.exec(&["ss", "-tin", "dst", &format!(":{port}")]);
    let rtt = out.split(" rtt:").nth(1)?.split('/').next()?.parse().ok()?;
    let retrans = out
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("retrans:")?
                .split_once('/')
                .map(|(_, t)| t.parse().ok())
        })
        .flatten()
        .unwrap_or(0);
    Some((rtt, retrans))
}

/// A bulk transfer from a tracked client to an untracked server inside a namespace whose
/// loopback is rate-limited by tbf. Returns (agent RTT histogram over the transfer, agent
/// retransmit total, runs of the retransmit program the kernel skipped, ss samples of (rtt ms,
/// total retransmits)).
fn bulk_transfer(
    tbf_latency: &str,
    client_args: &[&str],
) -> (Histogram, f64, f64, Vec<(f64, u64)>) {
    let ns = Netns::new("bulk");
    // A 1500-byte MTU so segments fit tbf's burst; 4 Mbit/s makes a bulk transfer queue.
    ns.exec(&["ip", "link", "set", "lo", "mtu", "1500"]);
    ns.exec(&[
        "tc",
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "tbf",
        "rate",
        "4mbit",
        "burst",
        "16kb",
        "latency",
        tbf_latency,
    ]);
    let mut server = Proc::workload_piped(Some(&ns), &["bulk-server"]);
    let addr = server.read_line_starting("LISTEN ");
    let port = addr.rsplit(':').next().unwrap().to_owned();
    // The agent first, selecting the client by its (unique) command line: the client's connect
    // must come after it is tracked however long the agent takes to start.
    let agent = Agent::start(&[
        "--target",
        &format!("bulk=cmdline:bulk-client --addr {addr} "),
    ]);
    let mut args = vec![
        "bulk-client",
        "--addr",
        &addr,
        "--secs",
        "5",
        "--delay-ms",
        "500",
    ];
    args.extend_from_slice(client_args);
    let mut client = Proc::workload_piped(Some(&ns), &args);
    client.read_line_starting("LOCAL ");
    let before = agent.scrape();
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        if let Some(s) = ss_sample(&ns, &port) {
            samples.push(s);
        }
        if start.elapsed() >= Duration::from_millis(4500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Right after ss's last sample, while the client still sends: the retransmit counts of both
    // cover the same time. Read after the transfer, the agent's also had the retransmissions of
    // its last half second and of the send buffer draining after the client exits, which no ss
    // sample saw (once 561 against ss's 456, on a loaded machine).
    let after = agent.scrape();
    let _ = client.0.wait();
    let _ = server.0.kill();
    let rtt = hist(&after, RTT, "bulk").since(&hist(&before, RTT, "bulk"));
    let retrans = find(&after, "pipeprobe_tcp_retransmits_total", "target", "bulk").unwrap_or(0.0);
    let missed = find(
        &after,
        "pipeprobe_bpf_recursion_misses_total",
        "program",
        "tcp_retransmit_skb",
    )
    .expect("recursion misses exported");
    (rtt, retrans, missed, samples)
}

#[test]
fn rtt_under_tbf_agrees_with_ss() {
    // 64 KiB in flight (the kernel doubles SO_SNDBUF) at 4 Mbit/s: ~130 ms of queue, no drops.
    let (ours, _, _, samples) = bulk_transfer("1s", &["--sndbuf", "32768"]);
    let mut rtts: Vec<f64> = samples.iter().map(|s| s.0 / 1e3).collect();
    rtts.sort_by(f64::total_cmp);
    assert!(rtts.len() >= 10, "too few ss samples: {samples:?}");
    let ss_median = rtts[rtts.len() / 2];
    let our_median = ours.quantile(0.5).expect("agent RTT samples");
    eprintln!(
        "RTT median: agent {our_median}s over {} samples, ss {ss_median}s over {} samples",
        ours.count,
        rtts.len()
    );
    assert!(
        ss_median > 0.02,
        "tbf did not slow the loopback: ss median {ss_median}s"
    );
    let ratio = our_median / ss_median;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "agent RTT {our_median}s vs ss {ss_median}s (ratio {ratio})"
    );
}

#[test]
fn retransmitted_segments_match_ss() {
    // Unbounded send buffer against a short tbf queue: tail drops, so retransmissions.
    let (_, ours, missed, samples) = bulk_transfer("100ms", &[]);
    let ss_total = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!(
        "retransmitted segments: agent {ours} (+{missed} runs skipped by the kernel), ss (last sample) {ss_total}"
    );
    assert!(
        ss_total > 0,
        "the transfer saw no retransmission: {samples:?}"
    );
    // The agent is read a scrape's time after ss's last sample, mid-transfer. A run
    // the kernel skips (the program already running on that CPU) is counted, not silently lost.
    // Equal in most recorded runs; some fell short with no recursion miss: 4 of 455 (0.9 %),
    // 22 of 1,070 (2.1 %). Not yet explained; the suspect is the kernel adding to total_retrans
    // for attempts the tracepoint does not report (this kernel's tracepoint carries an `err`
    // field). 5 % is tolerated until it is found.
    assert!(
        ours + missed >= ss_total as f64 * 0.95,
        "agent {ours} + {missed} missed < ss {ss_total}"
    );
    // Above: what the transfer retransmits in a scrape's time, a few segments.
    assert!(
        ours <= ss_total as f64 * 1.02 + 10.0,
        "agent {ours} well above ss {ss_total}"
    );
}

#[test]
fn untracked_traffic_is_not_attributed_to_the_target() {
    // The target makes exactly 25 connections (to its own listener); an untracked process
    // floods loopback with connections, data and refused connects at the same time.
    let talker = Proc::workload(&[
        "talker",
        "--count",
        "25",
        "--delay-ms",
        "1500",
        "--hold-ms",
        "500",
    ]);
    let agent = Agent::start(&["--target", &format!("talker=pid:{}", talker.pid())]);
    let mut flood = Proc::workload(&["flood", "--secs", "3"]);
    let mut talker = talker;
    let before = agent.scrape();
    talker.0.wait().unwrap();
    let _ = flood.0.wait();
    let after = agent.scrape();
    let connects = hist(&after, CONNECT, "talker").since(&hist(&before, CONNECT, "talker"));
    // The talker's connects all start after `before` (it waits 1.5 s).
    assert_eq!(
        connects.count + hist(&before, CONNECT, "talker").count,
        25.0,
        "talker connects"
    );
    assert_eq!(
        find(
            &after,
            "pipeprobe_tcp_connect_failures_total",
            "target",
            "talker"
        ),
        Some(0.0),
        "flood's refused connects leaked into the target"
    );
    let rtt = hist(&after, RTT, "talker");
    assert!(rtt.count > 0.0, "the target's own RTT samples");
    // 25 request/response exchanges on each side give a bounded number of received segments;
    // the flood's thousands would blow past it if attributed by the running task, or by a
    // CPU's memo of a closed talker socket whose address a flood socket took (with the memo
    // keyed by address alone, not address and cookie: 7048 and 10755 samples).
    assert!(
        rtt.count <= 25.0 * 2.0 * 4.0,
        "RTT samples {} exceed the target's own traffic",
        rtt.count
    );
    let targets: std::collections::BTreeSet<&str> = after
        .iter()
        .filter(|s| s.name.starts_with("pipeprobe_tcp_"))
        .filter_map(|s| s.labels.get("target").map(String::as_str))
        .collect();
    assert_eq!(targets.into_iter().collect::<Vec<_>>(), ["talker"]);
}

#[test]
fn connections_opened_before_tracking_are_claimed_on_read() {
    // Connected before the agent starts: no state transition will ever name its owner.
    let mut p = Proc::workload(&["persistent", "--count", "40", "--delay-ms", "1500"]);
    let agent = Agent::start(&["--target", &format!("early=pid:{}", p.pid())]);
    p.0.wait().unwrap();
    let after = agent.scrape();
    assert_eq!(
        hist(&after, CONNECT, "early").count,
        0.0,
        "its connect predates the agent"
    );
    let rtt = hist(&after, RTT, "early");
    assert!(
        rtt.count >= 40.0,
        "RTT samples of the pre-existing connection: {}",
        rtt.count
    );
}

fn peer_series<'a>(s: &'a [Sample], name: &str, target: &str) -> Vec<&'a Sample> {
    s.iter()
        .filter(|x| x.name == name && x.labels.get("target").is_some_and(|t| t == target))
        .collect()
}

#[test]
fn per_peer_breakdown_is_opt_in_exact_and_capped() {
    const CONNECT_COUNT: &str = "pipeprobe_tcp_peer_connect_duration_seconds_count";
    const RTT_COUNT: &str = "pipeprobe_tcp_peer_rtt_seconds_count";
    let run = |per_peer: &str| {
        let mut talker = Proc::workload(&[
            "talker",
            "--count",
            "10",
            "--delay-ms",
            "1500",
            "--hold-ms",
            "300",
        ]);
        let config = pipeprobe_tests::config_file(&format!(
            "{per_peer}\n[targets.talker]\npid = {}\n",
            talker.pid()
        ));
        let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
        talker.0.wait().unwrap();
        agent.scrape()
    };

    let off = run("");
    assert!(
        peer_series(&off, CONNECT_COUNT, "talker").is_empty(),
        "per-peer series without per_peer"
    );

    let on = run("[tcp]\nper_peer = true");
    let connects = peer_series(&on, CONNECT_COUNT, "talker");
    assert_eq!(
        connects.iter().filter(|s| s.value > 0.0).count(),
        1,
        "{connects:?}"
    );
    let server = connects.iter().find(|s| s.value > 0.0).unwrap();
    let peer = &server.labels["peer"];
    assert!(
        peer.starts_with("127.0.0.1:"),
        "client sockets name the service's address:port: {peer}"
    );
    assert_eq!(server.value, 10.0, "connects to {peer}");
    let rtts = peer_series(&on, RTT_COUNT, "talker");
    // Its accepted side names the client's address only (its port is ephemeral).
    assert!(
        rtts.iter()
            .any(|s| s.labels["peer"] == "127.0.0.1" && s.value > 0.0),
        "{rtts:?}"
    );
    assert!(
        rtts.iter()
            .any(|s| &s.labels["peer"] == peer && s.value > 0.0),
        "{rtts:?}"
    );

    let capped = run("[tcp]\nper_peer = true\nmax_peers = 1");
    let peers: std::collections::BTreeSet<&str> = peer_series(&capped, RTT_COUNT, "talker")
        .into_iter()
        .map(|s| s.labels["peer"].as_str())
        .collect();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(
        find(
            &capped,
            "pipeprobe_events_lost_total",
            "reason",
            "tcp_peers_full"
        )
        .unwrap_or(0.0)
            > 0.0
    );
    // The per-target aggregate still counts everything.
    assert_eq!(hist(&capped, CONNECT, "talker").count, 10.0);
}

#[test]
fn same_port_listeners_in_two_network_namespaces_stay_apart() {
    // Two pods, each with its own network namespace, both serving on the same port.
    let tag = std::process::id();
    let agent = Agent::start(&[
        "--target",
        &format!("a=cmdline:echo-server --port 40123 --tag a{tag}"),
        "--target",
        &format!("b=cmdline:echo-server --port 40123 --tag b{tag}"),
    ]);
    let (ns_a, ns_b) = (Netns::new("pod-a"), Netns::new("pod-b"));
    let mut servers = Vec::new();
    for (ns, name) in [(&ns_a, "a"), (&ns_b, "b")] {
        let mut server = Proc::workload_piped(
            Some(ns),
            &[
                "echo-server",
                "--port",
                "40123",
                "--tag",
                &format!("{name}{tag}"),
            ],
        );
        server.read_line_starting("LISTEN ");
        servers.push(server);
    }
    // Untracked clients: 30 exchanges with pod a, 60 with pod b.
    for (ns, n) in [(&ns_a, "30"), (&ns_b, "60")] {
        Proc::workload_piped(
            Some(ns),
            &["requester", "--addr", "127.0.0.1:40123", "--count", n],
        )
        .finish();
    }
    let s = agent.scrape();
    let (a, b) = (hist(&s, RTT, "a").count, hist(&s, RTT, "b").count);
    eprintln!("RTT samples on the accepted sockets: a {a}, b {b}");
    // Each exchange gives its server's socket two samples (the request, then the ACK of the
    // reply): 60 and 120, give or take the handshake and a delayed ACK. Confused listeners would
    // give one pod everything and the other nothing.
    assert!(
        (55.0..=75.0).contains(&a),
        "pod a: {a} samples for 30 exchanges (b has {b})"
    );
    assert!(
        (110.0..=140.0).contains(&b),
        "pod b: {b} samples for 60 exchanges (a has {a})"
    );
}

/// Sockets connected to `port` on loopback that are not yet in TIME-WAIT.
fn client_sockets_to(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-Htn", "state", "big", "dst", &format!("127.0.0.1:{port}")])
        .output()
        .expect("running ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_full_socket_table_spills_then_counts_each_socket_it_cannot_hold() {
    // An untracked server, which closes each connection after its client: only the clients'
    // sockets have an owner, and each goes through CLOSE to TIME-WAIT.
    let mut server = Proc::workload_piped(None, &["bulk-server"]);
    let addr: std::net::SocketAddr = server.read_line_starting("LISTEN ").parse().unwrap();
    // Two buckets of two slots, and a spill map of 16: room for 20 sockets.
    let config = pipeprobe_tests::config_file(&format!(
        "[tcp]\nmax_sockets = 4\n[targets.c]\ncmdline = \"connector --addr {addr} \"\n"
    ));
    let agent = Agent::start(&["--config", config.path().to_str().unwrap()]);
    let connect = |count: u32| {
        let mut c = Proc::workload_piped(
            None,
            &[
                "connector",
                "--addr",
                &addr.to_string(),
                "--count",
                &count.to_string(),
                "--delay-ms",
                "1000",
            ],
        );
        c.0.wait().unwrap();
        // Its sockets close when it exits: wait for their last state change.
        assert!(
            wait_until(Duration::from_secs(5), || client_sockets_to(addr.port())
                == 0)
            .is_some(),
            "client sockets still open"
        );
    };
    let lost = || {
        agent
            .value("pipeprobe_events_lost_total", "reason", "tcp_sockets_full")
            .unwrap_or(0.0)
    };

    // 30 sockets open at once: 4 in the table, 16 spilled, 10 lost.
    connect(30);
    assert_eq!(hist(&agent.scrape(), CONNECT, "c").count, 20.0);
    assert_eq!(lost(), 10.0);

    // Their closes freed every slot and spill entry: 16 more fit, whichever buckets they hash to.
    connect(16);
    assert_eq!(hist(&agent.scrape(), CONNECT, "c").count, 36.0);
    assert_eq!(lost(), 10.0);
    server.0.kill().ok();
}
