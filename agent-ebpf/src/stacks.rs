//! Stacks for flamegraphs, weighted in the kernel per (process, user stack, kernel stack):
//! CPU samples (a perf_event program on every CPU) or off-CPU time (sched_switch, from a
//! blocking switch-out to the switch-in). Both are attached only while a capture of their mode
//! runs; nothing per event crosses to user space, the capture reads the weights once at its end.
use agent_common::{
    lost,
    stacks::{
        BLOCKED_MAX, Blocked, CaptureConfig, KSTACK_FRAMES, KSTACKS_MAX, KernelStack, MODE_CPU,
        MODE_OFFCPU, MODE_SYSCALL, SAMPLES_MAX, SPAN_OFFCPU_MIN_NS, SPAN_SAMPLES_BYTES,
        SPAN_SENDER_TTL_NS, SPAN_SENDERS_MAX, SPAN_STACKS_MAX, STACKS_MAX, SpanSample, StackKey,
    },
    task::TASK_RUNNING,
};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_task_stack},
    macros::{btf_tracepoint, map, perf_event},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{BtfTracePointContext, PerfEventContext, tracing::StackIdContext},
};

use crate::{
    aggregate::atomic_add,
    clock::{Now, SchedNow},
    lost::count as count_lost,
    python,
    targets::target_of,
    task, thread, unwind,
};

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(STACKS_MAX, 0);

/// One entry: the capture in progress.
#[map]
static CAPTURE: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// Weight per stack: samples (cpu mode) or nanoseconds (off-CPU mode).
#[map]
static STACK_WEIGHTS: HashMap<StackKey, u64> = HashMap::with_max_entries(SAMPLES_MAX, 0);

/// Subject threads blocked (off-CPU mode) or in a syscall (syscall mode) right now.
#[map]
static BLOCKED: HashMap<u32, Blocked> = HashMap::with_max_entries(BLOCKED_MAX, 0);

/// Kernel stacks of off-CPU episodes by the hash of their frames. A stack map cannot be
/// written from BPF, and `bpf_get_stackid` only unwinds the current task.
#[map]
static KSTACKS: HashMap<u64, KernelStack> = HashMap::with_max_entries(KSTACKS_MAX, 0);

/// Per-CPU room for a `KernelStack`, which does not fit on the BPF stack.
#[map]
static KSTACK_SCRATCH: PerCpuArray<KernelStack> = PerCpuArray::with_max_entries(1, 0);

/// The running capture if it is of `mode`.
#[inline(always)]
fn capture(mode: u32) -> Option<CaptureConfig> {
    CAPTURE
        .get(0)
        .copied()
        .filter(|c| c.active != 0 && c.mode == mode)
}

#[inline(always)]
fn selected(cfg: &CaptureConfig, tgid: u32) -> bool {
    tgid != 0
        && if cfg.pid != 0 {
            tgid == cfg.pid
        } else {
            target_of(tgid).is_some_and(|id| id < 64 && cfg.targets & (1u64 << id) != 0)
        }
}

/// The Python stack of a capture's sample, 0 when the capture has no Python process.
#[inline(always)]
fn py_stack(cfg: &CaptureConfig, tgid: u32, tid: u32) -> u64 {
    if cfg.python == 0 {
        return 0;
    }
    python::stack(tgid, tid)
}

#[inline(always)]
fn user_stack_id<C: StackIdContext>(ctx: &C) -> i32 {
    ctx.get_stackid(&STACKS, u64::from(BPF_F_USER_STACK))
        .map_or(-1, |id| id as i32)
}

#[inline(always)]
fn kernel_stack_id<C: StackIdContext>(ctx: &C) -> i32 {
    ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32)
}

#[inline(always)]
fn add_weight(key: &StackKey, weight: u64) {
    if let Some(w) = STACK_WEIGHTS.get_ptr_mut(key) {
        // SAFETY: points into a live map value; other CPUs may add to the same key.
        unsafe { atomic_add(w, weight) };
    } else if STACK_WEIGHTS
        .insert(key, &weight, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU inserted it meanwhile, or the map is full.
        match STACK_WEIGHTS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(w) => unsafe { atomic_add(w, weight) },
            None => count_lost(lost::SAMPLES_FULL),
        }
    }
}

