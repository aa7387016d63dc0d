//! Pod-aware targets against a fake kubelet (tests/python/fake_kubelet.py serving a pod list in
//! the kubelet's JSON shape, with a bearer token, over HTTP and HTTPS) and cgroups created here
//! with the paths the kubelet's systemd driver gives containers, with workloads moved into them.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use pipeprobe_tests::{
    Agent, Proc, Sample, config_file, find, find_labels, pipeprobe_bin, py_tool, wait_until,
    workload_bin,
};

const STT_UID: &str = "5d1e7c2a-9b3f-4e61-8a0d-2c4b6e8f0a13";
const DECOY_UID: &str = "7a2f9e41-0c6d-4b8a-9e3f-1d5c7b9a2e64";

fn container_id(tag: char) -> String {
    tag.to_string().repeat(64)
}

/// Where cgroup v2 is mounted (the unified hierarchy of a hybrid host, or /sys/fs/cgroup).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// A container's cgroup as the kubelet's systemd driver names it, removed when dropped.
pub(crate) struct ContainerCgroup {
    created: Vec<PathBuf>,
    pub(crate) leaf: PathBuf,
}

impl ContainerCgroup {
    pub(crate) fn new(pod_uid: &str, container_id: &str) -> Self {
        let mut dir = cgroup2_root();
        let mut created = Vec::new();
        for part in [
            "kubepods.slice".to_owned(),
            "kubepods-besteffort.slice".to_owned(),
            format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_")),
            format!("cri-containerd-{container_id}.scope"),
        ] {
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Self { created, leaf: dir }
    }

    /// Runs a workload inside this cgroup (it moves itself in before exec, as runc does).
    fn run(&self, args: &str) -> Proc {
        Proc::spawn(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec {} {args}",
                    self.leaf.display(),
                    workload_bin().display()
                ))
                .stdout(Stdio::null()),
        )
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // A killed process leaves its cgroup a moment after it is reaped.
            wait_until(Duration::from_secs(2), || std::fs::remove_dir(dir).is_ok());
        }
    }
}

fn pod_json(
    name: &str,
    namespace: &str,
    uid: &str,
    app: &str,
    container: &str,
    id: &str,
) -> String {
    format!(
        r#"{{"metadata":{{"name":"{name}","namespace":"{namespace}","uid":"{uid}","labels":{{"app":"{app}","pod-template-hash":"7d9f"}}}},
            "spec":{{"nodeName":"gpu-node-1","containers":[{{"name":"{container}","image":"stt:1"}}]}},
            "status":{{"phase":"Running","containerStatuses":[{{"name":"{container}","containerID":"containerd://{id}","ready":true,"restartCount":0}}]}}}}"#
    )
}

fn pod_list(pods: &[String]) -> String {
    format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[{}]}}"#,
        pods.join(",")
    )
}

/// The fake kubelet, serving `pods` (rewritten by the test) to holders of `token`.
fn kubelet(pods: &Path, token: &str, tls: Option<(&Path, &Path)>) -> (Proc, String) {
    let mut cmd = Command::new(py_tool("python3"));
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fake_kubelet.py"))
        .arg(pods)
        .arg(token);
    if let Some((cert, key)) = tls {
        cmd.arg(cert).arg(key);
    }
    let mut p = Proc::spawn(cmd.stdout(Stdio::piped()));
    let port = p.read_line_starting("LISTEN ");
    (p, port)
}

fn pod_info<'a>(s: &'a [Sample], pod: &str) -> Option<&'a Sample> {
    s.iter().find(|x| {
        x.name == "pipeprobe_target_pod_info"
            && x.labels.get("pod").map(String::as_str) == Some(pod)
    })
}

fn kubelet_up(s: &[Sample]) -> Option<f64> {
    s.iter()
        .find(|x| x.name == "pipeprobe_kubelet_up")
        .map(|x| x.value)
}

