//! The Kubernetes deployment (deploy/kubernetes, a kustomize base with overlays), the plain
//! Prometheus scrape job and the Dockerfile: rendered with kubectl's kustomize, validated
//! offline against the Kubernetes schemas (kubernetes-validate, strict), checked for what the
//! agent needs (and no more: the agent runs here with exactly the DaemonSet's capabilities).
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use pipeprobe_tests::{Agent, py_tool};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const OVERLAYS: [&str; 3] = ["base", "overlays/prometheus-operator", "overlays/example"];
/// The oldest Kubernetes the manifests are checked against, and a recent one.
const VERSIONS: [&str; 2] = ["1.28.0", "1.33.0"];

/// `kubectl kustomize` of one overlay: the YAML text.
fn render(overlay: &str) -> String {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes").join(overlay))
        .output()
        .expect("kubectl is needed (cargo xtask setup installs Debian's kubernetes-client)");
    assert!(
        o.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    let mut p = Command::new(py_tool("python3"))
        .arg(repo().join("tests/python/yaml2json.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(o.status.success());
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} rendered"))
}

#[test]
fn manifests_render_and_pass_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        std::fs::write(&file, &yaml).unwrap();
        for version in VERSIONS {
            let o = Command::new(py_tool("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .unwrap();
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // Only the ServiceMonitor (a CRD) has no schema here: checked below instead.
            let unexplained: Vec<&str> = out
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.contains("kind ServiceMonitor"))
                .collect();
            assert!(
                o.status.success() && unexplained.is_empty(),
                "{overlay} against Kubernetes {version}:\n{out}"
            );
        }
        let docs = documents(&yaml);
        if overlay != "base" {
            // The ServiceMonitor selects the metrics Service by its labels and port name.
            let sm = kind(&docs, "ServiceMonitor", "pipeprobe");
            let svc = kind(&docs, "Service", "pipeprobe");
            for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
                assert_eq!(
                    &svc["metadata"]["labels"][k], v,
                    "ServiceMonitor selector {k}"
                );
            }
            let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
            assert!(
                svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == port),
                "the ServiceMonitor's port {port} is not a port of the Service"
            );
        }
        // The rendered config is one the agent accepts.
        let cm = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap")
            .expect("a ConfigMap");
        let toml = dir.path().join("pipeprobe.toml");
        std::fs::write(&toml, cm["data"]["pipeprobe.toml"].as_str().unwrap()).unwrap();
        // SAFETY: tests run one at a time; nothing else reads the environment meanwhile.
        unsafe { std::env::set_var("NODE_IP", "10.0.0.5") };
        let cfg = pipeprobe::config::Config::load(Some(&toml), &[], None)
            .unwrap_or_else(|e| panic!("{overlay}: the ConfigMap's config is refused: {e}"));
        let k = cfg.kubernetes.expect("[kubernetes] on in the DaemonSet");
        assert_eq!(k.kubelet_url, "https://10.0.0.5:10250");
        assert!(
            cfg.spans.http_listen.ip().is_unspecified(),
            "OTLP must be reachable from pods"
        );
    }
}

/// The DaemonSet's container, from the base.
fn daemonset() -> (Value, Value) {
    let docs = documents(&render("base"));
    let ds = kind(&docs, "DaemonSet", "pipeprobe").clone();
    let c = ds["spec"]["template"]["spec"]["containers"][0].clone();
    (ds, c)
}

#[test]
fn the_daemonset_asks_for_what_the_agent_needs_and_says_why() {
    let (ds, c) = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu")
    );
    let sc = &c["securityContext"];
    let source =
        std::fs::read_to_string(repo().join("deploy/kubernetes/base/daemonset.yaml")).unwrap();
    // Not privileged, unless a comment on the line before says why.
    if sc["privileged"] == true {
        let line = source
            .lines()
            .position(|l| l.contains("privileged: true"))
            .unwrap();
        assert!(
            source
                .lines()
                .nth(line - 1)
                .unwrap()
                .trim()
                .starts_with('#')
        );
    }
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    // Every capability is there on purpose: a comment right above it says what needs it.
    let lines: Vec<&str> = source.lines().collect();
    for cap in sc["capabilities"]["add"].as_array().unwrap() {
        let cap = cap.as_str().unwrap();
        let i = lines
            .iter()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap_or_else(|| panic!("{cap} not found in daemonset.yaml"));
        assert!(
            lines[i - 1].trim().starts_with('#'),
            "capability {cap} has no comment saying why"
        );
    }
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in [
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
        "/run/pipeprobe",
    ] {
        assert!(mounts.contains(&path), "{path} not mounted: {mounts:?}");
    }
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no env {name}"))
    };
    assert_eq!(env("NVIDIA_VISIBLE_DEVICES")["value"], "all");
    assert_eq!(env("NVIDIA_DRIVER_CAPABILITIES")["value"], "utility");
    assert_eq!(
        env("NODE_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(c["resources"][k][r].is_string(), "resources.{k}.{r}");
        }
    }
}