#[perf_event]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    let Some(cfg) = capture(MODE_CPU) else {
        return 0;
    };
    let ids = bpf_get_current_pid_tgid();
    let tgid = (ids >> 32) as u32;
    if !selected(&cfg, tgid) {
        return 0;
    }
    // The perf event's registers are those of the interrupted code: nothing to skip.
    let kernel_stack = kernel_stack_id(&ctx);
    let python_stack = py_stack(&cfg, tgid, ids as u32);
    if cfg.copy_stacks != 0 && unwind::send(tgid, kernel_stack, python_stack) {
        return 0;
    }
    let user_stack = user_stack_id(&ctx);
    if user_stack < 0 && kernel_stack < 0 {
        count_lost(lost::STACK_MISSING);
    }
    add_weight(
        &StackKey {
            tgid,
            user_stack,
            kernel_stack,
            syscall: 0,
            python_stack,
            kernel_frames: 0,
        },
        1,
    );
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch(ctx: BtfTracePointContext) -> i32 {
    try_offcpu_switch(&ctx);
    0
}

fn try_offcpu_switch(ctx: &BtfTracePointContext) {
    let Some(cfg) = capture(MODE_OFFCPU) else {
        return;
    };
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...); the
    // tracepoint runs in prev's context, so its user stack is the current one.
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *mut u8 = ctx.arg(2);
    // The tracepoint's own task pointers: plain loads, where the pid_tgid helper is a call.
    let (tgid, tid) = (task::tgid(prev), task::pid(prev));
    // Both ends of an episode are read here, so the scheduler's clock does (no helper call).
    let mut now = SchedNow::of(next.cast_const());
    // Blocking, not preempted: the time until it runs again is off-CPU time. Only the user
    // stacks are taken here, where they must be (another task's user memory cannot be read at
    // switch-in); the kernel stack waits for the episode's end, so the many short episodes
    // under `min_ns` never pay for unwinding it, the dearer of the two (1.2 of 1.8 us a
    // switch, pipe ping-pong, `kernel.bpf_stats_enabled`).
    if selected(&cfg, tgid)
        && preempt & 0xff == 0
        && task::state(prev) != TASK_RUNNING
        && let Some(t) = thread::state(prev)
    {
        t.capture_off.user_stack = user_stack_id(ctx);
        t.capture_off.py_stack = py_stack(&cfg, tgid, tid);
        t.capture_off.generation = cfg.generation;
        t.capture_off.ts_ns = now.get();
    }
    // Most switch-ins are of threads outside the capture: with a pid to select, two loads
    // tell, where a task storage look-up is a helper call.
    if cfg.pid != 0 && task::tgid(next.cast_const()) != cfg.pid {
        return;
    }
    let Some(t) = thread::existing(next.cast_const()) else {
        return;
    };
    let off = t.capture_off;
    if off.ts_ns == 0 {
        return;
    }
    t.capture_off.ts_ns = 0;
    let blocked = now.get().saturating_sub(off.ts_ns);
    if off.generation == cfg.generation && blocked >= cfg.min_ns {
        let kernel_frames = blocked_kernel_stack(next, &KSTACKS);
        if off.user_stack < 0 && kernel_frames == 0 {
            count_lost(lost::STACK_MISSING);
        }
        let key = StackKey {
            tgid: task::tgid(next),
            user_stack: off.user_stack,
            kernel_stack: -1,
            syscall: 0,
            python_stack: off.py_stack,
            kernel_frames,
        };
        add_weight(&key, blocked);
    }
}

