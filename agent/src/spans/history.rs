//! The look-back history of per-thread totals (see the module docs of `spans`).
//!
//! A sampler thread reads every tracked thread's `ThreadState` from its task storage (looked up
//! by the thread's pidfd) every `TICK` and keeps, per thread, the points where its totals
//! changed, for `window`. Totals include the episode in progress (blocked since, runnable since,
//! in a syscall since), so they grow continuously, not in steps when an episode ends; between
//! two ticks they are interpolated, so the value at any instant is known to within one tick.
//!
//! TCP retransmits are counted per process, not per thread (they happen in softirq and timer
//! context, charged to the socket's owning process): the kernel keeps them in PROC_RETRANS,
//! and they are sampled with the process's leading thread, so a span of any of its threads
//! gets its process's retransmits over its window.
use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::{
    sched::SchedOnCpu,
    spans::{ThreadState, ThreadTotals},
    syscalls::SyscallOnCpu,
};
use aya::maps::{MapData, PerCpuArray};

use crate::tracker::SharedTracked;

/// How often totals are sampled: the precision of a span's breakdown at each of its ends.
pub const TICK: Duration = Duration::from_millis(20);
/// How often the threads of tracked processes are listed again: a thread's history starts
/// at most this long after it does.
const RESCAN: Duration = Duration::from_millis(250);
/// Threads sampled at most (each costs one map lookup per tick and a pidfd).
pub const MAX_THREADS: usize = 4096;

/// Nanoseconds of CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds since the Unix epoch, the clock of OTLP timestamps.
pub fn realtime_ns() -> u64 {
    clock(libc::CLOCK_REALTIME)
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A thread's totals, and for a process's leading thread its process's TCP retransmits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    thread: ThreadTotals,
    retransmits: u64,
}

/// A change of a thread's totals to `after` at `t1`, from the previous change's totals (or the
/// baseline) at `t1 - since_prev_ns` (the previous tick). 56 bytes: a busy thread adds one per
/// tick for the whole window.
#[derive(Debug, Clone, Copy)]
struct Change {
    t1: u64,
    since_prev_ns: u32,
    after: Totals,
}

impl Change {
    fn t0(&self) -> u64 {
        self.t1 - u64::from(self.since_prev_ns)
    }
}

#[derive(Debug, Default)]
struct Thread {
    tgid: u32,
    pidfd: Option<OwnedFd>,
    /// Monotonic time of the first sample: the totals before it are not history.
    since: Option<u64>,
    /// The totals before the oldest change kept.
    base: Totals,
    last: Totals,
    changes: VecDeque<Change>,
}

impl Thread {
    /// Totals at monotonic time `t`, interpolated within the tick where they changed.
    fn at(&self, t: u64) -> Totals {
        let Some(i) = self.changes.iter().position(|c| c.t1 > t) else {
            return self.last;
        };
        let c = &self.changes[i];
        let before = if i == 0 {
            self.base
        } else {
            self.changes[i - 1].after
        };
        if t <= c.t0() {
            return before;
        }
        let f = (t - c.t0()) as f64 / (c.t1 - c.t0()).max(1) as f64;
        let lerp = |a: u64, b: u64| a + ((b.saturating_sub(a)) as f64 * f) as u64;
        let (b, a) = (&before.thread, &c.after.thread);
        Totals {
            thread: ThreadTotals {
                runq_ns: lerp(b.runq_ns, a.runq_ns),
                blocked_ns: lerp(b.blocked_ns, a.blocked_ns),
                syscall_ns: lerp(b.syscall_ns, a.syscall_ns),
                syscalls: lerp(b.syscalls, a.syscalls),
            },
            retransmits: lerp(before.retransmits, c.after.retransmits),
        }
    }
}

/// What happened to a thread or process during a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Breakdown {
    pub runq_ns: u64,
    pub blocked_ns: u64,
    pub syscall_ns: u64,
    pub syscalls: u64,
    /// TCP segments the process retransmitted (always per process); None when its leading
    /// thread was not sampled over the whole window.
    pub retransmits: Option<u64>,
    /// Threads it covers.
    pub threads: usize,
}

#[derive(Debug, Default)]
pub struct History {
    threads: HashMap<u32, Thread>,
    /// Monotonic time of the last sample: windows ending later are not complete yet.
    pub sampled_to: u64,
    /// Monotonic time of the oldest data kept.
    kept_from: u64,
}