fn start_agent(url: &str, token: &Path, extra: &str) -> (Agent, tempfile::NamedTempFile) {
    let cfg = config_file(&format!(
        "rescan_interval_secs = 1\nsyscalls = [\"clock_nanosleep\"]\n\
         [kubernetes]\nenabled = true\nkubelet_url = \"{url}\"\ntoken_path = \"{}\"\nrefresh_secs = 0.3\n{extra}\n\
         [targets.stt.kubernetes]\nnamespace = \"speech\"\nlabels = {{ app = \"stt\" }}\ncontainer = \"server\"\n",
        token.display()
    ));
    let agent = Agent::start(&["--config", cfg.path().to_str().unwrap()]);
    (agent, cfg)
}

#[test]
fn pods_select_targets_through_the_kubelet_and_leave_with_their_pod() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cr3t-token\n").unwrap();
    let pods = dir.path().join("pods.json");
    let stt = pod_json(
        "stt-0",
        "speech",
        STT_UID,
        "stt",
        "server",
        &container_id('a'),
    );
    // Same app label and container name, another namespace: must not join the target.
    let decoy = pod_json(
        "stt-0",
        "staging",
        DECOY_UID,
        "stt",
        "server",
        &container_id('b'),
    );
    std::fs::write(&pods, pod_list(&[stt, decoy.clone()])).unwrap();
    let (_kubelet, port) = kubelet(&pods, "s3cr3t-token", None);

    let stt_cg = ContainerCgroup::new(STT_UID, &container_id('a'));
    let decoy_cg = ContainerCgroup::new(DECOY_UID, &container_id('b'));
    let (agent, _cfg) = start_agent(&format!("http://127.0.0.1:{port}"), &token, "");
    let mut w = stt_cg.run("nanosleep --ms 5 --count 100000");
    let _decoy = decoy_cg.run("nanosleep --ms 5 --count 100000");

    let mut s = Vec::new();
    let joined = wait_until(Duration::from_secs(5), || {
        s = agent.scrape();
        find(&s, "pipeprobe_target_processes", "target", "stt") == Some(1.0)
            && pod_info(&s, "stt-0").is_some()
    });
    assert!(
        joined.is_some(),
        "the stt pod's process never joined:\n{}",
        agent.log()
    );
    eprintln!("pod matched {joined:?} after the agent served");
    assert_eq!(
        find_labels(
            &s,
            "pipeprobe_target_pod_info",
            &[
                ("target", "stt"),
                ("namespace", "speech"),
                ("pod", "stt-0"),
                ("container", "server")
            ]
        ),
        Some(1.0),
        "{:?}",
        pod_info(&s, "stt-0")
    );
    assert!(
        !s.iter()
            .any(|x| x.labels.get("namespace").map(String::as_str) == Some("staging")),
        "the staging pod must not be in any target"
    );
    assert_eq!(kubelet_up(&s), Some(1.0));
    // The kernel side traces the pod's process: its 5 ms sleeps are counted.
    let sleeps = || {
        agent
            .scrape()
            .iter()
            .find(|x| {
                x.name == "pipeprobe_syscall_duration_seconds_count"
                    && x.labels.get("target").map(String::as_str) == Some("stt")
            })
            .map(|x| x.value)
    };
    assert!(
        wait_until(Duration::from_secs(3), || sleeps()
            .is_some_and(|n| n > 10.0))
        .is_some(),
        "no syscalls counted for the pod's process"
    );

    // A kubelet in trouble: the last list is kept, the process stays, kubelet_up says so.
    std::fs::write(&pods, "FAIL").unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || kubelet_up(&agent.scrape())
            == Some(0.0))
        .is_some(),
        "pipeprobe_kubelet_up should drop to 0"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let s = agent.scrape();
    assert_eq!(
        find(&s, "pipeprobe_target_processes", "target", "stt"),
        Some(1.0)
    );
    assert!(agent.log().contains("HTTP 500"), "{}", agent.log());

    // The pod is deleted from the list: its process leaves the target and its series goes.
    std::fs::write(&pods, pod_list(&[decoy])).unwrap();
    let mut s = Vec::new();
    let left = wait_until(Duration::from_secs(3), || {
        s = agent.scrape();
        find(&s, "pipeprobe_target_processes", "target", "stt") == Some(0.0)
    });
    assert!(
        left.is_some(),
        "the deleted pod's process is still tracked:\n{}",
        agent.log()
    );
    assert!(
        pod_info(&s, "stt-0").is_none(),
        "stale pod series: {:?}",
        pod_info(&s, "stt-0")
    );
    assert_eq!(kubelet_up(&s), Some(1.0));
    let _ = w.0.kill();
}

