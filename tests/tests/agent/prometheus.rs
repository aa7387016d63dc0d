//! A real Prometheus server (Debian's package) scrapes the agent every second while the
//! synthetic pipeline runs with spans and a fake GPU pair, and is then asked over its HTTP API:
//! every documented family is there with its documented labels; every query of every Grafana
//! dashboard in dashboards/ parses (promtool) and returns data; the dashboards' variables find
//! their values; the span exemplars lead to a trace id and to a stored flamegraph; the alert
//! rules evaluate on the agent's real series. The queries' results are then drawn as PNGs.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use pipeprobe_tests::{Agent, Proc, config_file, pipeprobe_bin, py_tool, wait_until, workload_bin};
use serde_json::{Value, json};

/// How often Prometheus scrapes the agent and evaluates the rules here.
const SCRAPE_SECS: u64 = 1;
/// What the dashboards' `$__rate_interval` becomes (Grafana: at least 4 scrape intervals).
const RATE_INTERVAL: &str = "5s";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Percent-encodes a query parameter.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A Prometheus server on loopback with its own storage, killed on drop.
struct Prometheus {
    _proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(scrape: &str, rules: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("prometheus.yml");
        // JSON is YAML: no quoting surprises.
        let yml = json!({
            "global": {"scrape_interval": format!("{SCRAPE_SECS}s"), "evaluation_interval": format!("{SCRAPE_SECS}s")},
            "rule_files": [rules],
            "scrape_configs": [{"job_name": "pipeprobe", "static_configs": [{"targets": [scrape]}]}],
        });
        std::fs::write(&config, yml.to_string()).unwrap();
        let proc = Proc::spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                // Exemplars are kept only with this (and scraped only in OpenMetrics).
                .arg("--enable-feature=exemplar-storage")
                .arg("--log.level=warn")
                .stderr(std::process::Stdio::null()),
        );
        let p = Self {
            _proc: proc,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(15), || p.http("/-/ready").0 == 200).is_some(),
            "prometheus did not become ready on {}",
            p.addr
        );
        p
    }

    /// GET `path`: (status, body).
    fn http(&self, path: &str) -> (u16, String) {
        pipeprobe_tests::http(
            &self.addr,
            format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).as_bytes(),
        )
    }

    /// The `data` of a successful API answer; panics with Prometheus's error otherwise.
    fn api(&self, path: &str) -> Value {
        let (status, body) = self.http(path);
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path}: HTTP {status}, not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// A range query's result, or Prometheus's error (a query that does not parse).
    fn query_range(&self, expr: &str, start: f64, end: f64) -> Result<Vec<Value>, String> {
        let (status, body) = self.http(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={SCRAPE_SECS}",
            enc(expr)
        ));
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

/// A dashboard's query with Grafana's variables replaced as "All" selects them.
fn substitute(expr: &str) -> String {
    let mut e = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", "5m");
    for var in ["$node", "$target", "$gpu", "$service"] {
        e = e.replace(var, ".*");
    }
    e
}

/// The stage processes of the pipeline driven by `driver`: name -> pid.
fn stages(driver: u32) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(stat), Ok(cmd)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read(format!("/proc/{pid}/cmdline")),
        ) else {
            continue;
        };
        // After the parenthesised comm: state, then ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if ppid == Some(driver) && args.get(1).is_some_and(|a| a == "stage") {
            out.insert(args[2].clone(), pid);
        }
    }
    out
}