impl History {
    /// Totals of thread `tid` (if given and known) or of all threads of `pid` over the
    /// monotonic window [start, end]; None when the process is not sampled or the window
    /// starts before the history does.
    pub fn window(&self, pid: u32, tid: Option<u32>, start: u64, end: u64) -> Option<Breakdown> {
        if start < self.kept_from {
            return None;
        }
        let mut b = Breakdown::default();
        let one = tid.filter(|t| self.threads.get(t).is_some_and(|th| th.tgid == pid));
        for (t, th) in &self.threads {
            if th.tgid != pid {
                continue;
            }
            let whole = th.since.is_some_and(|since| since <= start);
            if *t == pid && whole {
                let (a, z) = (th.at(start), th.at(end));
                b.retransmits = Some(z.retransmits.saturating_sub(a.retransmits));
            }
            if one.is_some_and(|o| o != *t) {
                continue;
            }
            // Sampled only since after the window began: its share is unknown, and a guess
            // would be wrong, so the span goes unenriched rather than misattributed.
            if !whole {
                return None;
            }
            let (a, z) = (th.at(start).thread, th.at(end).thread);
            b.runq_ns += z.runq_ns.saturating_sub(a.runq_ns);
            b.blocked_ns += z.blocked_ns.saturating_sub(a.blocked_ns);
            b.syscall_ns += z.syscall_ns.saturating_sub(a.syscall_ns);
            b.syscalls += z.syscalls.saturating_sub(a.syscalls);
            b.threads += 1;
        }
        (b.threads > 0).then_some(b)
    }

    /// Whether `pid` has sampled threads.
    pub fn knows(&self, pid: u32) -> bool {
        self.threads.values().any(|t| t.tgid == pid)
    }
}

pub type SharedHistory = Arc<Mutex<History>>;

/// The thread's totals as of `now` (CLOCK_MONOTONIC; `sched_now` the same instant on the
/// scheduler's clock, which the run-queue and blocked times are in), counting the episode in
/// progress (on CPU, off it, inside a syscall) up to then: the kernel writes a thread's
/// scheduler times only when it leaves a CPU, and a 1.5 s sleep landing in one tick would
/// otherwise be spread over that tick. Without `sched_now` they count to the thread's last
/// switch-out.
///
/// `sched` is the CPU the thread runs on, if one does (read before `state`, so a switch-out in
/// between shows as a switch-in older than `state`'s last switch-out, and is ignored); `syscalls`
/// the thread's part of its syscalls that the kernel keeps on that CPU until it leaves
/// (agent-ebpf/src/syscalls.rs).
fn totals_at(
    state: &ThreadState,
    sched: Option<&SchedOnCpu>,
    syscalls: Option<&SyscallOnCpu>,
    now: u64,
    sched_now: Option<u64>,
) -> ThreadTotals {
    let open = |since: u64, now: u64| {
        if since != 0 {
            now.saturating_sub(since)
        } else {
            0
        }
    };
    let mut t = state.totals;
    let s = &state.sched;
    if s.since_ns != 0 {
        let mut oncpu = s.oncpu_ns;
        let end = match (sched_now, sched.filter(|c| c.in_ns >= s.out_ns)) {
            (Some(end), Some(c)) => {
                oncpu += end.saturating_sub(c.in_ns);
                t.runq_ns += c.wait_ns;
                end
            }
            (Some(end), None) => {
                // Off CPU since its switch-out: a preempted thread waits on a run queue; a blocked
                // one is counted blocked until its switch-in says how long its wakeup waited.
                if s.preempted != 0 {
                    t.runq_ns += open(s.out_ns, end);
                }
                end
            }
            (None, _) => s.out_ns,
        };
        t.blocked_ns = end
            .saturating_sub(s.since_ns)
            .saturating_sub(oncpu)
            .saturating_sub(t.runq_ns);
    }
    let mut in_flight = state.syscall.ts_ns;
    if let Some(c) = syscalls {
        t.syscall_ns += c.syscall_ns;
        t.syscalls += c.syscalls;
        if c.start.ts_ns != 0 {
            in_flight = c.start.ts_ns;
        }
    }
    t.syscall_ns += open(in_flight, now);
    t
}

/// What each CPU's slot of a one-entry per-CPU map holds for the thread running there, by
/// thread id: `tid` says whose a slot is, or None for an empty one (see `totals_at`). The
/// scheduler's slots name the tracked thread on each CPU, the syscall probe's its syscalls kept
/// there.
fn by_thread<T: aya::Pod>(
    map: Option<&PerCpuArray<MapData, T>>,
    tid: impl Fn(&T) -> Option<u32>,
) -> HashMap<u32, T> {
    let Some(values) = map.and_then(|m| m.get(&0, 0).ok()) else {
        return HashMap::new();
    };
    values.iter().filter_map(|c| Some((tid(c)?, *c))).collect()
}

