//! OTLP spans from the real OpenTelemetry Python SDK, over gRPC and HTTP, enriched with what the
//! kernel saw during each span and forwarded to a stub backend.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value, trace::v1::Span,
};
use pipeprobe_tests::{Agent, config_file, py_tool, wait_until};
use prost::Message as _;

/// An OTLP/HTTP backend that keeps every span it is sent.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Backend {
    pub(crate) fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let keep = spans.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let Some(body) = read_request(&mut c) else {
                    continue;
                };
                if let Ok(req) = ExportTraceServiceRequest::decode(&body[..]) {
                    let mut s = keep.lock().unwrap();
                    for rs in req.resource_spans {
                        for ss in rs.scope_spans {
                            s.extend(ss.spans);
                        }
                    }
                }
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Self { addr, spans }
    }

    fn span(&self, name: &str) -> Option<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }
}

/// Reads one HTTP/1.1 request; its body.
fn read_request(c: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    while buf.len() < head_end + len {
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf[head_end..head_end + len].to_vec())
}

fn attr(span: &Span, key: &str) -> Option<f64> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::DoubleValue(d) => Some(*d),
            Value::IntValue(i) => Some(*i as f64),
            _ => None,
        })
}

fn spans_py() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/spans.py")
}

/// Runs spans.py SCENARIO with the SDK's exporter for `protocol`; its stdout.
fn send(scenario: &[&str], protocol: &str, endpoint: &str, service: &str, cpu: u32) -> String {
    let o = Command::new(py_tool("python3"))
        .arg(spans_py())
        .args(scenario)
        .args([
            "--protocol",
            protocol,
            "--endpoint",
            endpoint,
            "--service",
            service,
        ])
        .args(["--cpu", &cpu.to_string()])
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "spans.py {scenario:?} over {protocol} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn agent_with(backend: &str, extra: &str) -> (Agent, tempfile::NamedTempFile) {
    let cfg = config_file(&format!(
        "[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nforward_to = \"{backend}\"\n{extra}\
         [gpu]\nenabled = false\n[targets.py]\ncmdline = \"spans.py\"\n"
    ));
    let agent = Agent::start(&["--config", cfg.path().to_str().unwrap()]);
    (agent, cfg)
}

