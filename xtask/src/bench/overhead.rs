//! What the probes cost the workloads they watch, against the floor (empty programs on the
//! same hooks) and the reference tool for the same measurement, in alternating runs.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::Context as _;

use super::tools::{Agent, Tool, bin, median, ops_per_sec};

/// The workload waits this long before measuring: the tool under test attaches meanwhile.
const DELAY_MS: u64 = 2000;

/// Probe families (`[probes] disable` names) other than `keep` are disabled.
const FAMILIES: [&str; 5] = ["sched", "syscalls", "tcp", "tcp_rtt", "profile"];

#[derive(Clone, Copy)]
pub enum Variant {
    None,
    /// Empty programs on these hooks (the `floor` tool).
    Floor(&'static [&'static str]),
    /// The agent with only these probe families (empty: all of them).
    Agent(&'static [&'static str]),
    /// The same, with the workload not a target: what every other process on the host pays.
    Untracked(&'static [&'static str]),
    /// The agent capturing a flamegraph of the workload during the whole run.
    Capture {
        mode: &'static str,
        hz: u64,
    },
    /// A reference tool; `{pid}` in its arguments is the workload's pid.
    Reference(&'static str, &'static [&'static str]),
}

impl Variant {
    /// Empty programs alone, the floors the probes are checked against; a `HOOK+WORK` floor
    /// (one doing only what no probe of its kind can skip) is reported, not a divisor.
    pub fn is_empty_floor(&self) -> bool {
        matches!(self, Variant::Floor(hooks) if !hooks.iter().any(|h| h.contains('+')))
    }

    pub fn name(&self) -> String {
        match self {
            Variant::None => "no tracing".into(),
            Variant::Floor(hooks) if !self.is_empty_floor() => {
                // `floor` runs `floor_WORK_HOOK` for `HOOK+WORK` (tests/src/bin/floor.rs).
                let work = hooks[0].split_once('+').map_or("", |(_, w)| w);
                format!(
                    "floor + {} on {}",
                    match work {
                        "clock" => "timing: a clock read alone",
                        "state" => "state: a task-storage call alone",
                        "stack" => "stack: a user stack at each blocking switch alone",
                        "raw" => "BTF tracepoint: an empty program",
                        "owner" => "owner: a socket-storage call alone, as a BTF tracepoint",
                        other => other,
                    },
                    hooks
                        .iter()
                        .map(|h| h.split_once('+').map_or(*h, |(h, _)| h))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            Variant::Floor(hooks) => format!("floor: empty programs on {}", hooks.join(", ")),
            Variant::Agent([]) => "pipeprobe, all probes".into(),
            Variant::Agent(f) => format!("pipeprobe, {} alone", f.join(" + ")),
            Variant::Untracked(f) => {
                format!("pipeprobe, {} on, workload not a target", f.join(" + "))
            }
            Variant::Capture { mode, hz } => {
                format!("pipeprobe flamegraph --mode {mode} --hz {hz}")
            }
            Variant::Reference(tool, args) => {
                format!("{tool} {}", args.join(" ").replace("{pid}", "PID"))
            }
        }
    }
}

pub struct Scenario {
    pub key: &'static str,
    pub title: &'static str,
    pub about: &'static str,
    pub unit: &'static str,
    /// The workload's command line after the binary: `{secs}` and `{delay}` are filled in.
    pub workload: &'static [&'static str],
    /// Runs under this interpreter (work.py) instead of the workload binary.
    pub python: bool,
    /// Its processes export spans with the OpenTelemetry SDK to the agent's OTLP/HTTP receiver
    /// (in every variant, as a real pipeline exports them somewhere whether or not it is traced).
    pub spans: bool,
    pub variants: Vec<Variant>,
}

pub fn scenarios() -> Vec<Scenario> {
    use Variant::*;
    vec![
        Scenario {
            key: "syscall",
            title: "Syscall-heavy",
            about: "A tight `getppid` loop on CPU 1 (`workload syscall-loop`).",
            unit: "syscalls/s",
            workload: &["syscall-loop"],
            python: false,
            spans: false,
            variants: vec![
                None,
                Floor(&["sys_enter", "sys_exit"]),
                // What any latency probe pays before its own work: one timestamp per hook.
                Floor(&["sys_enter+clock", "sys_exit+clock"]),
                Agent(&["syscalls"]),
                Untracked(&["syscalls"]),
                Agent(&[]),
                Reference("syscount", &["-L", "-p", "{pid}"]),
            ],
        },
        Scenario {
            key: "ctxswitch",
            title: "Context-switch-heavy",
            about: "Two threads on CPU 1 passing a byte over pipes (`workload pingpong`): two \
                    wake-ups and two switches per round trip.",
            unit: "round trips/s",
            workload: &["pingpong"],
            python: false,
            spans: false,
            variants: vec![
                None,
                // The hooks a run-queue latency probe timing wakeups needs (runqlat's); the
                // scheduler probe reads the scheduler's own accounting on sched_switch alone.
                Floor(&["sched_switch", "sched_wakeup", "sched_wakeup_new"]),
                Floor(&["sched_switch"]),
                // What keeping per-thread state costs before any work: the scheduler probe
                // makes one task-storage call per tracked switch.
                Floor(&["sched_switch+state"]),
                Agent(&["sched"]),
                Agent(&[]),
                Reference("runqlat", &["-p", "{pid}", "60"]),
                // What any off-CPU profiler pays before its own work: the user stack where a
                // thread blocks, the only time it can be read.
                Floor(&["sched_switch+stack"]),
                Capture {
                    mode: "offcpu",
                    hz: 99,
                },
                Reference("offcputime", &["-p", "{pid}", "60"]),
            ],
        },
        Scenario {
            key: "tcp",
            title: "TCP-heavy",
            about: "Loopback request/response, a new connection per 8 exchanges of 64 bytes \
                    (`workload tcp-rr`).",
            unit: "exchanges/s",
            workload: &["tcp-rr"],
            python: false,
            spans: false,
            variants: vec![
                None,
                Floor(&[
                    "sock/inet_sock_set_state",
                    "tcp/tcp_probe",
                    "tcp/tcp_rcv_space_adjust",
                    "tcp/tcp_retransmit_skb",
                ]),
                // The same hook as a BTF tracepoint, and what keeping each socket's owner in
                // socket-local storage costs there instead of in the probe's owner table.
                Floor(&["inet_sock_set_state+raw"]),
                Floor(&["inet_sock_set_state+owner"]),
                Agent(&["tcp", "tcp_rtt"]),
                // Every other connection of the node: its state changes, segments and reads
                // run the same programs, which find no owner.
                Untracked(&["tcp", "tcp_rtt"]),
                Agent(&[]),
                Reference("tcpstates", &[]),
            ],
        },
        Scenario {
            key: "cpu",
            title: "CPU-bound (sampling)",
            about: "Fixed units of computation on CPU 1 (`workload cpu-loop`), sampled at 99 Hz \
                    with stacks.",
            unit: "work units/s",
            workload: &["cpu-loop"],
            python: false,
            spans: false,
            variants: vec![
                None,
                Floor(&["cpu-clock:99"]),
                Capture {
                    mode: "cpu",
                    hz: 99,
                },
                Reference(
                    "perf",
                    &["record", "-F", "99", "-g", "-o", "/dev/null", "-p", "{pid}"],
                ),
            ],
        },
        Scenario {
            key: "python",
            title: "Python (sampling with Python frames)",
            about: "The pure-Python hot loop of tests/python/work.py under CPython 3.12, \
                    profiled with Python frames at 19 and 99 Hz by pipeprobe and py-spy.",
            unit: "rounds/s",
            workload: &["bench", "{secs}", "{delay}"],
            python: true,
            spans: false,
            variants: vec![
                None,
                Capture {
                    mode: "cpu",
                    hz: 19,
                },
                Reference(
                    "py-spy",
                    &[
                        "record",
                        "-r",
                        "19",
                        "-n",
                        "-o",
                        "/dev/null",
                        "-f",
                        "raw",
                        "-p",
                        "{pid}",
                    ],
                ),
                Capture {
                    mode: "cpu",
                    hz: 99,
                },
                Reference(
                    "py-spy",
                    &[
                        "record",
                        "-r",
                        "99",
                        "-n",
                        "-o",
                        "/dev/null",
                        "-f",
                        "raw",
                        "-p",
                        "{pid}",
                    ],
                ),
            ],
        },
        Scenario {
            key: "pipeline",
            title: "Synthetic pipeline (the demo's)",
            about: "stt -> mt -> tts over loopback TCP, each request sent when the last returned \
                    (`workload pipeline --rate 0`): CPU work, sleeps, file and socket syscalls; \
                    every stage exports a span per request (OpenTelemetry SDK, OTLP/HTTP) to the \
                    agent, which enriches them, draws flamegraphs of the slow ones (one in ten) \
                    and samples every thread at 49 Hz for them.",
            unit: "requests/s",
            workload: &["pipeline", "--rate", "0"],
            python: false,
            spans: true,
            variants: vec![None, Agent(&[])],
        },
    ]
}

/// CPython 3.12 of pyenv, the Python benchmark's interpreter.
pub fn python() -> Option<std::path::PathBuf> {
    let root = std::env::var_os("PYENV_ROOT").map_or_else(|| "/root/.pyenv".into(), Into::into);
    let versions: std::path::PathBuf = root;
    let mut found: Vec<_> = std::fs::read_dir(versions.join("versions"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("3.12."))
        })
        .map(|p| p.join("bin/python3.12"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

fn start(v: &Variant, pid: u32, secs: f64, dir: &Path) -> anyhow::Result<(Tool, Option<Agent>)> {
    let config = |keep: &[&str], tracked: bool| {
        let disable: Vec<String> = FAMILIES
            .iter()
            .filter(|f| !keep.is_empty() && !keep.contains(f))
            .map(|f| format!("\"{f}\""))
            .collect();
        format!(
            "[probes]\ndisable = [{}]\n[gpu]\nenabled = false\n[otlp]\nflamegraph_dir = \"{}\"\n\
             [targets.bench]\n{}\n",
            disable.join(", "),
            dir.join("flamegraphs").display(),
            if tracked {
                format!("pid = {pid}")
            } else {
                "comm = \"^no-such-process$\"".to_owned()
            }
        )
    };
    Ok(match v {
        Variant::None => (Tool::none(), None),
        Variant::Floor(hooks) => {
            let mut child = Command::new(bin("floor"))
                .args(*hooks)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting the floor tool")?;
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
                &mut line,
            )?;
            anyhow::ensure!(line.starts_with("ATTACHED"), "floor said {line:?}");
            (Tool(Some(child)), None)
        }
        Variant::Agent(keep) => (
            Tool::none(),
            Some(Agent::start(dir, &config(keep, true), &[])?),
        ),
        Variant::Untracked(keep) => (
            Tool::none(),
            Some(Agent::start(dir, &config(keep, false), &[])?),
        ),
        Variant::Capture { mode, hz } => {
            let agent = Agent::start(dir, &config(&["profile"], true), &[])?;
            let duration = format!("{}s", (DELAY_MS as f64 / 1000.0 + secs + 1.0).ceil());
            let out = dir.join("capture.folded");
            let client = Tool::spawn(&mut agent.flamegraph(&[
                "--pid",
                &pid.to_string(),
                "--mode",
                mode,
                "--hz",
                &hz.to_string(),
                "--duration",
                &duration,
                "--out",
                out.to_str().expect("utf-8 path"),
            ]))?;
            (client, Some(agent))
        }
        Variant::Reference(tool, args) => {
            let path = if *tool == "py-spy" {
                xtask::root().join("target/py-tools/bin/py-spy")
            } else {
                tool.into()
            };
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("{pid}", &pid.to_string()))
                .collect();
            (Tool::spawn(Command::new(path).args(&args))?, None)
        }
    })
}

/// Starts the scenario's workload for `secs` of measurement (after DELAY_MS of warm-up).
pub fn spawn_workload(s: &Scenario, secs: f64) -> anyhow::Result<std::process::Child> {
    let args: Vec<String> = s
        .workload
        .iter()
        .map(|a| {
            a.replace("{secs}", &secs.to_string())
                .replace("{delay}", &DELAY_MS.to_string())
        })
        .collect();
    let mut cmd = if s.python {
        let mut c = Command::new(
            python().context("CPython 3.12 (pyenv) is needed for the Python benchmark")?,
        );
        c.arg(xtask::root().join("tests/python/work.py"))
            .args(&args);
        c
    } else {
        let mut c = Command::new(bin("workload"));
        if s.spans {
            // Batches every 0.5 s (the SDK's default is 5 s, longer than a round).
            c.env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
                .env("OTEL_BSP_SCHEDULE_DELAY", "500");
        }
        c.args(&args).args([
            "--secs",
            &secs.to_string(),
            "--delay-ms",
            &DELAY_MS.to_string(),
        ]);
        c
    };
    cmd.stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", xtask::show(&cmd)))
}

/// The workload's rate under variant `v`.
pub fn run_once(s: &Scenario, v: &Variant, secs: f64, dir: &Path) -> anyhow::Result<f64> {
    let child = spawn_workload(s, secs)?;
    let held = start(v, child.id(), secs, dir)?;
    let ops = ops_per_sec(child);
    drop(held);
    ops
}

/// Runs the workload under variant `v` and calls `during` once the warm-up is over, for the
/// `secs` of measurement; returns what `during` returned.
pub fn run_during<T>(
    s: &Scenario,
    v: &Variant,
    secs: f64,
    dir: &Path,
    during: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut child = spawn_workload(s, secs)?;
    let held = start(v, child.id(), secs, dir)?;
    std::thread::sleep(std::time::Duration::from_millis(DELAY_MS + 200));
    let out = during();
    drop(held);
    let _ = child.wait();
    out
}

/// Per variant: the rates of every round, in round order.
pub struct Results {
    pub rates: Vec<Vec<f64>>,
}

impl Results {
    /// Each round's loss against that round's untraced run: pairing cancels the drift between
    /// rounds, which on a shared VM is larger than most of what is measured.
    fn losses(&self, i: usize) -> Vec<f64> {
        self.rates[i]
            .iter()
            .zip(&self.rates[0])
            .map(|(x, base)| 1.0 - x / base)
            .collect()
    }

    /// Median over rounds of each round's loss against that round's untraced run.
    pub fn overhead(&self, i: usize) -> f64 {
        median(self.losses(i))
    }

    /// Standard error of `overhead(i)`, from the rounds' scatter around it (median absolute
    /// deviation scaled to a normal sigma, times the median's 1.25 efficiency factor).
    pub fn overhead_se(&self, i: usize) -> f64 {
        let losses = self.losses(i);
        let n = losses.len();
        if n < 2 {
            return f64::INFINITY;
        }
        let m = median(losses.clone());
        let mad = median(losses.iter().map(|l| (l - m).abs()).collect());
        1.2533 * 1.4826 * mad / (n as f64).sqrt()
    }

    /// Whether variant `i`'s cost is told apart from nothing: its median loss is more than two
    /// standard errors above zero.
    pub fn resolved(&self, i: usize) -> bool {
        self.overhead(i) > 2.0 * self.overhead_se(i)
    }

    /// The most variant `i` could cost: two standard errors above its median loss. What bounds
    /// the probes where `i` is a floor not `resolved`.
    pub fn upper_bound(&self, i: usize) -> f64 {
        self.overhead(i).max(0.0) + 2.0 * self.overhead_se(i)
    }

    /// Whether variant `i` costs more than variant `j` only by less than two standard errors
    /// of their difference: neither is then shown to cost more.
    pub fn not_told_apart(&self, i: usize, j: usize) -> bool {
        let (a, b) = (self.overhead(i), self.overhead(j));
        a > b && a - b <= 2.0 * self.overhead_se(i).hypot(self.overhead_se(j))
    }
}

#[cfg(test)]
mod tests {
    use super::Results;

    fn results(floor: &[f64]) -> Results {
        Results {
            rates: vec![vec![100.0; floor.len()], floor.to_vec()],
        }
    }

    #[test]
    fn a_steady_small_cost_is_resolved_and_scatter_around_zero_is_not() {
        // Losses of 2, 3, 1, 2, 2 %: small, but the same in every round.
        let steady = results(&[98.0, 97.0, 99.0, 98.0, 98.0]);
        assert!((steady.overhead(1) - 0.02).abs() < 1e-9);
        assert!(steady.resolved(1), "se {}", steady.overhead_se(1));
        // Losses of -1, 1, -0.5, 0.5, 0 %: nothing but noise.
        let noise = results(&[101.0, 99.0, 100.5, 99.5, 100.0]);
        assert!(noise.overhead(1).abs() < 1e-9);
        assert!(!noise.resolved(1));
        assert!(noise.overhead_se(1) > 0.0);
    }

    #[test]
    fn rounds_are_paired_with_their_own_untraced_run() {
        // The machine halves its speed in round 2: a 10 % loss in both rounds, not 55 %.
        let r = Results {
            rates: vec![vec![100.0, 50.0], vec![90.0, 45.0]],
        };
        assert!((r.overhead(1) - 0.10).abs() < 1e-9);
    }

    #[test]
    fn a_difference_within_the_errors_is_not_told_apart() {
        let r = Results {
            rates: vec![
                vec![100.0; 5],
                // Losses of 1, 3, 0, 2, -1 %: about 1 % with a wide scatter.
                vec![99.0, 97.0, 100.0, 98.0, 101.0],
                // Losses of 0, 0.5, -0.5, 0, 0 %: about 0 %.
                vec![100.0, 99.5, 100.5, 100.0, 100.0],
                // Losses of 20 %: clearly dearer.
                vec![80.0; 5],
            ],
        };
        assert!(r.not_told_apart(1, 2));
        assert!(
            !r.not_told_apart(2, 1),
            "the cheaper one is never 'not told apart'"
        );
        assert!(!r.not_told_apart(3, 2));
    }
}
