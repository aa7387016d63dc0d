//! Helpers for the integration tests: the real `pipeprobe` binary and workloads as child
//! processes behind RAII guards, and scrapes of the agent's real `/metrics`.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

pub use pipeprobe::top::{Histogram, Sample, parse};

/// The directory holding the workspace's built binaries (target/debug when tests run from
/// target/debug/deps).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_owned()
}

/// The agent binary: `PIPEPROBE_BIN`, else the one built next to the tests.
pub fn pipeprobe_bin() -> PathBuf {
    let path = std::env::var_os("PIPEPROBE_BIN")
        .map_or_else(|| bin_dir().join("pipeprobe"), PathBuf::from);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo xtask test` (it builds the agent first)",
        path.display()
    );
    path
}

/// A reference tool that `cargo xtask setup` installed in its Python venv (target/py-tools).
pub fn py_tool(name: &str) -> PathBuf {
    let path = bin_dir()
        .parent()
        .expect("target dir")
        .join("py-tools/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo xtask setup` (it installs the Python reference tools)",
        path.display()
    );
    path
}

/// The workload binary of this crate, built by cargo for the integration tests.
pub fn workload_bin() -> PathBuf {
    bin_dir().join("workload")
}

/// One raw HTTP/1.x exchange on a fresh connection to `addr` (the request must close it, e.g.
/// `Connection: close` or HTTP/1.0): the status code (0 when there is none) and the body.
pub fn http(addr: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    if c.write_all(request).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// A child process killed and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }

    pub fn workload(args: &[&str]) -> Self {
        Self::spawn(Command::new(workload_bin()).args(args))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Starts a workload with stdout piped, in network namespace `netns` if given.
    pub fn workload_piped(netns: Option<&Netns>, args: &[&str]) -> Self {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(workload_bin());
                c
            }
            None => Command::new(workload_bin()),
        };
        Self::spawn(cmd.args(args).stdout(Stdio::piped()))
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest of that line.
    ///
    /// Reads a byte at a time: a buffered reader dropped between calls would swallow lines
    /// the workload printed together (back-to-back connects print two lines in one write
    /// window), and the next call would then wait for a line that already went by.
    pub fn read_line_starting(&mut self, prefix: &str) -> String {
        let out = self.0.stdout.as_mut().expect("stdout piped");
        loop {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            loop {
                let n = std::io::Read::read(out, &mut byte).expect("read workload stdout");
                assert!(
                    n > 0 || !line.is_empty(),
                    "workload ended before printing `{prefix}`"
                );
                if n == 0 || byte[0] == b'\n' {
                    break;
                }
                line.push(byte[0]);
            }
            let line = String::from_utf8_lossy(&line);
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Waits for the process and returns its remaining stdout; panics if it failed.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out).expect("read stdout");
        }
        let status = self.0.wait().expect("wait");
        assert!(status.success(), "workload failed: {status}\n{out}");
        out
    }
}

/// A network namespace with its loopback up, deleted when dropped: traffic shaping in it
/// (tc) does not touch the host's loopback.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("pp-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Self { name }
    }

    /// Runs `args` inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `pipeprobe agent` on an ephemeral port, with its JSON log captured.