/// The kernel stack `task` sleeps in (it is not running: the scheduler is about to switch to
/// it), stored in `into`; its key, or 0 when it could not be taken or stored. The kernel
/// leaves the scheduler's own frames out of a sleeping task's stack.
#[inline(always)]
fn blocked_kernel_stack(task: *mut u8, into: &HashMap<u64, KernelStack>) -> u64 {
    let Some(out) = KSTACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, only this program on this CPU uses it now.
    let out = unsafe { &mut *out };
    // SAFETY: `task` is the tracepoint's trusted `next` argument; the helper writes at most
    // `size` bytes into the scratch value.
    let got = unsafe {
        bpf_get_task_stack(
            task.cast(),
            out.ips.as_mut_ptr().cast(),
            (KSTACK_FRAMES * 8) as u32,
            0,
        )
    };
    if got <= 0 {
        return 0;
    }
    let len = (got as usize / 8).min(KSTACK_FRAMES);
    out.len = len as u32;
    // FNV-1a over the frames; only deduplicates stacks.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..KSTACK_FRAMES {
        if i >= len {
            break;
        }
        if let Some(ip) = out.ips.get(i) {
            hash = (hash ^ *ip).wrapping_mul(0x0100_0000_01b3);
        }
    }
    // Zero is "no stack" in the key.
    let key = hash | 1;
    if into.get_ptr(&key).is_none()
        && into.insert(&key, &*out, u64::from(BPF_NOEXIST)).is_err()
        && into.get_ptr(&key).is_none()
    {
        return 0;
    }
    key
}

