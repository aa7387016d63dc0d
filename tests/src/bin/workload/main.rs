//! Workloads whose answer is known, for the integration tests, and the synthetic speech pipeline
//! (stt -> mt -> tts over loopback TCP) that `cargo xtask demo` runs the agent against.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

mod bench;
mod otel;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// THREADS CPU-bound threads pinned to one CPU: each waits for the others on the run queue.
    Busy {
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 0)]
        cpu: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// THREADS CPU-bound threads sharing one CPU, all moved to the other CPU every PERIOD_MS by
    /// the main thread (sched_setaffinity): the threads waiting on a run queue at each move are
    /// migrated in the middle of their wait. Needs two CPUs (0 and 1).
    Hop {
        #[arg(long, default_value_t = 3)]
        threads: usize,
        #[arg(long, default_value_t = 7)]
        period_ms: u64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Sleeps and wakes every PERIOD_MS on an otherwise idle CPU: run-queue delay stays tiny.
    Quiet {
        #[arg(long, default_value_t = 1)]
        cpu: usize,
        #[arg(long, default_value_t = 5)]
        period_ms: u64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Process churn for the soak: RATE short-lived children per second for SECS (each a fresh
    /// exec of this binary running `churn-child`: THREADS threads, some syscalls, a few ms),
    /// at most 64 at a time; prints `CHILDREN n` at the end. The marker is for a selector.
    Churn {
        #[arg(long)]
        marker: String,
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// One child of `churn`.
    ChurnChild {
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Waits DELAY_MS, starts CHILDREN `sleep CHILD_SECS` processes, waits for them, then holds
    /// HOLD_SECS. The marker is only there to be matched by a cmdline selector.
    Forker {
        #[arg(long)]
        marker: String,
        #[arg(long, default_value_t = 500)]
        delay_ms: u64,
        #[arg(long, default_value_t = 2)]
        children: usize,
        #[arg(long, default_value_t = 2.0)]
        child_secs: f64,
        #[arg(long, default_value_t = 1.0)]
        hold_secs: f64,
    },
    /// The synthetic pipeline: starts the three stages and drives requests through them.
    Pipeline {
        /// Requests per second sent to stt; 0 sends the next one as soon as the last returns
        /// and prints the throughput at the end (`OPS_PER_SEC n`, the benchmark).
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        secs: Option<f64>,
        /// Wait this long after the stages start before sending.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Requests per client connection (a user session); each new connection makes every
        /// stage connect to the next. 0: one connection for the whole run.
        #[arg(long, default_value_t = 20)]
        requests_per_connection: u64,
    },
    /// One pipeline stage (started by `pipeline`).
    Stage {
        name: String,
        #[arg(long)]
        next: Option<String>,
    },
    /// A helper process forked by the stt stage, like a PyTorch dataloader worker.
    Dataloader,
    /// After DELAY_MS, COUNT clock_nanosleep calls of MS milliseconds each.
    Nanosleep {
        #[arg(long, default_value_t = 5)]
        ms: u64,
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// After DELAY_MS, COUNT opens of a path that does not exist (each fails with ENOENT).
    Failopen {
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// A listener with a backlog of 0 that accepts one connection every ACCEPT_EVERY_MS: a
    /// client arriving while one connection waits has its SYN dropped and retransmitted.
    SlowServer {
        #[arg(long, default_value_t = 500)]
        accept_every_ms: u64,
    },
    /// COUNT sequential connects to ADDR, printing each one's duration (`CONNECT_MS x`).
    Connector {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 5)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Accepts connections and discards what they send.
    BulkServer,
    /// Sends as fast as the connection takes for SECS seconds.
    BulkClient {
        #[arg(long)]
        addr: String,
        /// SO_SNDBUF: bounds the data in flight, so a rate limit gives a steady RTT, no drops.
        #[arg(long)]
        sndbuf: Option<i32>,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// After DELAY_MS, COUNT connections to its own listener, each sending a request and
    /// reading the echo.
    Talker {
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Opens one connection to its own listener at once, then after DELAY_MS sends COUNT
    /// requests over it (a service connected before the agent started).
    Persistent {
        #[arg(long, default_value_t = 20)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Echoes lines on 127.0.0.1:PORT (the tag only names it for a cmdline selector).
    EchoServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        tag: String,
    },
    /// One connection to ADDR, then COUNT request/response exchanges on it.
    Requester {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 20)]
        count: u32,
    },
    /// A tight loop of cheap syscalls (getppid) for SECS; prints `OPS_PER_SEC n`.
    SyscallLoop {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// For SECS: connections to its own listener with data, and connects to a closed port.
    Flood {
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// Benchmark: pipe ping-pong between two threads on one CPU; prints `OPS_PER_SEC n`.
    Pingpong {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 1)]
        cpu: usize,
        /// Stop, both threads blocked, before and after the measured run: after a few round
        /// trips it prints READY and waits for a line on stdin, and after OPS_PER_SEC for
        /// stdin to close, so that whoever counts switches reads the kernel's counts and the
        /// agent's at the same point.
        #[arg(long)]
        hold: bool,
    },
    /// Benchmark: loopback TCP request/response with a connection per 8 requests.
    TcpRr {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Benchmark: fixed units of computation on CPU 1.
    CpuLoop {
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// 40 distinct syscalls every half second for SECS (series for the scrape benchmark).
    SyscallMix {
        #[arg(long, default_value_t = 60.0)]
        secs: f64,
        /// Only there for a cmdline selector to tell the processes apart.
        #[arg(long, default_value = "")]
        tag: String,
    },
}

/// A TCP listener on loopback with the given accept backlog (std always asks for 128).
fn listen_with_backlog(backlog: i32) -> anyhow::Result<TcpListener> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on a fresh fd, handed to TcpListener which then owns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        if libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
            || libc::listen(fd, backlog) != 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(listener)
    }
}

fn announce(listener: &TcpListener) -> anyhow::Result<()> {
    println!("LISTEN {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    Ok(())
}

/// Echoes one line per connection on a thread per connection.
fn echo_server(listener: TcpListener) {
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(&conn);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if (&conn).write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
}

fn request(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"hello pipeline\n")?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    Ok(())
}

/// A loopback port nothing listens on (bound, then closed).
fn closed_port() -> anyhow::Result<std::net::SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Sets thread `tid`'s CPU affinity to `cpu` alone.
fn pin_thread(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn hop(threads: usize, period: Duration, secs: f64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let tx = tx.clone();
            thread::spawn(move || {
                // SAFETY: plain syscall.
                let _ = tx.send(unsafe { libc::gettid() });
                while Instant::now() < end {
                    std::hint::black_box(spin(Duration::from_millis(10)));
                }
            })
        })
        .collect();
    let tids: Vec<libc::pid_t> = rx.iter().take(threads).collect();
    let mut cpu = 0;
    while Instant::now() < end {
        for &tid in &tids {
            pin_thread(tid, cpu).with_context(|| format!("moving thread {tid} to CPU {cpu}"))?;
        }
        cpu = 1 - cpu;
        thread::sleep(period);
    }
    for w in workers {
        w.join().expect("hop thread panicked");
    }
    Ok(())
}

/// Burns CPU for `d` (wall clock, so preemption makes it take longer, as real work would).
fn spin(d: Duration) -> u64 {
    let end = Instant::now() + d;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while Instant::now() < end {
        for _ in 0..1000 {
            x = x.rotate_left(7) ^ x.wrapping_mul(31);
        }
    }
    x
}

fn die_with_parent() {
    // SAFETY: plain prctl; a stage must not outlive the pipeline driver.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

fn stage_work(name: &str) -> anyhow::Result<()> {
    let mut sink = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    match name {
        // Speech to text: feature extraction (CPU) then waiting on the "model" (sleep).
        "stt" => {
            spin(Duration::from_millis(4));
            let mut buf = [0u8; 4096];
            let mut zero = std::fs::File::open("/dev/zero")?;
            for _ in 0..32 {
                zero.read_exact(&mut buf)?;
            }
            thread::sleep(Duration::from_millis(2));
        }
        "mt" => {
            spin(Duration::from_millis(3));
            thread::sleep(Duration::from_millis(1));
        }
        // Text to speech: synthesis (CPU) and many small audio writes (syscalls).
        _ => {
            spin(Duration::from_millis(6));
            for _ in 0..64 {
                sink.write_all(&[0u8; 512])?;
            }
        }
    }
    Ok(())
}

fn stage(name: &str, next: Option<&str>) -> anyhow::Result<()> {
    die_with_parent();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("LISTEN {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    if name == "stt" {
        // Children of a tracked process belong to its target, whatever their command line.
        let exe = std::env::current_exe()?;
        Command::new(exe).arg("dataloader").spawn()?;
    }
    let spans = otel::Spans::from_env(name).map(std::sync::Arc::new);
    for conn in listener.incoming() {
        let conn = conn?;
        let name = name.to_owned();
        let next = next.map(str::to_owned);
        let spans = spans.clone();
        thread::spawn(move || {
            if let Err(e) = serve(&name, next.as_deref(), conn, spans.as_deref()) {
                eprintln!("{name}: connection ended: {e}");
            }
        });
    }
    Ok(())
}

/// The injected slow stage of the demo: one tts request in ten synthesizes a long utterance.
#[inline(never)]
fn synthesize_long_utterance() -> u64 {
    spin(Duration::from_millis(150))
}

/// The span each stage records per request (stt's covers the whole chain: time to first token).
fn span_name(stage: &str) -> &'static str {
    match stage {
        "stt" => "stt_first_token",
        "mt" => "mt_translate",
        _ => "tts_first_sample",
    }
}

fn serve(
    name: &str,
    next: Option<&str>,
    conn: TcpStream,
    spans: Option<&otel::Spans>,
) -> anyhow::Result<()> {
    conn.set_nodelay(true)?;
    let mut downstream = match next {
        Some(addr) => {
            let s = TcpStream::connect(addr)
                .with_context(|| format!("{name}: connecting to {addr}"))?;
            s.set_nodelay(true)?;
            Some((BufReader::new(s.try_clone()?), s))
        }
        None => None,
    };
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut handle = || -> anyhow::Result<()> {
            stage_work(name)?;
            if name == "tts" && line.trim().parse::<u64>().is_ok_and(|id| id % 10 == 7) {
                std::hint::black_box(synthesize_long_utterance());
            }
            if let Some((down_r, down_w)) = downstream.as_mut() {
                down_w.write_all(line.as_bytes())?;
                let mut reply = String::new();
                down_r.read_line(&mut reply)?;
            }
            writer.write_all(line.as_bytes())?;
            Ok(())
        };
        match spans {
            Some(s) => s.span(span_name(name), handle)?,
            None => handle()?,
        }
    }
}

fn churn(rate: f64, secs: f64, threads: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let start = Instant::now();
    let mut running: Vec<std::process::Child> = Vec::new();
    let mut started = 0u64;
    let mut next = start;
    while start.elapsed().as_secs_f64() < secs {
        running.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if running.len() < 64 {
            running.push(
                Command::new(&exe)
                    .args(["churn-child", "--threads", &threads.to_string()])
                    .spawn()?,
            );
            started += 1;
        }
        next += period;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
    }
    for mut c in running {
        let _ = c.wait();
    }
    println!("CHILDREN {started}");
    Ok(())
}

fn pipeline(
    rate: f64,
    secs: Option<f64>,
    delay_ms: u64,
    requests_per_connection: u64,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut next: Option<String> = None;
    let mut children = Vec::new();
    for name in ["tts", "mt", "stt"] {
        let mut cmd = Command::new(&exe);
        cmd.args(["stage", name]).stdout(Stdio::piped());
        if let Some(n) = &next {
            cmd.args(["--next", n]);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting stage {name}"))?;
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first)?;
        let Some(addr) = first.strip_prefix("LISTEN ") else {
            bail!("stage {name} said {first:?}")
        };
        next = Some(addr.trim().to_owned());
        children.push(child);
    }
    let stt = next.expect("three stages");
    let connect = || -> anyhow::Result<(BufReader<TcpStream>, TcpStream)> {
        let conn = TcpStream::connect(&stt)?;
        conn.set_nodelay(true)?;
        Ok((BufReader::new(conn.try_clone()?), conn))
    };
    let (mut reader, mut writer) = connect()?;
    thread::sleep(Duration::from_millis(delay_ms));
    let start = Instant::now();
    let period = if rate > 0.0 {
        Duration::from_secs_f64(1.0 / rate)
    } else {
        Duration::ZERO
    };
    let mut line = String::new();
    let mut done = 0u64;
    for id in 0u64.. {
        if secs.is_some_and(|s| start.elapsed().as_secs_f64() >= s) {
            break;
        }
        let t0 = Instant::now();
        if requests_per_connection > 0 && id > 0 && id % requests_per_connection == 0 {
            (reader, writer) = connect()?;
        }
        writeln!(writer, "{id}")?;
        line.clear();
        reader.read_line(&mut line)?;
        done += 1;
        if let Some(rest) = period.checked_sub(t0.elapsed()) {
            thread::sleep(rest);
        }
    }
    if rate <= 0.0 {
        println!(
            "OPS_PER_SEC {:.1}",
            done as f64 / start.elapsed().as_secs_f64()
        );
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Busy { threads, cpu, secs } => {
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    thread::spawn(move || {
                        pin_to(cpu)?;
                        while Instant::now() < end {
                            std::hint::black_box(spin(Duration::from_millis(10)));
                        }
                        anyhow::Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("busy thread panicked")?;
            }
        }
        Cmd::Hop {
            threads,
            period_ms,
            secs,
        } => hop(threads, Duration::from_millis(period_ms), secs)?,
        Cmd::Quiet {
            cpu,
            period_ms,
            secs,
        } => {
            pin_to(cpu)?;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                thread::sleep(Duration::from_millis(period_ms));
                std::hint::black_box(spin(Duration::from_micros(50)));
            }
        }
        Cmd::Churn {
            marker: _,
            rate,
            secs,
            threads,
        } => churn(rate, secs, threads)?,
        Cmd::ChurnChild { threads } => {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    thread::spawn(|| {
                        let mut buf = [0u8; 512];
                        if let Ok(mut f) = std::fs::File::open("/dev/zero") {
                            for _ in 0..16 {
                                let _ = f.read(&mut buf);
                            }
                        }
                        std::hint::black_box(spin(Duration::from_millis(1)));
                        thread::sleep(Duration::from_millis(2));
                    })
                })
                .collect();
            for w in workers {
                let _ = w.join();
            }
        }
        Cmd::Forker {
            marker: _,
            delay_ms,
            children,
            child_secs,
            hold_secs,
        } => {
            thread::sleep(Duration::from_millis(delay_ms));
            let mut kids: Vec<_> = (0..children)
                .map(|_| Command::new("sleep").arg(child_secs.to_string()).spawn())
                .collect::<Result<_, _>>()?;
            for k in &mut kids {
                k.wait()?;
            }
            thread::sleep(Duration::from_secs_f64(hold_secs));
        }
        Cmd::Pipeline {
            rate,
            secs,
            delay_ms,
            requests_per_connection,
        } => pipeline(rate, secs, delay_ms, requests_per_connection)?,
        Cmd::Stage { name, next } => stage(&name, next.as_deref())?,
        Cmd::Nanosleep {
            ms,
            count,
            delay_ms,
        } => {
            thread::sleep(Duration::from_millis(delay_ms));
            let ts = libc::timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000) as i64,
            };
            for _ in 0..count {
                // SAFETY: valid timespec, no remainder wanted.
                unsafe {
                    libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut())
                };
            }
        }
        Cmd::Failopen {
            count,
            delay_ms,
            hold_ms,
        } => {
            thread::sleep(Duration::from_millis(delay_ms));
            for i in 0..count {
                let path = format!("/nonexistent-pipeprobe-test/{i}");
                if std::fs::File::open(&path).is_ok() {
                    bail!("{path} exists");
                }
            }
            thread::sleep(Duration::from_millis(hold_ms));
        }
        Cmd::SlowServer { accept_every_ms } => {
            let listener = listen_with_backlog(0)?;
            announce(&listener)?;
            let mut held = Vec::new();
            loop {
                thread::sleep(Duration::from_millis(accept_every_ms));
                held.push(listener.accept()?.0);
            }
        }
        Cmd::Connector {
            addr,
            count,
            delay_ms,
        } => {
            thread::sleep(Duration::from_millis(delay_ms));
            let mut held = Vec::new();
            for _ in 0..count {
                let t0 = Instant::now();
                match TcpStream::connect(&addr) {
                    Ok(s) => {
                        held.push(s);
                        println!("CONNECT_MS {:.3}", t0.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => println!("CONNECT_ERROR {e}"),
                }
            }
        }
        Cmd::BulkServer => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            announce(&listener)?;
            for conn in listener.incoming() {
                let mut conn = conn?;
                thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
                });
            }
        }
        Cmd::BulkClient {
            addr,
            sndbuf,
            secs,
            delay_ms,
        } => {
            thread::sleep(Duration::from_millis(delay_ms));
            let mut s = TcpStream::connect(&addr)?;
            if let Some(bytes) = sndbuf {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setsockopt on our own socket with a valid int.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        (&raw const bytes).cast(),
                        std::mem::size_of::<i32>() as u32,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
            }
            println!("LOCAL {}", s.local_addr()?);
            std::io::stdout().flush()?;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let buf = vec![0x5au8; 1 << 14];
            while Instant::now() < end {
                s.write_all(&buf)?;
            }
        }
        Cmd::Talker {
            count,
            delay_ms,
            hold_ms,
        } => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            echo_server(listener);
            thread::sleep(Duration::from_millis(delay_ms));
            for _ in 0..count {
                request(addr)?;
            }
            thread::sleep(Duration::from_millis(hold_ms));
        }
        Cmd::Persistent { count, delay_ms } => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            echo_server(listener);
            let conn = TcpStream::connect(addr)?;
            let mut reader = BufReader::new(conn.try_clone()?);
            let mut writer = conn;
            thread::sleep(Duration::from_millis(delay_ms));
            let mut line = String::new();
            for i in 0..count {
                writeln!(writer, "request {i}")?;
                line.clear();
                reader.read_line(&mut line)?;
                thread::sleep(Duration::from_millis(5));
            }
        }
        Cmd::EchoServer { port, tag: _ } => {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            announce(&listener)?;
            echo_server(listener);
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
        Cmd::Requester { addr, count } => {
            let conn = TcpStream::connect(&addr)?;
            let mut reader = BufReader::new(conn.try_clone()?);
            let mut writer = conn;
            let mut line = String::new();
            for i in 0..count {
                writeln!(writer, "request {i}")?;
                line.clear();
                reader.read_line(&mut line)?;
            }
        }
        Cmd::SyscallLoop { secs, delay_ms } => {
            thread::sleep(Duration::from_millis(delay_ms));
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(secs);
            let mut ops = 0u64;
            while Instant::now() < end {
                for _ in 0..1000 {
                    // SAFETY: getppid has no preconditions; it is the cheapest real syscall.
                    std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
                }
                ops += 1000;
            }
            println!("OPS {ops}");
            println!(
                "OPS_PER_SEC {:.0}",
                ops as f64 / start.elapsed().as_secs_f64()
            );
        }
        Cmd::Flood { secs } => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            echo_server(listener);
            let closed = closed_port()?;
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                request(addr)?;
                let _ = TcpStream::connect(closed);
            }
        }
        Cmd::Pingpong {
            secs,
            delay_ms,
            cpu,
            hold,
        } => bench::pingpong(secs, delay_ms, cpu, hold)?,
        Cmd::TcpRr { secs, delay_ms } => bench::tcp_rr(secs, delay_ms)?,
        Cmd::CpuLoop { secs, delay_ms } => bench::cpu_loop(secs, delay_ms)?,
        Cmd::SyscallMix { secs, .. } => bench::syscall_mix(secs)?,
        Cmd::Dataloader => {
            die_with_parent();
            loop {
                spin(Duration::from_millis(2));
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}