pub struct Agent {
    proc: Proc,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// Holds this agent's own control socket (tests run several agents).
    dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with `args` and waits until it serves /metrics.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(Command::new(pipeprobe_bin()), args)
    }

    /// Starts the agent through `cmd` (a wrapper like setpriv, whose last argument is the agent).
    pub fn start_with(mut cmd: Command, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        cmd.args(["agent", "--listen", "127.0.0.1:0", "--log-format", "json"]);
        // In a directory the agent makes (0700), as /run/pipeprobe on a fresh node; unless the
        // test names its own.
        if !args.contains(&"--control-socket") {
            cmd.arg("--control-socket")
                .arg(dir.path().join("run").join("control.sock"));
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(&mut cmd);
        let stderr = proc.0.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = serving_addr(&line) {
                    let _ = tx.send(addr);
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Self {
                proc,
                addr,
                log,
                dir,
            },
            Err(_) => {
                let status = proc.0.try_wait();
                panic!(
                    "agent did not start serving within 30 s (status {status:?}); log:\n{}",
                    log.lock().expect("log lock").join("\n")
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The names of the programs the agent keeps attached through BPF links.
    pub fn linked_programs(&self) -> Vec<String> {
        linked_programs(self.pid())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit: its status and how long it took.
    pub fn terminate(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let start = Instant::now();
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.proc.pid() as libc::pid_t, libc::SIGTERM) };
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("run").join("control.sock")
    }

    /// Runs `pipeprobe flamegraph ARGS` against this agent.
    pub fn flamegraph(&self, args: &[&str]) -> std::process::Output {
        Command::new(pipeprobe_bin())
            .arg("flamegraph")
            .args(args)
            .arg("--control-socket")
            .arg(self.control_socket())
            .output()
            .expect("pipeprobe flamegraph runs")
    }

    /// Where the agent's OTLP receiver for `protocol` (grpc, http) listens, from its log.
    pub fn otlp_addr(&self, protocol: &str) -> SocketAddr {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = self.log.lock().expect("log lock").iter().find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                let f = v.get("fields")?;
                (f.get("message")?.as_str()? == "OTLP receiver listening"
                    && f.get("protocol")?.as_str()? == protocol)
                    .then(|| f.get("addr")?.as_str()?.parse().ok())
                    .flatten()
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no OTLP {protocol} receiver in the log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    pub fn scrape(&self) -> Vec<Sample> {
        let body = pipeprobe::top::fetch(&format!("http://{}/metrics", self.addr))
            .unwrap_or_else(|e| panic!("scrape failed: {e}; log:\n{}", self.log()));
        parse(&body)
    }

    /// The raw /metrics text in the OpenMetrics format (exemplars included).
    pub fn scrape_text_openmetrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(self.addr).expect("connect to /metrics");
        write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n"
        )
        .expect("write request");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read /metrics");
        out
    }

    /// Value of the sample `name` with label `key=value`.
    pub fn value(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        find(&self.scrape(), name, key, value)
    }
}

/// Value of the sample `name` whose labels include every `(key, value)` of `labels`.
pub fn find_labels(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
}

pub fn find(samples: &[Sample], name: &str, key: &str, value: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get(key).is_some_and(|v| v == value))
        .map(|s| s.value)
}

fn serving_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if !fields
        .get("message")?
        .as_str()?
        .starts_with("serving metrics")
    {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An agent whose targets the test rewrites and reloads (SIGHUP), with only the probe families
/// `probes` on. Rescans are a minute apart: what follows a reload comes from the reload itself.
pub struct RetargetedAgent {
    pub agent: Agent,
    config: tempfile::NamedTempFile,
    base: String,
}

impl RetargetedAgent {
    pub fn start(probes: &[&str], targets: &str) -> Self {
        let disable: Vec<String> = ["sched", "syscalls", "tcp", "tcp_rtt", "profile"]
            .iter()
            .filter(|f| !probes.contains(f))
            .map(|f| format!("{f:?}"))
            .collect();
        let base = format!(
            "rescan_interval_secs = 60\n[gpu]\nenabled = false\n[otlp]\nenabled = false\n\
             [probes]\ndisable = [{}]\n",
            disable.join(", ")
        );
        let config = config_file(&format!("{base}{targets}"));
        let agent = Agent::start(&["--config", config.path().to_str().expect("utf-8 path")]);
        Self {
            agent,
            config,
            base,
        }
    }

    /// Checks that what `count` reads stays 0 for a second under the first targets, and passes
    /// `min` within 5 s of a reload to `targets`: a workload running untraced before the reload
    /// made it a target is counted from the reload on (`what` names it in the failure).
    pub fn counted_only_after_retarget(
        &self,
        targets: &str,
        min: f64,
        what: &str,
        count: impl Fn(&Agent) -> f64,
    ) {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(count(&self.agent), 0.0, "{what} counted before the reload");
        self.retarget(targets);
        wait_until(Duration::from_secs(5), || count(&self.agent) > min).unwrap_or_else(|| {
            panic!(
                "{what} not counted after the reload: {}\n{}",
                count(&self.agent),
                self.agent.log()
            )
        });
    }

    /// Replaces the `[targets]` tables and tells the agent to reload.
    pub fn retarget(&self, targets: &str) {
        std::fs::write(self.config.path(), format!("{}{targets}", self.base)).expect("config");
        // SAFETY: kill has no memory preconditions.
        assert_eq!(
            unsafe { libc::kill(self.agent.pid() as i32, libc::SIGHUP) },
            0
        );
    }
}

/// Writes `content` to a temporary TOML file.
pub fn config_file(content: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(f.path(), content).expect("write config");
    f
}

/// The names of the programs process `pid` keeps attached through BPF links (its link
/// descriptors' fdinfo name each one's program id; bpftool names the program).
pub fn linked_programs(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if !info.lines().any(|l| l.starts_with("link_type:")) {
            continue;
        }
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .map(str::trim)
        else {
            continue;
        };
        let out = run(Command::new("bpftool").args(["prog", "show", "id", id, "-j"]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool prints JSON");
        names.extend(v["name"].as_str().map(str::to_owned));
    }
    names
}