#[btf_tracepoint(function = "sys_enter")]
pub fn syscall_enter_stack(ctx: BtfTracePointContext) -> i32 {
    let Some(cfg) = capture(MODE_SYSCALL) else {
        return 0;
    };
    let ids = bpf_get_current_pid_tgid();
    let tgid = (ids >> 32) as u32;
    if !selected(&cfg, tgid) {
        return 0;
    }
    // TP_PROTO(struct pt_regs *regs, long id). The kernel stack here is only the entry path:
    // the syscall itself becomes the leaf frame instead.
    let nr: i64 = ctx.arg(1);
    let user_stack = user_stack_id(&ctx);
    let b = Blocked {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        user_stack,
        kernel_stack: -1,
        syscall: (nr as u32).wrapping_add(1),
        python_stack: py_stack(&cfg, tgid, ids as u32),
    };
    if BLOCKED.insert(&(ids as u32), &b, 0).is_err() {
        count_lost(lost::SAMPLES_FULL);
    }
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn syscall_exit_stack(_ctx: BtfTracePointContext) -> i32 {
    let Some(cfg) = capture(MODE_SYSCALL) else {
        return 0;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out before removal.
    let Some(b) = (unsafe { BLOCKED.get(&tid).copied() }) else {
        return 0;
    };
    let _ = BLOCKED.remove(&tid);
    // SAFETY: no preconditions.
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(b.ts_ns);
    if took >= cfg.min_ns {
        let key = StackKey {
            tgid: b.tgid,
            user_stack: b.user_stack,
            kernel_stack: -1,
            syscall: b.syscall,
            python_stack: b.python_stack,
            kernel_frames: 0,
        };
        add_weight(&key, took);
    }
    0
}

/// Stacks of the continuous span sampler, apart from the captures' (which reset theirs).
#[map]
static SPAN_STACKS: StackTrace = StackTrace::with_max_entries(SPAN_STACKS_MAX, 0);

/// Kernel stacks of the span sampler's off-CPU episodes (as `KSTACKS` for captures).
#[map]
static SPAN_KSTACKS: HashMap<u64, KernelStack> = HashMap::with_max_entries(SPAN_STACKS_MAX, 0);

#[map]
static SPAN_SAMPLES: RingBuf = RingBuf::with_byte_size(SPAN_SAMPLES_BYTES, 0);

/// Processes that sent a span lately -> when (user space fills it from the span intake): only
/// their threads' blocking switches take off-CPU stacks.
#[map]
static SPAN_SENDERS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(SPAN_SENDERS_MAX, 0);

#[inline(always)]
fn sends_spans(tgid: u32, now: u64) -> bool {
    // SAFETY: copied out at once.
    unsafe { SPAN_SENDERS.get(&tgid).copied() }
        .is_some_and(|t| now.saturating_sub(t) < SPAN_SENDER_TTL_NS)
}

/// Continuous low-rate sampling of every tracked thread, attached for the agent's lifetime when
/// span flamegraphs are on: a span that turns out slow gets the samples of its window.
#[perf_event]
pub fn span_sample(ctx: PerfEventContext) -> u32 {
    let ids = bpf_get_current_pid_tgid();
    let tgid = (ids >> 32) as u32;
    if tgid == 0 || target_of(tgid).is_none() {
        return 0;
    }
    let kernel_stack = ctx.get_stackid(&SPAN_STACKS, 0).map_or(-1, |id| id as i32);
    let mut sample = SpanSample {
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        tid: ids as u32,
        user_stack: -1,
        kernel_stack,
        off_ns: 0,
        py_stack: python::span_stack(tgid, ids as u32),
        kernel_frames: 0,
    };
    // Processes that send spans get their user stacks unwound through code without frame
    // pointers (in user space, from a copy); the others' samples only wait in the window.
    if sends_spans(tgid, sample.ts_ns) && unwind::send_span(&sample) {
        return 0;
    }
    sample.user_stack = ctx
        .get_stackid(&SPAN_STACKS, u64::from(BPF_F_USER_STACK))
        .map_or(-1, |id| id as i32);
    // No wakeup: user space drains the ring on a timer.
    if SPAN_SAMPLES
        .output::<SpanSample>(&sample, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count_lost(lost::SAMPLES_FULL);
    }
    0
}

/// Off-CPU time for span flamegraphs, with the span sampler: a tracked thread's stacks when it
/// blocks (kept in its task storage, no map insert per switch), and the episode, if at least
/// SPAN_OFFCPU_MIN_NS long, to the span samples when it runs again.
#[btf_tracepoint(function = "sched_switch")]
pub fn span_offcpu(ctx: BtfTracePointContext) -> i32 {
    try_span_offcpu(&ctx);
    0
}

fn try_span_offcpu(ctx: &BtfTracePointContext) {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...); the
    // tracepoint runs in prev's context, so its user stack is the current one. The kernel
    // stack is taken when the episode ends, and only if it is long enough to be sent (as in
    // `offcpu_switch`).
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *mut u8 = ctx.arg(2);
    let (tgid, tid) = (task::tgid(prev), task::pid(prev));
    let mut now = Now::default();
    if tgid != 0
        && preempt & 0xff == 0
        && target_of(tgid).is_some()
        && task::state(prev) != TASK_RUNNING
        && sends_spans(tgid, now.get())
        && let Some(t) = thread::state(prev)
    {
        t.span_off.user_stack = ctx
            .get_stackid(&SPAN_STACKS, u64::from(BPF_F_USER_STACK))
            .map_or(-1, |id| id as i32);
        t.span_off.py_stack = python::span_stack(tgid, tid);
        t.span_off.ts_ns = now.get();
    }
    let Some(t) = thread::existing(next.cast_const()) else {
        return;
    };
    let off = t.span_off;
    if off.ts_ns == 0 {
        return;
    }
    t.span_off.ts_ns = 0;
    let now = now.get();
    let off_ns = now.saturating_sub(off.ts_ns);
    if off_ns >= SPAN_OFFCPU_MIN_NS {
        let sample = SpanSample {
            ts_ns: now,
            tgid: task::tgid(next),
            tid: task::pid(next),
            user_stack: off.user_stack,
            kernel_stack: -1,
            off_ns,
            py_stack: off.py_stack,
            kernel_frames: blocked_kernel_stack(next, &SPAN_KSTACKS),
        };
        if SPAN_SAMPLES
            .output::<SpanSample>(&sample, u64::from(BPF_RB_NO_WAKEUP))
            .is_err()
        {
            count_lost(lost::SAMPLES_FULL);
        }
    }
}