/// A certificate authority and a kubelet serving certificate for 127.0.0.1 it signed.
fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("kubelet.pem"),
        p("kubelet.key"),
        p("kubelet.csr"),
        p("ext.cnf"),
    );
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-cluster-ca",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=gpu-node-1",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (ca, cert, key)
}

#[test]
fn the_kubelet_s_certificate_is_checked_against_the_cluster_ca() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0k3n").unwrap();
    let pods = dir.path().join("pods.json");
    std::fs::write(
        &pods,
        pod_list(&[pod_json(
            "stt-tls",
            "speech",
            STT_UID,
            "stt",
            "server",
            &container_id('c'),
        )]),
    )
    .unwrap();
    let (ca, cert, key) = certificates(dir.path(), "cluster");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let (_kubelet, port) = kubelet(&pods, "t0k3n", Some((&cert, &key)));
    let url = format!("https://127.0.0.1:{port}");
    let cg = ContainerCgroup::new(STT_UID, &container_id('c'));

    // The right CA: the pod list is read over TLS and the pod resolves.
    let (agent, _cfg) = start_agent(&url, &token, &format!("ca_path = \"{}\"", ca.display()));
    let _w = cg.run("nanosleep --ms 5 --count 100000");
    assert!(
        wait_until(Duration::from_secs(5), || pod_info(
            &agent.scrape(),
            "stt-tls"
        )
        .is_some())
        .is_some(),
        "no pod over HTTPS:\n{}",
        agent.log()
    );
    drop(agent);

    // Another CA: the kubelet is not trusted, nothing resolves, and the log says why.
    let (agent, _cfg) = start_agent(
        &url,
        &token,
        &format!("ca_path = \"{}\"", other_ca.display()),
    );
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .log()
            .contains("cannot reach the kubelet"))
        .is_some(),
        "{}",
        agent.log()
    );
    let s = agent.scrape();
    assert_eq!(kubelet_up(&s), Some(0.0));
    assert!(pod_info(&s, "stt-tls").is_none());
    assert!(
        agent.log().to_lowercase().contains("certificate"),
        "{}",
        agent.log()
    );
}

#[test]
fn kubernetes_config_errors_are_named() {
    let run = |cfg: &str| {
        let f = config_file(cfg);
        Command::new(pipeprobe_bin())
            .args(["agent", "--config", f.path().to_str().unwrap()])
            .env_remove("NODE_IP")
            .output()
            .unwrap()
    };
    for (cfg, says) in [
        (
            "[targets.stt.kubernetes]\nnamespace = \"speech\"\n",
            "[kubernetes] is off",
        ),
        (
            "[kubernetes]\nenabled = true\n[targets.stt.kubernetes]\nnamespace = \"speech\"\n",
            "${NODE_IP}, which is not set",
        ),
        (
            "[kubernetes]\nenabled = true\nkubelet_url = \"ftp://x\"\n[targets.stt.kubernetes]\nnamespace = \"s\"\n",
            "expected https://HOST:PORT",
        ),
        (
            "[kubernetes]\nenabled = true\nkubelet_url = \"http://x\"\n[targets.stt.kubernetes]\nnamespce = \"s\"\n",
            "unknown field `namespce`",
        ),
        (
            "[kubernetes]\nenabled = true\nkubelet_url = \"http://x\"\n[targets.stt.kubernetes]\npod = \"(\"\n",
            "invalid pod regex",
        ),
    ] {
        let o = run(cfg);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cfg}: {err}");
        assert!(err.contains(says), "{cfg}: expected `{says}` in: {err}");
    }
}

