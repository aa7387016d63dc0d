//! The time of a program run, read lazily: programs on scheduler hooks run at every switch of
//! the host, and most switches involve no tracked thread, so they should not pay for a clock
//! read.
use agent_common::sched::ClockPair;
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint},
    maps::Array,
    programs::RawTracePointContext,
};

use crate::{task, thread};

/// The time of this program run, read at the first `get` only.
#[derive(Default)]
pub struct Now(u64);

impl Now {
    #[inline(always)]
    pub fn get(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: no preconditions.
            self.0 = unsafe { bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// The scheduler's clock, read lazily through a task on the run queue whose clock it is: the
/// run queue's clock where the loader found the way to it (no helper call: a clock helper costs
/// more than an empty program on a CPU with retpolines and return thunks), else
/// `bpf_ktime_get_ns`. User space relates it to its own clock through `clock_pair`.
pub struct SchedNow {
    task: *const u8,
    ns: u64,
}

impl SchedNow {
    /// The clock of `task`'s run queue, which the scheduler updated before this hook.
    #[inline(always)]
    pub fn of(task: *const u8) -> Self {
        Self { task, ns: 0 }
    }

    #[inline(always)]
    pub fn get(&mut self) -> u64 {
        if self.ns == 0 {
            self.ns = sched_clock(self.task);
        }
        self.ns
    }
}

/// The clock of `task`'s run queue, or `bpf_ktime_get_ns` on a kernel with no way to it (one
/// clock per kernel: the two are never mixed). 0 when the way had a null pointer, which callers
/// take as "no time".
#[inline(always)]
pub fn sched_clock(task: *const u8) -> u64 {
    match task::rq_clock(task) {
        Some(t) => t,
        // SAFETY: no preconditions.
        None => unsafe { bpf_ktime_get_ns() },
    }
}

/// Filled by `clock_pair`.
#[map]
static CLOCK_PAIR: Array<ClockPair> = Array::with_max_entries(1, 0);

/// Reads the scheduler's clock and CLOCK_MONOTONIC together, for user space: it runs this with
/// `BPF_PROG_TEST_RUN` right after its thread wakes, when the scheduler has just updated this
/// CPU's run queue clock. The attach point is a placeholder; it is never attached.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn clock_pair(_ctx: RawTracePointContext) -> i32 {
    let sched_ns = sched_clock(thread::current());
    // SAFETY: no preconditions.
    let monotonic_ns = unsafe { bpf_ktime_get_ns() };
    if let Some(pair) = CLOCK_PAIR.get_ptr_mut(0) {
        // SAFETY: the one entry of an array map; user space reads it after this run returns.
        unsafe {
            *pair = ClockPair {
                sched_ns,
                monotonic_ns,
            }
        };
    }
    0
}