/// `now` with each field at least what it was at `last`. The kernel moves a thread's syscalls
/// from its CPU to its task storage at any moment, and one read of each between the two can miss
/// them for a tick, never count them twice. A blocked thread's wait after its wakeup counts as
/// blocked until its switch-in says how long it was (see `totals_at`): blocked time then holds
/// still while the run-queue time takes the wait, so a wait that straddles a tick is counted on
/// both sides for at most that tick's part of it.
fn at_least(mut now: ThreadTotals, last: &ThreadTotals) -> ThreadTotals {
    now.syscall_ns = now.syscall_ns.max(last.syscall_ns);
    now.syscalls = now.syscalls.max(last.syscalls);
    now.runq_ns = now.runq_ns.max(last.runq_ns);
    now.blocked_ns = now.blocked_ns.max(last.blocked_ns);
    now
}

/// Looks up a thread's state in the task-storage map by its pidfd.
fn lookup(map_fd: RawFd, pidfd: RawFd) -> Option<ThreadState> {
    let key: u32 = pidfd as u32;
    let mut value = ThreadState::default();
    let mut attr = crate::ebpf::zeroed_attr();
    attr.__bindgen_anon_2.map_fd = map_fd as u32;
    attr.__bindgen_anon_2.key = &raw const key as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = &raw mut value as u64;
    // SAFETY: BPF_MAP_LOOKUP_ELEM reads the key and writes one value of the map's value size.
    let r =
        unsafe { crate::ebpf::bpf(aya_obj::generated::bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) };
    r.is_ok().then_some(value)
}

fn pidfd_open(tid: u32, thread: bool) -> Option<OwnedFd> {
    // PIDFD_THREAD (Linux 6.9) opens a pidfd for a thread that does not lead its group.
    let flags = if thread { libc::O_EXCL } else { 0 };
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::pid_t, flags) };
    // SAFETY: fresh fd.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Samples every tracked thread's totals until the process ends. `map` keeps the task storage
/// map open; `window` bounds what is kept.
pub fn spawn(
    maps: super::HistoryMaps,
    tracked: SharedTracked,
    window: Duration,
) -> std::io::Result<SharedHistory> {
    let shared = SharedHistory::default();
    let history = shared.clone();
    std::thread::Builder::new()
        .name("pipeprobe-spans".into())
        .spawn(move || {
            let super::HistoryMaps {
                threads: map,
                proc_retrans,
                sched_clock,
                syscalls_on_cpu: syscalls_on_cpu_map,
                sched_on_cpu: sched_on_cpu_map,
            } = maps;
            let mut clock_failed = false;
            let aya::maps::Map::Unsupported(data) = &map else {
                tracing::warn!("the THREAD map is not task storage; span breakdowns are off");
                return;
            };
            let map_fd = std::os::fd::AsFd::as_fd(data.fd()).as_raw_fd();
            let mut last_scan = 0u64;
            let mut prev_tick = monotonic_ns();
            loop {
                std::thread::sleep(TICK);
                let now = monotonic_ns();
                let Ok(mut h) = history.lock() else { return };
                if now.saturating_sub(last_scan) >= RESCAN.as_nanos() as u64 {
                    rescan(&mut h, &tracked);
                    last_scan = now;
                }
                // Read each tick: the scheduler's clock drifts from CLOCK_MONOTONIC.
                let sched_ahead = sched_clock.as_ref().and_then(|c| {
                    c.ahead_ns()
                        .map_err(|e| {
                            if !std::mem::replace(&mut clock_failed, true) {
                                tracing::warn!("{e}; {}", crate::clock::WITHOUT_IT);
                            }
                        })
                        .ok()
                });
                // The threads on CPU before the task storage, the syscalls on CPU after it: see
                // `totals_at` and `at_least`.
                let running = by_thread(sched_on_cpu_map.as_ref(), |c: &SchedOnCpu| {
                    (c.tid != 0).then_some(c.tid)
                });
                let states: Vec<(u32, ThreadState)> = h
                    .threads
                    .iter()
                    .filter_map(|(tid, th)| {
                        let fd = th.pidfd.as_ref()?;
                        Some((*tid, lookup(map_fd, fd.as_raw_fd())?))
                    })
                    .collect();
                let on_cpu = by_thread(syscalls_on_cpu_map.as_ref(), |c: &SyscallOnCpu| {
                    (c.regs != 0).then_some(c.tid)
                });
                for (tid, state) in states {
                    let Some(th) = h.threads.get_mut(&tid) else {
                        continue;
                    };
                    let retransmits = proc_retrans
                        .as_ref()
                        .filter(|_| tid == th.tgid)
                        .and_then(|m| m.get(&th.tgid, 0).ok())
                        .unwrap_or(0);
                    let totals = Totals {
                        thread: {
                            let now = monotonic_ns();
                            let sched_now = sched_ahead.map(|a| now.wrapping_add(a));
                            let t = totals_at(
                                &state,
                                running.get(&tid),
                                on_cpu.get(&tid),
                                now,
                                sched_now,
                            );
                            at_least(t, &th.last.thread)
                        },
                        retransmits,
                    };
                    if th.since.is_none() {
                        // The first look is the baseline, whatever happened before it.
                        th.since = Some(now);
                        th.base = totals;
                        th.last = totals;
                    } else if totals != th.last {
                        th.changes.push_back(Change {
                            t1: now,
                            since_prev_ns: u32::try_from(now - prev_tick).unwrap_or(u32::MAX),
                            after: totals,
                        });
                        th.last = totals;
                    }
                    let horizon = now.saturating_sub(window.as_nanos() as u64);
                    while th.changes.front().is_some_and(|c| c.t1 < horizon) {
                        if let Some(c) = th.changes.pop_front() {
                            th.base = c.after;
                        }
                    }
                }
                h.sampled_to = now;
                if h.kept_from == 0 {
                    h.kept_from = now;
                }
                h.kept_from = h
                    .kept_from
                    .max(now.saturating_sub(window.as_nanos() as u64));
                prev_tick = now;
            }
        })?;
    Ok(shared)
}