/// Runs the agent as root with exactly the DaemonSet's capabilities (as the container runtime
/// gives them: bounding, permitted and effective sets): every probe attaches and a flamegraph
/// of a Python process has its function names; without SYS_PTRACE or CHECKPOINT_RESTORE it
/// has not. (SYS_RESOURCE is for kernels before 5.11, which charge map memory to
/// RLIMIT_MEMLOCK; this one does not need it.)
#[test]
fn the_daemonset_capabilities_are_enough_for_every_probe() {
    let (_, c) = daemonset();
    let caps: Vec<String> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("+{}", v.as_str().unwrap().to_lowercase()))
        .collect();
    let work = crate::python::start(Path::new("/usr/bin/python3"), &[], "hot");
    let with_caps = |caps: &[String]| {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .arg("--inh-caps=-all")
            .arg("--")
            .arg(pipeprobe_tests::pipeprobe_bin());
        Agent::start_with(cmd, &["--target", &format!("py=pid:{}", work.pid())])
    };
    let dir = tempfile::tempdir().unwrap();
    let python_names = |agent: &Agent| {
        let folded = crate::python::capture(
            agent,
            work.pid(),
            &["--duration", "2s", "--format", "folded"],
            &dir.path().join("py.folded"),
        );
        crate::python::weight(&folded, "hot_a") > 0
    };
    // Each of these is needed for Python names (/proc/PID/mem, /proc/PID/map_files); without
    // CAP_BPF or CAP_PERFMON the agent does not start (the CLI tests).
    for needed in ["+sys_ptrace", "+checkpoint_restore"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != needed).cloned().collect();
        assert_eq!(fewer.len() + 1, caps.len(), "{needed} is in the DaemonSet");
        assert!(
            !python_names(&with_caps(&fewer)),
            "Python names without {needed}: is it still needed?"
        );
    }
    let agent = with_caps(&caps);
    let s = agent.scrape();
    let attached: Vec<(&str, f64)> = s
        .iter()
        .filter(|x| x.name == "pipeprobe_probe_attached")
        .map(|x| (x.labels["probe"].as_str(), x.value))
        .collect();
    assert!(
        attached.len() >= 6 && attached.iter().all(|(_, v)| *v == 1.0),
        "with {caps:?}: {attached:?}\n{}",
        agent.log()
    );
    assert!(
        python_names(&agent),
        "no Python names with the DaemonSet's capabilities:\n{}",
        agent.log()
    );
}

#[test]
fn the_dockerfile_builds_with_the_readme_commands() {
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let stages: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(
        stages.len() >= 2 && stages[0].ends_with(" AS build"),
        "multi-stage: {stages:?}"
    );
    let build = docker.split("\nFROM ").nth(1).expect("a build stage");
    let runs: Vec<&str> = build
        .lines()
        .filter_map(|l| l.strip_prefix("RUN "))
        .filter(|r| r.starts_with("cargo "))
        .collect();
    assert!(runs.len() >= 2, "{runs:?}");
    for run in runs {
        assert!(
            readme.lines().any(|l| l.trim() == run),
            "the Dockerfile runs `{run}`, which the README's build section does not say"
        );
    }
    let last = docker.rsplit("\nFROM ").next().unwrap();
    assert!(
        last.contains("COPY --from=build /src/target/release/pipeprobe /usr/local/bin/pipeprobe")
    );
    assert!(last.contains("ENTRYPOINT [\"/usr/local/bin/pipeprobe\"]"));
    // The image's default arguments are ones the agent accepts.
    let cmd = last
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD");
    let args: Vec<String> = serde_json::from_str(cmd).unwrap();
    let o = Command::new(pipeprobe_tests::pipeprobe_bin())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The plain Prometheus job: Debian's promtool is built without Kubernetes discovery, so its
/// relabelling is checked with the discovery swapped for a static target.
#[test]
fn the_plain_prometheus_scrape_job_is_valid() {
    let text =
        std::fs::read_to_string(repo().join("deploy/prometheus/pipeprobe-scrape.yml")).unwrap();
    assert!(
        text.contains("job_name: pipeprobe"),
        "the alerts use up{{job=\"pipeprobe\"}}"
    );
    let start = text.find("    kubernetes_sd_configs:").unwrap();
    let end = text.find("    relabel_configs:").unwrap();
    let swapped = format!(
        "{}    static_configs:\n      - targets: [\"127.0.0.1:9477\"]\n{}",
        &text[..start],
        &text[end..]
    );
    let f = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    std::fs::write(f.path(), swapped).unwrap();
    let o = Command::new("promtool")
        .args(["check", "config"])
        .arg(f.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
