//! Processes the benchmarks start: the agent with a given config, tools under test, workloads.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use xtask::root;

pub fn bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// A process stopped (SIGINT, then kill) when dropped.
pub struct Tool(pub Option<Child>);

impl Tool {
    pub fn none() -> Self {
        Self(None)
    }

    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", xtask::show(cmd)))?;
        Ok(Self(Some(child)))
    }

    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let end = Instant::now() + Duration::from_millis(500);
            while Instant::now() < end {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent, started with `config` (TOML), ready once its control socket exists.
pub struct Agent {
    pub tool: Tool,
    pub socket: PathBuf,
    pub metrics: String,
}

impl Agent {
    pub fn start(dir: &Path, config: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let conf = dir.join("agent.toml");
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        // A fixed port per run: the benchmarks run one agent at a time.
        let listen = "127.0.0.1:19477";
        std::fs::write(&conf, format!("listen = \"{listen}\"\n{config}"))?;
        let tool = Tool::spawn(
            Command::new(bin("pipeprobe"))
                .args(["agent", "--config"])
                .arg(&conf)
                .arg("--control-socket")
                .arg(&socket)
                .args(extra),
        )?;
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > end {
                bail!("the agent did not open its control socket within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            tool,
            socket,
            metrics: listen.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.tool.pid()
    }

    /// One GET /metrics: the body.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(&self.metrics).context("connecting to /metrics")?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    }

    /// `pipeprobe flamegraph ARGS` against this agent.
    pub fn flamegraph(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("pipeprobe"));
        c.arg("flamegraph")
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket);
        c
    }
}

/// Sum of a metric's samples whose line contains every one of `needles`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && needles.iter().all(|n| l.contains(n))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `cmd` (a workload printing `OPS_PER_SEC n`) to its end; the rate.
pub fn ops_per_sec(mut child: Child) -> anyhow::Result<f64> {
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("workload ended without printing OPS_PER_SEC");
        }
        if let Some(v) = line.trim().strip_prefix("OPS_PER_SEC ") {
            child.wait()?;
            return v.parse().context("OPS_PER_SEC value");
        }
    }
}

/// RSS in bytes and CPU seconds (user + system) of `pid`.
pub fn usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((rss_kb * 1024, ticks / hz))
}

/// Memory the kernel charges for the BPF maps `pid` holds (the `memlock` of each map fd).
pub fn bpf_map_bytes(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The p-th percentile (0..=100) by nearest rank.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}