#[test]
fn prometheus_scrapes_every_family_and_every_dashboard_query_returns_data() {
    let dir = tempfile::tempdir().unwrap();
    let lib = crate::gpu::fake_nvml(dir.path());
    let script = dir.path().join("nvml.script");
    let procs = dir.path().join("nvml.procs");
    std::fs::write(
        &script,
        "driver 550.54.15\n\
         gpu name=NVIDIA-H100 uuid=GPU-A util=72 memutil=35 mem_total=85899345920 mem_used=41875931136 \
         power_mw=412000 power_limit_mw=700000 temp=64 energy_mj=9000000 sm_mhz=1755 mem_mhz=2619 \
         throttle=4 ecc_corrected=2 ecc_uncorrected=0\n\
         gpu name=NVIDIA-H100 uuid=GPU-B util=18 memutil=6 mem_total=85899345920 mem_used=12884901888 \
         power_mw=180000 power_limit_mw=700000 temp=51 energy_mj=4000000 sm_mhz=1410 mem_mhz=2619 \
         throttle=0 ecc_corrected=0 ecc_uncorrected=0\n",
    )
    .unwrap();
    std::fs::write(&procs, "").unwrap();
    let backend = crate::spans::Backend::start();
    let cfg = config_file(&format!(
        "syscalls = \"all\"\n[tcp]\nper_peer = true\n[gpu]\nnvml_library = \"{}\"\ninterval_secs = 0.5\n\
         [otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nforward_to = \"http://{}\"\n\
         flamegraph_dir = \"{}\"\n\
         [targets.stt]\ncmdline = \"workload stage stt\"\n[targets.mt]\ncmdline = \"workload stage mt\"\n\
         [targets.tts]\ncmdline = \"workload stage tts\"\n",
        lib.display(),
        backend.addr,
        dir.path().join("fg").display()
    ));
    let mut cmd = Command::new(pipeprobe_bin());
    cmd.env("PIPEPROBE_FAKE_NVML", &script)
        .env("PIPEPROBE_FAKE_NVML_PROCS", &procs);
    let agent = Agent::start_with(cmd, &["--config", cfg.path().to_str().unwrap()]);

    let rules = repo().join("dashboards/alerts.yml").canonicalize().unwrap();
    let prom = Prometheus::start(&agent.addr.to_string(), &rules);
    let start = now();

    let driver = Proc::spawn(
        Command::new(workload_bin())
            .args(["pipeline", "--rate", "40"])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", agent.otlp_addr("http")),
            ),
    );
    let mut pids = BTreeMap::new();
    wait_until(Duration::from_secs(5), || {
        pids = stages(driver.pid());
        pids.len() == 3
    });
    assert_eq!(pids.len(), 3, "the pipeline's stages: {pids:?}");
    // The stages as the GPU's compute processes: stt and mt share GPU 0, tts has GPU 1.
    let on_gpus = format!(
        "proc gpu=0 pid={} mem=8589934592 sm=45\nproc gpu=0 pid={} mem=4294967296 sm=20\n\
         proc gpu=1 pid={} mem=6442450944 sm=15\n",
        pids["stt"], pids["mt"], pids["tts"]
    );
    std::fs::write(&procs, &on_gpus).unwrap();
    // The Xid comes only once Prometheus holds GPU 1's counter at 0: `increase()` sees nothing in
    // a counter whose first sample is already 1, and a slow start here would make that a race.
    let xid_at_zero = "pipeprobe_gpu_xid_errors_total{uuid=\"GPU-B\"} == 0";
    assert!(
        wait_until(Duration::from_secs(15), || {
            prom.api(&format!("/api/v1/query?query={}", enc(xid_at_zero)))["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        })
        .is_some(),
        "Prometheus never scraped GPU-B's Xid counter at 0"
    );
    std::fs::write(&procs, format!("{on_gpus}xid gpu=1 code=79\n")).unwrap();

    // Long enough for several 5 s rate windows and span batches (the SDK exports every 5 s).
    std::thread::sleep(Duration::from_secs(22));
    let end = now();

    let targets = prom.api("/api/v1/targets");
    let target = &targets["activeTargets"][0];
    assert_eq!(target["health"], "up", "scrape target: {target}");

    let mut problems = Vec::new();
    documented_families_with_their_labels(&prom, start, &mut problems);
    let rendered = dashboards(&prom, start, end, &mut problems);
    exemplars_lead_to_traces_and_flamegraphs(&prom, &agent, start, end, &mut problems);
    alert_rules_evaluate(&prom, &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    render(&rendered);
}

/// Every family of the README's table is in Prometheus, each series with the labels the table
/// gives (plus `instance` and `job`, which Prometheus adds, and `le`).
fn documented_families_with_their_labels(
    prom: &Prometheus,
    start: f64,
    problems: &mut Vec<String>,
) {
    // Need a capture of an unsupported Python, or [kubernetes] with a kubelet: covered by the
    // Python and Kubernetes tests.
    let absent_here = [
        "pipeprobe_python_unwind_unsupported",
        "pipeprobe_target_pod_info",
        "pipeprobe_kubelet_up",
    ];
    for (family, doc) in crate::docs::documented_rows() {
        if absent_here.contains(&family.as_str()) {
            continue;
        }
        let names = match doc.kind.as_str() {
            "counter" => format!("{family}_total"),
            "histogram" => format!("{family}_(bucket|count|sum)"),
            _ => family.clone(),
        };
        let series = prom.api(&format!(
            "/api/v1/series?match[]={}&start={start:.3}",
            enc(&format!("{{__name__=~\"{names}\"}}"))
        ));
        let series = series.as_array().cloned().unwrap_or_default();
        if series.is_empty() {
            problems.push(format!("{family}: documented but Prometheus has no series"));
            continue;
        }
        let named: BTreeSet<String> = doc
            .labels
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        // `none, or gpu, uuid`: the node-level series and the per-GPU ones.
        let allowed: Vec<BTreeSet<String>> = if doc.labels.starts_with("none, or") {
            vec![BTreeSet::new(), named]
        } else {
            vec![named]
        };
        for s in &series {
            let labels: BTreeSet<String> = s
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| !["__name__", "instance", "job", "le"].contains(&k.as_str()))
                .cloned()
                .collect();
            if !allowed.contains(&labels) {
                problems.push(format!(
                    "{family}: series {s} has labels {labels:?}, the README says {}",
                    doc.labels
                ));
                break;
            }
        }
    }
}

/// One dashboard's queries and what Prometheus answered, for the PNGs.
fn dashboards(prom: &Prometheus, start: f64, end: f64, problems: &mut Vec<String>) -> Value {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "the three dashboards: {files:?}");
    let mut out = Vec::new();
    let mut record_rules = Vec::new();
    for file in &files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let uid = d["uid"].as_str().expect("uid").to_owned();
        // Variables: the node, target and gpu pickers find their values.
        let vars: Vec<&Value> = d["templating"]["list"].as_array().unwrap().iter().collect();
        let names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        for wanted in ["datasource", "node", "target"] {
            if !names.contains(wanted) {
                problems.push(format!("{uid}: no ${wanted} variable"));
            }
        }
        for v in vars.iter().filter(|v| v["type"] == "query") {
            let q = v["definition"].as_str().unwrap();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{uid}: variable query {q} is not label_values(..)"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let values = prom.api(&format!(
                "/api/v1/label/{}/values?match[]={}&start={start:.3}",
                label.trim(),
                enc(&substitute(selector.trim()))
            ));
            if values.as_array().is_none_or(|a| a.is_empty()) {
                problems.push(format!(
                    "{uid}: variable {} ({q}) finds no values",
                    v["name"]
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            let g = &p["gridPos"];
            if !ids.insert(p["id"].as_u64())
                || g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() > 24
            {
                problems.push(format!(
                    "{uid}: panel {} has a duplicate id or lies outside the grid",
                    p["title"]
                ));
            }
        }
        let mut panels = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            // Rows and text panels have no queries.
            let Some(targets) = p["targets"].as_array() else {
                continue;
            };
            let title = p["title"].as_str().unwrap();
            if p["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{uid} / {title}: not on the $datasource variable"));
            }
            let mut queries = Vec::new();
            for t in targets {
                let expr = substitute(t["expr"].as_str().unwrap());
                record_rules.push(json!({"record": format!("dashboard:check:{}", record_rules.len()), "expr": expr}));
                let result = prom.query_range(&expr, start, end).unwrap_or_else(|e| {
                    problems.push(format!("{uid} / {title}: {expr}: {e}"));
                    Vec::new()
                });
                let has_value = result.iter().any(|s| {
                    s["values"].as_array().is_some_and(|vs| {
                        vs.iter().any(|v| {
                            v[1].as_str()
                                .and_then(|x| x.parse::<f64>().ok())
                                .is_some_and(f64::is_finite)
                        })
                    })
                });
                if !has_value {
                    problems.push(format!("{uid} / {title}: no data for {expr}"));
                }
                queries.push(json!({
                    "legend": t["legendFormat"],
                    "series": result.iter().map(|s| json!({"labels": s["metric"], "values": s["values"]})).collect::<Vec<_>>(),
                }));
            }
            panels.push(json!({
                "title": title,
                "type": p["type"],
                "unit": p["fieldConfig"]["defaults"]["unit"],
                "queries": queries,
            }));
        }
        out.push(json!({"uid": uid, "title": d["title"], "panels": panels}));
    }
    // promtool parses every expression as Prometheus itself loads rules.
    let rules = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(
        rules.path(),
        json!({"groups": [{"name": "dashboards", "rules": record_rules}]}).to_string(),
    )
    .unwrap();
    let o = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules.path())
        .output()
        .expect("promtool (Debian's prometheus package) is needed: run `cargo xtask setup`");
    if !o.status.success() {
        problems.push(format!(
            "promtool check rules on the dashboards' queries: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    eprintln!("checked {} dashboard queries", record_rules.len());
    json!({"start": start, "end": end, "dashboards": out})
}

/// Span duration exemplars carry the trace id; those of slow spans name a flamegraph that the
/// agent serves.
fn exemplars_lead_to_traces_and_flamegraphs(
    prom: &Prometheus,
    agent: &Agent,
    start: f64,
    end: f64,
    problems: &mut Vec<String>,
) {
    let data = prom.api(&format!(
        "/api/v1/query_exemplars?query={}&start={start:.3}&end={end:.3}",
        enc("pipeprobe_span_duration_seconds_bucket")
    ));
    let exemplars: Vec<Value> = data
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
        .collect();
    let traced = exemplars
        .iter()
        .filter(|e| {
            e["labels"]["trace_id"]
                .as_str()
                .is_some_and(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .count();
    if traced == 0 {
        problems.push(format!("no exemplar with a trace_id: {data}"));
    }
    let Some(id) = exemplars
        .iter()
        .find_map(|e| e["labels"]["flamegraph"].as_str())
    else {
        problems.push(format!(
            "no exemplar names a flamegraph (one tts request in ten is slow): {data}"
        ));
        return;
    };
    let o = Command::new(pipeprobe_bin())
        .args(["flamegraphs", "get", id, "--out", "-", "--control-socket"])
        .arg(agent.control_socket())
        .output()
        .unwrap();
    let svg = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() || !svg.contains("<svg") {
        problems.push(format!(
            "flamegraph {id} from an exemplar: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    eprintln!(
        "{} exemplars, {traced} with a trace id; flamegraph {id} fetched",
        exemplars.len()
    );
}

/// Prometheus evaluates every alert rule on the agent's real series without error; on this
/// healthy pipeline only the Xid alert (a scripted Xid event) fires.
fn alert_rules_evaluate(prom: &Prometheus, problems: &mut Vec<String>) {
    // Rules evaluate every second; give them one round after the data above.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rules = Vec::new();
    while Instant::now() < deadline {
        rules = prom.api("/api/v1/rules")["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules
            .iter()
            .all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every rule of the file is loaded (counted from the file, so a new alert needs no edit here).
    let in_file = std::fs::read_to_string(repo().join("dashboards/alerts.yml"))
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    if rules.len() != in_file {
        problems.push(format!(
            "{} alert rules loaded, {in_file} in dashboards/alerts.yml",
            rules.len()
        ));
    }
    for r in &rules {
        let name = r["name"].as_str().unwrap_or_default();
        if r["health"] != "ok" {
            problems.push(format!(
                "alert {name}: health {} ({})",
                r["health"], r["lastError"]
            ));
        }
        let firing = r["state"] == "firing";
        if firing != (name == "PipeprobeGpuXidErrors") {
            problems.push(format!("alert {name} is {}: {}", r["state"], r["alerts"]));
        }
    }
}

/// Draws the dashboards' queries as PNGs under target/dashboards (or
/// `PIPEPROBE_DASHBOARD_PNGS`, which `docs/dashboards` is refreshed from).
fn render(data: &Value) {
    let out = std::env::var_os("PIPEPROBE_DASHBOARD_PNGS")
        .map_or_else(|| repo().join("target/dashboards"), PathBuf::from);
    std::fs::create_dir_all(&out).unwrap();
    let json = out.join("queries.json");
    std::fs::write(&json, data.to_string()).unwrap();
    let o = Command::new(py_tool("python3"))
        .arg(repo().join("tests/python/render_dashboards.py"))
        .arg(&json)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "render_dashboards.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for uid in ["pipeprobe-gpu", "pipeprobe-latency", "pipeprobe-spans"] {
        let png = std::fs::read(out.join(format!("{uid}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 20_000,
            "{uid}.png: {} bytes",
            png.len()
        );
    }
    eprintln!("dashboard plots in {}", out.display());
}
