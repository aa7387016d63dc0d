//! Throughput loops for `cargo xtask bench`. Each waits `delay_ms` (the tool under test
//! attaches meanwhile), runs for `secs` and prints `OPS_PER_SEC n`.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::pin_to;

/// Runs `batch` (which returns the operations it did) for `secs` after `delay_ms`, then prints
/// the rate.
fn measure(
    secs: f64,
    delay_ms: u64,
    mut batch: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<()> {
    thread::sleep(Duration::from_millis(delay_ms));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut ops = 0u64;
    while Instant::now() < end {
        ops += batch()?;
    }
    println!(
        "OPS_PER_SEC {:.0}",
        ops as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn pipe() -> anyhow::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both fds are fresh and owned from here.
    unsafe {
        Ok((
            OwnedFd::from_raw_fd(fds[0]).into(),
            OwnedFd::from_raw_fd(fds[1]).into(),
        ))
    }
}

/// Two threads pinned to `cpu` pass a byte back and forth over two pipes: every round trip
/// is two wake-ups and two context switches. With `hold`, it stops before and after the
/// measured run (`Cmd::Pingpong`).
pub fn pingpong(secs: f64, delay_ms: u64, cpu: usize, hold: bool) -> anyhow::Result<()> {
    let (mut ping_r, mut ping_w) = pipe()?;
    let (mut pong_r, mut pong_w) = pipe()?;
    thread::spawn(move || -> anyhow::Result<()> {
        pin_to(cpu)?;
        let mut b = [0u8; 1];
        loop {
            ping_r.read_exact(&mut b)?;
            pong_w.write_all(&b)?;
        }
    });
    pin_to(cpu)?;
    let mut b = [0u8; 1];
    let mut round_trips = |n: u64| -> anyhow::Result<u64> {
        for _ in 0..n {
            ping_w.write_all(&b)?;
            pong_r.read_exact(&mut b)?;
        }
        Ok(n)
    };
    if !hold {
        return measure(secs, delay_ms, || round_trips(100));
    }
    thread::sleep(Duration::from_millis(delay_ms));
    // Both threads leave the CPU at least once more before READY, now that they are targets.
    round_trips(10)?;
    println!("READY");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    measure(secs, 0, || round_trips(100))?;
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

/// Loopback request/response: each operation connects, exchanges 8 requests of 64 bytes with
/// a server thread, and closes with a reset (no TIME_WAIT pile-up over a long benchmark).
pub fn tcp_rr(secs: f64, delay_ms: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {}
            });
        }
    });
    let mut buf = [7u8; 64];
    measure(secs, delay_ms, || {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        for _ in 0..8 {
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads a linger struct of the size given.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        Ok(8)
    })
}

/// Pure computation on one CPU, in fixed units of work (not time): what sampling costs it
/// shows as fewer units.
pub fn cpu_loop(secs: f64, delay_ms: u64) -> anyhow::Result<()> {
    pin_to(1)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    measure(secs, delay_ms, || {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.rotate_left(7) ^ x.wrapping_mul(31));
        }
        Ok(1)
    })
}

/// Syscalls harmless with these arguments (-1 is a bad fd; null pointers fail with EFAULT):
/// `syscall_mix` makes each of them once, for the scrape benchmark's series.
const MIX: [(libc::c_long, libc::c_long); 40] = [
    (libc::SYS_getpid, 0),
    (libc::SYS_getppid, 0),
    (libc::SYS_getuid, 0),
    (libc::SYS_geteuid, 0),
    (libc::SYS_getgid, 0),
    (libc::SYS_getegid, 0),
    (libc::SYS_gettid, 0),
    (libc::SYS_getpgrp, 0),
    (libc::SYS_getpgid, 0),
    (libc::SYS_getsid, 0),
    (libc::SYS_sched_yield, 0),
    (libc::SYS_times, 0),
    (libc::SYS_uname, 0),
    (libc::SYS_sysinfo, 0),
    (libc::SYS_getcwd, 0),
    (libc::SYS_clock_getres, 0),
    (libc::SYS_gettimeofday, 0),
    (libc::SYS_sched_getscheduler, 0),
    (libc::SYS_sched_getparam, 0),
    (libc::SYS_getitimer, 0),
    (libc::SYS_sigaltstack, 0),
    (libc::SYS_getgroups, 0),
    (libc::SYS_capget, 0),
    (libc::SYS_getcpu, 0),
    (libc::SYS_get_robust_list, 0),
    (libc::SYS_getresuid, 0),
    (libc::SYS_getresgid, 0),
    (libc::SYS_sched_get_priority_max, 0),
    (libc::SYS_sched_get_priority_min, 0),
    (libc::SYS_alarm, 0),
    (libc::SYS_getrlimit, 0),
    (libc::SYS_getrusage, 0),
    (libc::SYS_dup, -1),
    (libc::SYS_close, -1),
    (libc::SYS_fsync, -1),
    (libc::SYS_fdatasync, -1),
    (libc::SYS_fchdir, -1),
    (libc::SYS_lseek, -1),
    (libc::SYS_fstat, -1),
    (libc::SYS_flock, -1),
];

/// Makes each of 40 distinct syscalls, prints READY, and makes them again every half second for
/// `secs`: a process matched by its command line is tracked only once the agent has read its
/// exec event, which can come after its first round (a full bench run once found 1976 of its
/// 2000 series).
pub fn syscall_mix(secs: f64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mix = || {
        for (nr, arg) in MIX {
            // SAFETY: see MIX: these calls only read state or fail on their bad arguments.
            unsafe { libc::syscall(nr, arg, 0, 0) };
        }
    };
    mix();
    println!("READY");
    std::io::stdout().flush()?;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(500));
        mix();
    }
    Ok(())
}
