//! Scheduler (run-queue delay) probe types.

/// What the run-queue probe keeps in a tracked thread's task storage. It writes it only when the
/// thread leaves a CPU, from the scheduler's own per-task accounting (`task_struct.sched_info`:
/// run-queue time summed, last switch-in, switch-ins counted), so it needs no program at wakeups.
/// Times are of the scheduler's clock (`ClockPair`), not CLOCK_MONOTONIC.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SchedThread {
    /// When the probe first saw the thread leave a CPU (its last switch-in then): the thread's
    /// on-CPU, run-queue and blocked times count from here. 0: never seen.
    pub since_ns: u64,
    /// Its last switch-out: it has been off CPU since, unless a CPU's `SchedOnCpu` holds it with a
    /// later switch-in.
    pub out_ns: u64,
    /// Time on CPU from `since_ns` to `out_ns`.
    pub oncpu_ns: u64,
    /// The kernel's `sched_info.run_delay` (run-queue time summed over the thread's life) and
    /// `sched_info.pcount` (its switch-ins) at its last switch-out: the next switch-out takes the
    /// wait in between as their differences, which count the part of a wait spent on a run queue
    /// the thread was migrated from.
    pub run_delay_out: u64,
    pub pcount_out: u64,
    /// 1 when it left the CPU runnable (preempted): off CPU since `out_ns` is then run-queue time;
    /// 0 when it blocked.
    pub preempted: u32,
    pub _pad: u32,
}

/// The tracked thread running on a CPU, written at its switch-in: user space counts its time
/// on CPU, and the wait that ended there, before its switch-out puts them in its task storage.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SchedOnCpu {
    /// Its thread id; 0 when the CPU runs no tracked thread.
    pub tid: u32,
    pub _pad: u32,
    /// Its switch-in.
    pub in_ns: u64,
    /// The wait that ended at `in_ns`, from when it last joined this run queue (a wait begun on
    /// another run queue counts from the migration here; its switch-out counts all of it).
    pub wait_ns: u64,
}

/// The per-CPU map of `SchedOnCpu`.
pub const ON_CPU_MAP: &str = "SCHED_ON_CPU";

/// The scheduler's clock (the run queue clock the sched programs read, `ts_ns` above) and
/// CLOCK_MONOTONIC read together on one CPU: user space takes their difference to see how long
/// a thread has been runnable or blocked so far. The two drift apart (NTP slews only the
/// latter), so it is read again at every use.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ClockPair {
    pub sched_ns: u64,
    pub monotonic_ns: u64,
}

/// The map holding the one `ClockPair`.
pub const CLOCK_PAIR_MAP: &str = "CLOCK_PAIR";
/// The program that fills it when user space runs it (`BPF_PROG_TEST_RUN`; never attached).
pub const CLOCK_PAIR_PROGRAM: &str = "clock_pair";