#[test]
fn spans_get_their_thread_s_kernel_breakdown_over_grpc_and_http() {
    let backend = Backend::start();
    let fg_dir = tempfile::tempdir().unwrap();
    let (agent, _cfg) = agent_with(
        &format!("http://{}", backend.addr),
        &format!(
            "flamegraph_threshold_ms = 200\nflamegraph_dir = \"{}\"\n",
            fg_dir.path().display()
        ),
    );
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let grpc = format!("http://{}", agent.otlp_addr("grpc"));

    // The span flamegraphs' off-CPU program runs at every context switch of the node: not
    // before a process sends a span.
    let linked = agent.linked_programs();
    assert!(
        linked.iter().any(|p| p == "span_sample") && !linked.iter().any(|p| p == "span_offcpu"),
        "before any span, the agent's links: {linked:?}"
    );
    // 100 ms asleep, then 200 ms sharing one CPU with three busy threads.
    let out = send(&["breakdown"], "http", &http, "tts", 1);
    let linked = agent.linked_programs();
    assert!(
        linked.iter().any(|p| p == "span_offcpu"),
        "after a span, the agent's links: {linked:?}"
    );
    let trace = out
        .lines()
        .find_map(|l| l.strip_prefix("TRACE "))
        .unwrap()
        .to_owned();
    // The same amount of work alone on the other CPU.
    send(&["quiet"], "grpc", &grpc, "stt", 0);
    // Syscalls that never leave the CPU: the kernel keeps their totals on the CPU until the
    // thread does, and the span history reads them there.
    let out = send(&["syscalls"], "http", &http, "stt", 0);
    let made: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("SYSCALLS "))
        .and_then(|n| n.parse().ok())
        .expect("spans.py prints how many syscalls it made");
    // A process the agent does not know: forwarded as it came.
    send(&["foreign"], "grpc", &grpc, "mt", 0);

    wait_until(Duration::from_secs(10), || {
        ["synthesize", "transcribe", "translate", "tokenize"]
            .iter()
            .all(|n| backend.span(n).is_some())
    })
    .expect("the backend received the three spans");
    let busy = backend.span("synthesize").unwrap();
    let (offcpu, runq) = (
        attr(&busy, "pipeprobe.offcpu_ms").expect("offcpu attribute"),
        attr(&busy, "pipeprobe.runqueue_delay_ms").expect("runqueue attribute"),
    );
    eprintln!(
        "synthesize: offcpu {offcpu:.1} ms, runqueue {runq:.1} ms, syscalls {:?}",
        attr(&busy, "pipeprobe.syscalls")
    );
    assert!(
        (80.0..=150.0).contains(&offcpu),
        "offcpu {offcpu} ms, expected ~100"
    );
    assert!(
        runq >= 30.0,
        "run-queue delay {runq} ms while sharing a CPU with 3 busy threads"
    );
    // Its 100 ms asleep is one nanosleep: the thread leaves its CPU inside the syscall, whose
    // start goes with it to its task storage.
    let in_syscalls = attr(&busy, "pipeprobe.syscall_ms").expect("syscall time attribute");
    assert!(
        in_syscalls >= 90.0,
        "{in_syscalls} ms in syscalls for a span that slept 100 ms"
    );
    let quiet = backend.span("transcribe").unwrap();
    let (q_off, q_runq) = (
        attr(&quiet, "pipeprobe.offcpu_ms").unwrap(),
        attr(&quiet, "pipeprobe.runqueue_delay_ms").unwrap(),
    );
    eprintln!("transcribe: offcpu {q_off:.1} ms, runqueue {q_runq:.1} ms");
    assert!(
        q_off < 15.0 && q_runq < 10.0,
        "a quiet span: offcpu {q_off}, runq {q_runq}"
    );
    // The history samples every 20 ms and interpolates within a tick: up to a tick's calls at
    // each end of the 500 ms span are the only ones it may miss.
    let counted = attr(&backend.span("tokenize").unwrap(), "pipeprobe.syscalls")
        .expect("syscall count attribute");
    eprintln!("tokenize: {counted} syscalls counted of {made} getppid calls made");
    assert!(
        counted >= made * 0.75 && counted <= made * 1.02 + 20.0,
        "{counted} syscalls counted in a span that made {made}"
    );
    let foreign = backend.span("translate").unwrap();
    assert!(
        attr(&foreign, "pipeprobe.offcpu_ms").is_none(),
        "a span of an unknown process is forwarded unenriched"
    );

    // Metrics per (service, span), the duration with the trace id as exemplar.
    let s = agent.scrape();
    let count = |name: &str, service: &str, span: &str| {
        s.iter()
            .find(|x| {
                x.name == name
                    && x.labels.get("service").is_some_and(|v| v == service)
                    && x.labels.get("span").is_some_and(|v| v == span)
            })
            .map(|x| x.value)
    };
    assert_eq!(
        count("pipeprobe_span_duration_seconds_count", "tts", "synthesize"),
        Some(1.0)
    );
    assert_eq!(
        count("pipeprobe_span_offcpu_seconds_count", "tts", "synthesize"),
        Some(1.0)
    );
    let off_sum = count("pipeprobe_span_offcpu_seconds_sum", "tts", "synthesize").unwrap();
    assert!(
        (off_sum * 1e3 - offcpu).abs() < 1.0,
        "{off_sum} s vs attribute {offcpu} ms"
    );
    assert_eq!(
        count("pipeprobe_span_duration_seconds_count", "mt", "translate"),
        Some(1.0)
    );
    let openmetrics = agent.scrape_text_openmetrics();
    assert!(
        openmetrics.contains(&format!("trace_id=\"{trace}\"")),
        "exemplar with trace id {trace} missing"
    );

    // The 300 ms span is over the 200 ms threshold: it has a flamegraph of what its thread ran
    // (SHA-256 in OpenSSL's libcrypto); the 100 ms one has none.
    let id = busy
        .attributes
        .iter()
        .find(|kv| kv.key == "pipeprobe.flamegraph")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .expect("the slow span links its flamegraph");
    assert!(id.starts_with(&trace), "{id}");
    assert!(
        !quiet
            .attributes
            .iter()
            .any(|kv| kv.key == "pipeprobe.flamegraph"),
        "a span under the threshold got a flamegraph"
    );
    assert!(
        openmetrics.contains(&format!("flamegraph=\"{id}\"")),
        "the duration exemplar does not link flamegraph {id}"
    );
    let cli = |args: &[&str]| {
        Command::new(pipeprobe_tests::pipeprobe_bin())
            .arg("flamegraphs")
            .args(args)
            .arg("--control-socket")
            .arg(agent.control_socket())
            .output()
            .unwrap()
    };
    let list = cli(&["list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id));
    let out = fg_dir.path().join("got.svg");
    let get = cli(&["get", &id, "--out", out.to_str().unwrap()]);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let svg = std::fs::read_to_string(&out).unwrap().to_lowercase();
    assert!(
        svg.contains("<svg") && svg.contains("synthesize"),
        "not the span's SVG"
    );
    assert!(
        svg.contains("libcrypto") || svg.contains("sha256"),
        "the work the thread did is not in its flamegraph"
    );
    // With its Python frames: the function that hashed, and the one that slept.
    assert!(
        svg.contains("<title>work (") && svg.contains("locals&gt;.body ("),
        "no Python frames in the span flamegraph: {}\n{}",
        svg.split("<title>")
            .skip(1)
            .filter_map(|t| t.split(" (").next())
            .take(40)
            .collect::<Vec<_>>()
            .join(" | "),
        agent.log()
    );
    // Its 100 ms asleep is there too, as off-CPU time (inferno titles a frame with its weight:
    // `[off-CPU] (102,345 us, 33.10%)`), about what the span's offcpu attribute says.
    let off_us: u64 = svg
        .split("<title>[off-cpu] (")
        .skip(1)
        .filter_map(|rest| rest.split(" us").next())
        .filter_map(|n| n.replace(',', "").parse::<u64>().ok())
        .sum();
    eprintln!(
        "span flamegraph: {:.1} ms off-CPU; the span's offcpu attribute {offcpu:.1} ms",
        off_us as f64 / 1e3
    );
    assert!(
        off_us as f64 / 1e3 >= 70.0 && off_us as f64 / 1e3 <= offcpu * 1.3,
        "off-CPU in the flamegraph {off_us} us, offcpu attribute {offcpu} ms"
    );
    // Between the Python function and libcrypto, the _hashlib extension's own function: built
    // without frame pointers, as the interpreter, so only the unwind tables reach it.
    assert!(
        svg.contains("<title>_hashlib_openssl_sha256 ("),
        "the span flamegraph's native frames stop short of the extension module: {}",
        svg.split("<title>")
            .skip(1)
            .filter_map(|t| t.split(" (").next())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let missing = cli(&["get", "00ff", "--out", out.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no span flamegraph `00ff`"));
}

#[test]
fn bad_payloads_are_refused_and_a_dead_backend_only_costs_dropped_spans() {
    // Nothing listens on the backend's port.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (agent, _cfg) = agent_with(&format!("http://{dead}"), "max_request_bytes = 65536\n");
    let http = agent.otlp_addr("http");
    let post = |body: &[u8], ctype: &str| -> (u16, String) {
        let mut c = TcpStream::connect(http).unwrap();
        write!(
            c,
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(body).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, out)
    };
    let (code, out) = post(b"\x0a\xff\xff\xff", "application/x-protobuf");
    assert_eq!(code, 400, "{out}");
    assert!(
        out.contains("not an OTLP ExportTraceServiceRequest"),
        "{out}"
    );
    let (code, out) = post(&vec![0u8; 100_000], "application/x-protobuf");
    assert_eq!(code, 400, "{out}");
    assert!(out.contains("65536"), "{out}");
    let (code, out) = post(b"{}", "application/json");
    assert_eq!(code, 415, "{out}");

    // gRPC through the real grpcio client, raw bytes that are no protobuf.
    let grpc = agent.otlp_addr("grpc");
    let o = Command::new(py_tool("python3"))
        .args([
            "-c",
            &format!(
                "import grpc\n\
             ch = grpc.insecure_channel('{grpc}')\n\
             call = ch.unary_unary('/opentelemetry.proto.collector.trace.v1.TraceService/Export')\n\
             for body in (b'\\x0a\\xff\\xff\\xff', b'\\x00' * 100000):\n\
             \x20   try:\n\
             \x20       call(body, timeout=5)\n\
             \x20       print('OK')\n\
             \x20   except grpc.RpcError as e:\n\
             \x20       print(e.code().name, e.details())\n"
            ),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    eprintln!("grpc: {said}{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("INVALID_ARGUMENT")),
        "{said}"
    );
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("INVALID_ARGUMENT") && l.contains("65536")),
        "{said}"
    );

    // Valid spans while the backend is down: accepted, then dropped and counted.
    send(
        &["burst", "5"],
        "http",
        &format!("http://{http}/v1/traces"),
        "tts",
        0,
    );
    let dropped = wait_until(Duration::from_secs(10), || {
        agent.scrape().iter().any(|s| {
            s.name == "pipeprobe_spans_dropped_total"
                && s.labels
                    .get("reason")
                    .is_some_and(|r| r == "backend_unreachable")
                && s.value >= 5.0
        })
    });
    assert!(
        dropped.is_some(),
        "dropped spans not counted:\n{}",
        agent.log()
    );
    let rejected: f64 = agent
        .scrape()
        .iter()
        .filter(|s| s.name == "pipeprobe_otlp_rejected_requests_total")
        .map(|s| s.value)
        .sum();
    assert!(rejected >= 5.0, "rejected requests counted: {rejected}");
    // Still serving.
    assert!(
        agent
            .scrape()
            .iter()
            .any(|s| s.name == "pipeprobe_build_info")
    );
}

#[test]
fn a_span_gets_the_utilisation_of_the_gpus_its_process_uses() {
    let backend = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    let lib = crate::gpu::fake_nvml(dir.path());
    let script = dir.path().join("nvml.script");
    std::fs::write(
        &script,
        "driver 550.54.15\n\
         gpu name=NVIDIA-H100 uuid=GPU-A util=70 mem_total=100 mem_used=10\n\
         gpu name=NVIDIA-H100 uuid=GPU-B util=10 mem_total=100 mem_used=10\n",
    )
    .unwrap();
    let procs = dir.path().join("nvml.procs");
    std::fs::write(&procs, "").unwrap();
    let cfg = config_file(&format!(
        "[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nforward_to = \"http://{}\"\n\
         [gpu]\nnvml_library = \"{}\"\ninterval_secs = 0.1\n[targets.py]\ncmdline = \"spans.py\"\n",
        backend.addr,
        lib.display()
    ));
    let mut cmd = Command::new(pipeprobe_tests::pipeprobe_bin());
    cmd.env("PIPEPROBE_FAKE_NVML", &script)
        .env("PIPEPROBE_FAKE_NVML_PROCS", &procs);
    let agent = Agent::start_with(cmd, &["--config", cfg.path().to_str().unwrap()]);
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let go = dir.path().join("go");
    let mut py = pipeprobe_tests::Proc::spawn(
        Command::new(py_tool("python3"))
            .arg(spans_py())
            .arg("gpu")
            .args([
                "--protocol",
                "http",
                "--endpoint",
                &http,
                "--service",
                "llm",
            ])
            .arg("--wait-file")
            .arg(&go)
            .stdout(std::process::Stdio::piped()),
    );
    let pid = py.read_line_starting("PID ");
    // The process runs on GPU A only (70 % busy); GPU B (10 %) is someone else's.
    std::fs::write(&procs, format!("proc gpu=0 pid={pid} mem=1048576 sm=60\n")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, "").unwrap();
    assert!(py.0.wait().unwrap().success());
    wait_until(Duration::from_secs(10), || {
        backend.span("generate").is_some()
    })
    .expect("the backend received the span");
    let span = backend.span("generate").unwrap();
    let util = attr(&span, "pipeprobe.gpu_utilization").expect("gpu_utilization attribute");
    assert!(
        (util - 0.7).abs() < 1e-9,
        "GPU utilisation {util}, expected 0.7 (GPU A only)"
    );
}

/// Reads `--bytes` from one connection, answers one byte (run in the test's network namespace).
const SINK: &str = "import socket,sys\n\
l=socket.socket(); l.bind((sys.argv[1], 0)); l.listen(1)\n\
print('LISTEN %d' % l.getsockname()[1], flush=True)\n\
c,_=l.accept(); n=int(sys.argv[2])\n\
while n > 0:\n    d=c.recv(1<<20)\n    n-=len(d)\n    if not d: break\n\
c.sendall(b'k'); c.recv(1)\n";

#[test]
fn a_span_gets_the_tcp_retransmits_of_its_process() {
    // A veth pair into a network namespace with a short tbf queue on the host side's egress:
    // tail drops make the upload retransmit (there is no netem here); the OTLP traffic on
    // loopback is not touched.
    let ns = pipeprobe_tests::Netns::new("retx");
    let host_if = format!("pp-rx{}", std::process::id() % 100_000);
    pipeprobe_tests::run(Command::new("ip").args([
        "link", "add", &host_if, "type", "veth", "peer", "name", "pp-rxn", "netns", &ns.name,
    ]));
    pipeprobe_tests::run(Command::new("ip").args([
        "addr",
        "add",
        "10.231.7.1/30",
        "dev",
        &host_if,
    ]));
    pipeprobe_tests::run(Command::new("ip").args(["link", "set", &host_if, "up"]));
    ns.exec(&["ip", "addr", "add", "10.231.7.2/30", "dev", "pp-rxn"]);
    ns.exec(&["ip", "link", "set", "pp-rxn", "up"]);
    pipeprobe_tests::run(Command::new("tc").args([
        "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", "16mbit", "burst", "16kb",
        "latency", "20ms",
    ]));
    let bytes = 2 << 20;
    let mut sink = pipeprobe_tests::Proc::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "python3",
                "-c",
                SINK,
                "10.231.7.2",
            ])
            .arg(bytes.to_string())
            .stdout(std::process::Stdio::piped()),
    );
    let port = sink.read_line_starting("LISTEN ");

    let backend = Backend::start();
    let (agent, _cfg) = agent_with(&format!("http://{}", backend.addr), "");
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let out = send(
        &[
            "upload",
            "--connect",
            &format!("10.231.7.2:{port}"),
            "--bytes",
            &bytes.to_string(),
        ],
        "http",
        &http,
        "stt",
        0,
    );
    let app: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("RETRANS "))
        .and_then(|n| n.trim().parse().ok())
        .expect("RETRANS from the script");
    wait_until(Duration::from_secs(10), || {
        backend.span("upload").is_some() && backend.span("idle").is_some()
    })
    .expect("the backend received both spans");
    let upload = attr(
        &backend.span("upload").unwrap(),
        "pipeprobe.tcp_retransmits",
    );
    let idle = attr(&backend.span("idle").unwrap(), "pipeprobe.tcp_retransmits");
    eprintln!(
        "retransmitted segments: span {upload:?}, the socket's TCP_INFO {app}; idle span {idle:?}"
    );
    assert!(app > 0.0, "tail drops should make the upload retransmit");
    let upload = upload.expect("pipeprobe.tcp_retransmits on the upload span");
    assert!(
        (upload - app).abs() <= (app * 0.05).max(2.0),
        "span {upload} vs TCP_INFO {app}"
    );
    // Nothing is sent during it; a retransmit in the upload's last tick can spill over (the
    // history interpolates within a 20 ms tick).
    assert!(
        idle.is_some_and(|n| n <= 5.0),
        "idle span: {idle:?} retransmits"
    );
}

