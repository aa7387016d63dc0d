//! The README's metric table against what the agent really exports, so neither can drift: an
//! agent with every source active (targets doing syscalls and TCP, per-peer on, a fake GPU,
//! spans over OTLP) is scraped in the OpenMetrics format, and every family it exports must be
//! documented with its type.
use std::{collections::BTreeMap, path::Path, process::Command};

use pipeprobe_tests::{Agent, Proc, config_file, py_tool};

/// A row of the README's metric table.
pub(crate) struct Doc {
    pub kind: String,
    /// The labels cell as written: `none`, label names in backquotes, or `none, or ...`.
    pub labels: String,
}

/// `name -> type` of every family in the README's metric table (a row may name several).
fn documented() -> BTreeMap<String, String> {
    documented_rows()
        .into_iter()
        .map(|(name, d)| (name, d.kind))
        .collect()
}

/// Every family in the README's metric table, by OpenMetrics family name (counters without
/// `_total`).
pub(crate) fn documented_rows() -> BTreeMap<String, Doc> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let table = readme
        .split("## Metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a ## Metrics section");
    let mut out = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `pipeprobe_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (names, kind, labels) = (cells[1], cells[2], cells[3]);
        for name in names.split('`').filter(|n| n.starts_with("pipeprobe_")) {
            // OpenMetrics names a counter family without its _total suffix.
            let family = if kind == "counter" {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            };
            out.insert(
                family.to_owned(),
                Doc {
                    kind: kind.to_owned(),
                    labels: labels.to_owned(),
                },
            );
        }
    }
    out
}

#[test]
fn every_exported_metric_is_documented_with_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let lib = crate::gpu::fake_nvml(dir.path());
    let script = dir.path().join("nvml.script");
    std::fs::write(
        &script,
        "driver 550.54.15\n\
         gpu name=NVIDIA-H100 uuid=GPU-1 util=37 memutil=20 mem_total=85899345920 mem_used=1073741824 \
         power_mw=250000 power_limit_mw=700000 temp=61 energy_mj=123456 sm_mhz=1755 mem_mhz=2619 \
         throttle=4 ecc_corrected=1 ecc_uncorrected=0\n\
         proc gpu=0 pid=1 mem=1048576 sm=20\n",
    )
    .unwrap();
    let cfg = config_file(&format!(
        "syscalls = \"all\"\n[tcp]\nper_peer = true\n[gpu]\nnvml_library = \"{}\"\ninterval_secs = 0.2\n\
         [otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nflamegraph_dir = \"{}\"\n\
         [targets.work]\ncomm = \"^workload$\"\n[targets.py]\ncmdline = \"spans.py\"\n",
        lib.display(),
        dir.path().join("fg").display()
    ));
    let mut cmd = Command::new(pipeprobe_tests::pipeprobe_bin());
    cmd.env("PIPEPROBE_FAKE_NVML", &script);
    let agent = Agent::start_with(cmd, &["--config", cfg.path().to_str().unwrap()]);

    // Syscalls, and TCP connects and round trips to a known peer.
    let mut server = Proc::workload_piped(None, &["echo-server", "--port", "0", "--tag", "docs"]);
    let addr = server.read_line_starting("LISTEN ");
    Proc::workload(&["requester", "--addr", &addr, "--count", "20"])
        .0
        .wait()
        .unwrap();
    // Spans, one of them over the default 100 ms flamegraph threshold.
    let http = format!("http://{}/v1/traces", agent.otlp_addr("http"));
    let o = Command::new(py_tool("python3"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/spans.py"))
        .args([
            "quiet",
            "--protocol",
            "http",
            "--endpoint",
            &http,
            "--service",
            "stt",
            "--cpu",
            "0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(std::time::Duration::from_millis(500));

    let text = agent.scrape_text_openmetrics();
    let exported: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect();
    let docs = documented();
    let mut problems = Vec::new();
    for (name, kind) in &exported {
        match docs.get(name) {
            None => problems.push(format!("{name} ({kind}) is exported but not in the README")),
            Some(d) if d != kind => {
                problems.push(format!("{name} is a {kind} but the README says {d}"))
            }
            Some(_) => {}
        }
    }
    eprintln!(
        "exported {} families, documented {}",
        exported.len(),
        docs.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The sources above make most documented families appear: a documented name that never
    // shows is likely stale. Those needing a rarer event are named here with what they need.
    let rare = [
        ("pipeprobe_gpu_xid_errors", "an Xid event"),
        ("pipeprobe_spans_forwarded", "a backend"),
        (
            "pipeprobe_python_unwind_unsupported",
            "a capture of an unsupported Python",
        ),
        (
            "pipeprobe_tcp_peer_connect_duration_seconds",
            "a connect after the agent started",
        ),
        ("pipeprobe_target_pod_info", "[kubernetes] and a kubelet"),
        ("pipeprobe_kubelet_up", "[kubernetes] and a kubelet"),
    ];
    let missing: Vec<&String> = docs
        .keys()
        .filter(|d| !exported.contains_key(*d) && !rare.iter().any(|(r, _)| r == d))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not exported: {missing:?}"
    );
    // Prometheus's own linter on the classic exposition of the same agent.
    let classic = pipeprobe::top::fetch(&format!("http://{}/metrics", agent.addr)).unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is needed: run `cargo xtask setup`");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), classic.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_valid_and_pass_their_unit_tests() {
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let o = Command::new("promtool")
            .args(args)
            .current_dir(&dashboards)
            .output()
            .expect("promtool (Debian's prometheus package) is needed: run `cargo xtask setup`");
        assert!(
            o.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