/// The value of `name` for target stt's pod `pod`.
fn of_pod(s: &[Sample], name: &str, pod: &str) -> Option<f64> {
    s.iter()
        .filter(|x| {
            x.name == name
                && x.labels.get("target").map(String::as_str) == Some("stt")
                && x.labels.get("pod").map(String::as_str) == Some(pod)
        })
        .map(|x| x.value)
        .reduce(|a, b| a + b)
}

#[test]
fn each_pod_of_a_target_has_its_own_series_and_a_reused_id_starts_clean() {
    const UIDS: [&str; 3] = [
        "11111111-2222-4333-8444-555555555501",
        "11111111-2222-4333-8444-555555555502",
        "11111111-2222-4333-8444-555555555503",
    ];
    let pod = |i: usize| {
        pod_json(
            &format!("stt-{i}"),
            "speech",
            UIDS[i],
            "stt",
            "server",
            &container_id((b'a' + i as u8) as char),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, pod_list(&[pod(0), pod(1)])).unwrap();
    let (_kubelet, port) = kubelet(&pods, "t", None);
    let cgs: Vec<ContainerCgroup> = (0..3)
        .map(|i| ContainerCgroup::new(UIDS[i], &container_id((b'a' + i as u8) as char)))
        .collect();
    let (agent, _cfg) = start_agent(&format!("http://127.0.0.1:{port}"), &token, "");
    let mut w0 = cgs[0].run("nanosleep --ms 5 --count 100000");
    let _w1 = cgs[1].run("nanosleep --ms 5 --count 100000");
    let sleeps = "pipeprobe_syscall_duration_seconds_count";
    let mut s = Vec::new();
    let both = wait_until(Duration::from_secs(5), || {
        s = agent.scrape();
        of_pod(&s, sleeps, "stt-0").is_some_and(|n| n > 200.0)
            && of_pod(&s, sleeps, "stt-1").is_some_and(|n| n > 200.0)
    });
    assert!(both.is_some(), "per-pod syscall series:\n{s:?}");
    assert_eq!(
        find(&s, "pipeprobe_target_processes", "target", "stt"),
        Some(2.0)
    );
    for family in [
        "pipeprobe_sched_runqueue_delay_seconds_count",
        "pipeprobe_syscall_errors_total",
    ] {
        for p in ["stt-0", "stt-1"] {
            assert!(of_pod(&s, family, p).is_some(), "{family} for {p}");
        }
    }
    let series = s
        .iter()
        .find(|x| x.name == sleeps && x.labels.get("pod").map(String::as_str) == Some("stt-0"))
        .unwrap();
    assert_eq!(series.labels["namespace"], "speech");
    assert_eq!(series.labels["container"], "server");
    let before = of_pod(&s, sleeps, "stt-0").unwrap();

    // stt-0 is deleted and its process ends: nothing of it is exported any more.
    std::fs::write(&pods, pod_list(&[pod(1)])).unwrap();
    let _ = w0.0.kill();
    let _ = w0.0.wait();
    let gone = wait_until(Duration::from_secs(5), || {
        s = agent.scrape();
        !s.iter()
            .any(|x| x.labels.get("pod").map(String::as_str) == Some("stt-0"))
            && find(&s, "pipeprobe_target_processes", "target", "stt") == Some(1.0)
    });
    assert!(gone.is_some(), "stt-0's series linger:\n{s:?}");
    // A scrape has zeroed its kernel numbers: a new pod may take its id and starts from zero.
    std::fs::write(&pods, pod_list(&[pod(1), pod(2)])).unwrap();
    let _w2 = cgs[2].run("nanosleep --ms 5 --count 100000");
    let new = wait_until(Duration::from_secs(5), || {
        s = agent.scrape();
        of_pod(&s, sleeps, "stt-2").is_some()
    });
    assert!(new.is_some(), "stt-2 never appeared:\n{}", agent.log());
    let fresh = of_pod(&s, sleeps, "stt-2").unwrap();
    eprintln!("stt-0 ended at {before} sleeps; the new pod stt-2 starts at {fresh}");
    assert!(
        fresh < before,
        "stt-2 carries stt-0's numbers: {fresh} >= {before}"
    );
}