#[test]
fn spans_from_a_container_s_pid_namespace_find_their_host_process() {
    // The SDK runs as pid 1 of its own PID namespace, in a container's cgroup: its process.pid
    // and thread.id are the namespace's. The resource names the container (container.id, as
    // the SDKs' container detectors set it) or the pod (k8s.pod.uid, from the downward API).
    let pod_uid = "3c9e1f2a-5b7d-4e8f-9a1b-2c3d4e5f6a7b";
    let id = "d".repeat(64);
    let cg = crate::kubernetes::ContainerCgroup::new(pod_uid, &id);
    let backend = Backend::start();
    let (agent, _cfg) = agent_with(&format!("http://{}", backend.addr), "");
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let in_container = |scenario: &str, resource: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec unshare --pid --fork --mount-proc {} {} {scenario} \
                 --protocol http --endpoint {http} --service tts --cpu 1",
                cg.leaf.display(),
                py_tool("python3").display(),
                spans_py().display(),
            ))
            .env("OTEL_RESOURCE_ATTRIBUTES", resource)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{scenario}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    in_container("breakdown", &format!("container.id={id}"));
    in_container("quiet", &format!("k8s.pod.uid={pod_uid}"));
    wait_until(Duration::from_secs(10), || {
        backend.span("synthesize").is_some() && backend.span("transcribe").is_some()
    })
    .expect("the backend received both spans");
    let busy = backend.span("synthesize").unwrap();
    let offcpu = attr(&busy, "pipeprobe.offcpu_ms");
    let scope = busy
        .attributes
        .iter()
        .find(|kv| kv.key == "pipeprobe.scope")
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        });
    eprintln!("span of namespace pid 1: offcpu {offcpu:?} ms, scope {scope:?}");
    assert!(
        offcpu.is_some_and(|o| (80.0..=150.0).contains(&o)),
        "the container's span was not tied to its host process: {offcpu:?}\n{}",
        agent.log()
    );
    assert_eq!(
        scope.as_deref(),
        Some("thread"),
        "thread.id maps to the host thread"
    );
    let quiet = backend.span("transcribe").unwrap();
    assert!(
        attr(&quiet, "pipeprobe.offcpu_ms").is_some_and(|o| o < 15.0),
        "the span of the pod's process is enriched through k8s.pod.uid"
    );
}