/// Brings the sampled threads in line with the tracked processes' current threads.
fn rescan(h: &mut History, tracked: &SharedTracked) {
    let pids: Vec<u32> = tracked
        .read()
        .map(|t| t.keys().copied().collect())
        .unwrap_or_default();
    let mut alive = std::collections::HashSet::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for tid in dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            alive.insert(tid);
            if h.threads.contains_key(&tid) || h.threads.len() >= MAX_THREADS {
                continue;
            }
            h.threads.insert(
                tid,
                Thread {
                    tgid: pid,
                    pidfd: pidfd_open(tid, tid != pid),
                    ..Thread::default()
                },
            );
        }
    }
    // Gone threads keep their history for the window (their spans may still arrive), without
    // their pidfd.
    let horizon = h.kept_from;
    h.threads.retain(|tid, th| {
        if !alive.contains(tid) {
            th.pidfd = None;
        }
        alive.contains(tid) || th.changes.back().is_some_and(|c| c.t1 >= horizon)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(runq: u64) -> Totals {
        Totals {
            thread: ThreadTotals {
                runq_ns: runq,
                ..ThreadTotals::default()
            },
            retransmits: runq / 100,
        }
    }

    #[test]
    fn values_are_interpolated_within_the_changing_tick() {
        let th = Thread {
            tgid: 7,
            pidfd: None,
            since: Some(20),
            base: totals(0),
            last: totals(300),
            changes: VecDeque::from(vec![
                Change {
                    t1: 110,
                    since_prev_ns: 10,
                    after: totals(100),
                },
                Change {
                    t1: 210,
                    since_prev_ns: 10,
                    after: totals(300),
                },
            ]),
        };
        assert_eq!(th.at(50).thread.runq_ns, 0);
        assert_eq!(th.at(105).thread.runq_ns, 50);
        assert_eq!(th.at(150).thread.runq_ns, 100);
        assert_eq!(th.at(205).thread.runq_ns, 200);
        assert_eq!(th.at(500).thread.runq_ns, 300);
        let mut h = History {
            kept_from: 10,
            sampled_to: 600,
            ..History::default()
        };
        h.threads.insert(8, th);
        let b = h.window(7, Some(8), 150, 500).unwrap();
        assert_eq!((b.runq_ns, b.threads), (200, 1));
        // Thread 8 does not lead process 7: no retransmits are known for the process.
        assert_eq!(b.retransmits, None);
        // The leading thread carries its process's retransmits, for spans of any thread.
        let mut leader = Thread {
            tgid: 7,
            since: Some(20),
            ..Thread::default()
        };
        leader.last = totals(700);
        leader.changes.push_back(Change {
            t1: 400,
            since_prev_ns: 100,
            after: totals(700),
        });
        h.threads.insert(7, leader);
        let b = h.window(7, Some(8), 150, 500).unwrap();
        assert_eq!((b.runq_ns, b.threads, b.retransmits), (200, 1, Some(7)));
        // Before the history starts, before the thread was first seen, or for another
        // process: unknown.
        assert!(h.window(7, None, 5, 500).is_none());
        assert!(h.window(7, None, 15, 500).is_none());
        assert!(h.window(9, None, 150, 500).is_none());
    }

    #[test]
    fn a_thread_s_syscalls_on_its_cpu_count_with_its_task_storage() {
        let mut state = ThreadState::default();
        state.totals.syscall_ns = 1_000;
        state.totals.syscalls = 10;
        // A start left in the task storage by a syscall that has since ended on another CPU.
        state.syscall.ts_ns = 50;
        let mut on_cpu = SyscallOnCpu {
            regs: 1,
            tid: 7,
            syscall_ns: 200,
            syscalls: 4,
            ..SyscallOnCpu::default()
        };
        on_cpu.start.ts_ns = 900;
        let t = totals_at(&state, None, Some(&on_cpu), 1_000, None);
        // The syscall in flight on the CPU is open since 900, not since the stale 50.
        assert_eq!((t.syscall_ns, t.syscalls), (1_000 + 200 + 100, 14));
        let alone = totals_at(&state, None, None, 1_000, None);
        assert_eq!((alone.syscall_ns, alone.syscalls), (1_000 + 950, 10));
    }

    #[test]
    fn syscall_totals_missed_for_a_tick_do_not_go_back() {
        let last = ThreadTotals {
            syscall_ns: 500,
            syscalls: 5,
            runq_ns: 9,
            ..ThreadTotals::default()
        };
        // Read between the kernel moving them from the CPU and the storage holding them.
        let dipped = ThreadTotals {
            syscall_ns: 300,
            syscalls: 3,
            runq_ns: 12,
            ..ThreadTotals::default()
        };
        let t = at_least(dipped, &last);
        assert_eq!((t.syscall_ns, t.syscalls, t.runq_ns), (500, 5, 12));
        let grown = ThreadTotals {
            syscall_ns: 800,
            syscalls: 8,
            ..ThreadTotals::default()
        };
        assert_eq!(at_least(grown, &last).syscall_ns, 800);
    }

    /// A thread's storage as its switch-out at 100 left it: counted from 10, 50 ns of that on CPU,
    /// 10 waiting on run queues, 30 blocked.
    fn switched_out(preempted: bool) -> ThreadState {
        let mut state = ThreadState::default();
        state.sched.since_ns = 10;
        state.sched.out_ns = 100;
        state.sched.oncpu_ns = 50;
        state.sched.preempted = u32::from(preempted);
        state.totals.runq_ns = 10;
        state
    }

    #[test]
    fn a_blocked_thread_s_time_off_cpu_counts_blocked_until_its_switch_in() {
        let state = switched_out(false);
        let t = totals_at(&state, None, None, 0, Some(160));
        // 150 since it was first seen: 50 on CPU, 10 waiting, the rest blocked.
        assert_eq!((t.runq_ns, t.blocked_ns), (10, 90));
        // Woken at 170, on CPU since 180 after a 10 ns wait: the wait moves to the run queue.
        let on_cpu = SchedOnCpu {
            tid: 7,
            in_ns: 180,
            wait_ns: 10,
            ..SchedOnCpu::default()
        };
        let t = totals_at(&state, Some(&on_cpu), None, 0, Some(200));
        assert_eq!((t.runq_ns, t.blocked_ns), (20, 100));
        // Without the scheduler's clock: as of its last switch-out.
        let t = totals_at(&state, Some(&on_cpu), None, 0, None);
        assert_eq!((t.runq_ns, t.blocked_ns), (10, 30));
    }

    #[test]
    fn a_preempted_thread_s_time_off_cpu_counts_on_the_run_queue() {
        let t = totals_at(&switched_out(true), None, None, 0, Some(160));
        assert_eq!((t.runq_ns, t.blocked_ns), (70, 30));
    }

    #[test]
    fn a_cpu_read_before_the_thread_left_it_is_older_than_its_storage() {
        // Read on CPU since 40, then it left at 100 before its storage was read.
        let stale = SchedOnCpu {
            tid: 7,
            in_ns: 40,
            wait_ns: 5,
            ..SchedOnCpu::default()
        };
        let t = totals_at(&switched_out(false), Some(&stale), None, 0, Some(160));
        assert_eq!((t.runq_ns, t.blocked_ns), (10, 90));
    }

    #[test]
    fn a_thread_never_seen_leaving_a_cpu_has_no_scheduler_times() {
        let t = totals_at(&ThreadState::default(), None, None, 0, Some(160));
        assert_eq!((t.runq_ns, t.blocked_ns), (0, 0));
    }
}