#[test]
fn an_unwritable_flamegraph_directory_turns_span_flamegraphs_off_and_nothing_else() {
    let backend = Backend::start();
    // Under /proc nothing can be created, even by root.
    let (agent, _cfg) = agent_with(
        &format!("http://{}", backend.addr),
        "flamegraph_threshold_ms = 50\nflamegraph_dir = \"/proc/pipeprobe-flamegraphs\"\n",
    );
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    send(&["quiet"], "http", &http, "stt", 0);
    wait_until(Duration::from_secs(10), || {
        backend.span("transcribe").is_some()
    })
    .expect("the span was forwarded");
    let span = backend.span("transcribe").unwrap();
    assert!(
        attr(&span, "pipeprobe.offcpu_ms").is_some(),
        "the span is still enriched"
    );
    assert!(
        !span
            .attributes
            .iter()
            .any(|kv| kv.key == "pipeprobe.flamegraph"),
        "no flamegraph without a directory"
    );
    assert!(
        agent
            .log()
            .contains("cannot create the span flamegraph directory"),
        "{}",
        agent.log()
    );
}

/// A tmpfs of `size`, unmounted when dropped.
struct Volume(tempfile::TempDir);

impl Volume {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            s.success(),
            "cannot mount a tmpfs on {}",
            dir.path().display()
        );
        Self(dir)
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_flamegraph_volume_costs_only_flamegraphs_and_they_come_back_with_space() {
    let backend = Backend::start();
    let vol = Volume::mount("256k");
    let dir = vol.0.path().join("flamegraphs");
    let (agent, _cfg) = agent_with(
        &format!("http://{}", backend.addr),
        &format!(
            "flamegraph_threshold_ms = 50\nflamegraph_dir = \"{}\"\n",
            dir.display()
        ),
    );
    // Something else takes the whole volume.
    let filler = vol.0.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 1 << 20]);
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let slow_span = || {
        let out = send(&["quiet"], "http", &http, "stt", 0);
        let trace = out
            .lines()
            .find_map(|l| l.strip_prefix("TRACE "))
            .expect("spans.py prints its trace id")
            .to_owned();
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = backend
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| hex(&s.trace_id) == trace)
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("span of trace {trace} not forwarded"))
    };
    let flamegraph_of = |s: &Span| {
        s.attributes
            .iter()
            .find(|kv| kv.key == "pipeprobe.flamegraph")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(v) => Some(v.clone()),
                _ => None,
            })
    };
    let full: Vec<Span> = (0..2).map(|_| slow_span()).collect();
    for s in &full {
        assert!(
            attr(s, "pipeprobe.offcpu_ms").is_some(),
            "a span is no longer enriched"
        );
        assert_eq!(flamegraph_of(s), None, "a flamegraph on a full volume");
    }
    let log = agent.log();
    assert_eq!(
        log.matches("cannot store a span flamegraph").count(),
        1,
        "one warning for the whole outage: {log}"
    );
    assert!(log.contains("No space left on device"), "{log}");
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "a failed flamegraph left a file behind"
    );

    std::fs::remove_file(&filler).unwrap();
    let back = slow_span();
    let id = flamegraph_of(&back).expect("space is back, the flamegraph is too");
    let svg = std::fs::read_to_string(dir.join(format!("{id}.svg"))).unwrap();
    assert!(svg.trim_end().ends_with("</svg>"), "a truncated flamegraph");
    assert!(agent.log().contains("span flamegraphs are stored again"));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
