//! Stack sampling (flamegraph) types.

/// Distinct stacks a capture can hold (user and kernel stacks share the map). Each entry costs
/// 127 frames x 8 bytes, so this is ~4 MiB.
pub const STACKS_MAX: u32 = 4096;
/// Distinct (process, user stack, kernel stack) keys per capture.
pub const SAMPLES_MAX: u32 = 16_384;
/// Threads of the subject blocked at once (off-CPU mode).
pub const BLOCKED_MAX: u32 = 16_384;
/// Distinct kernel stacks of off-CPU episodes per capture.
pub const KSTACKS_MAX: u32 = 4096;
/// Kernel frames kept per off-CPU episode (a blocked thread's stack rarely passes 30).
pub const KSTACK_FRAMES: usize = 64;

/// On-CPU sampling: weights are sample counts.
pub const MODE_CPU: u32 = 0;
/// Off-CPU time: weights are nanoseconds blocked.
pub const MODE_OFFCPU: u32 = 1;
/// Slow syscalls: weights are nanoseconds in the syscall.
pub const MODE_SYSCALL: u32 = 2;

/// What the running capture selects; `active == 0` when none runs.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct CaptureConfig {
    pub active: u32,
    /// Process to sample, or 0 when `targets` selects.
    pub pid: u32,
    pub mode: u32,
    /// Sequence number of the capture, never 0: per-thread state a thread left in an earlier
    /// capture (it lives in the thread's task storage, which no capture clears) is ignored.
    pub generation: u32,
    /// Off-CPU episodes shorter than this are not counted.
    pub min_ns: u64,
    /// Kernel target ids to sample, one bit each (MAX_TARGETS is 64): a target's own id and
    /// those of its pods.
    pub targets: u64,
    /// CPU mode: 1 to send each sample's registers and a copy of its user stack to user space
    /// (`StackCopy`), which unwinds it with the modules' .eh_frame; 0 to walk frame pointers
    /// in the kernel.
    pub copy_stacks: u32,
    /// 1 when PY_PROCS holds a process of this capture (filled before it starts): without one,
    /// no sample pays for that lookup.
    pub python: u32,
}

/// Bytes of user stack a CPU sample copies from its stack pointer up (perf's
/// `--call-graph dwarf` copies 8 KiB by default). Enough for the native frames between a leaf
/// and the interpreter frame running the innermost Python function, which is where native
/// frames stop mattering under Python frames; a deeper native stack is cut at its outer end.
pub const STACK_COPY_BYTES: usize = 16 * 1024;
/// The ring buffer of stack copies: ~250 samples, drained every `STACK_COPY_DRAIN_MS`; mapped
/// by the agent only while a capture runs.
pub const STACK_COPIES_BYTES: u32 = 4 * 1024 * 1024;
/// How often user space drains the stack copies during a capture.
pub const STACK_COPY_DRAIN_MS: u64 = 20;

/// One CPU sample with what user space needs to unwind its user stack: the user registers
/// at the interrupted instruction (or at kernel entry) and the stack memory above `sp`.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct StackCopy {
    pub tgid: u32,
    /// Stack id of the kernel stack in the capture's stack map, or negative.
    pub kernel_stack: i32,
    /// Key of the Python stack in `PY_STACKS`, or 0.
    pub python_stack: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of `stack` that hold the memory at `sp..sp + len`; 0 when none could be read.
    pub len: u64,
    pub stack: [u8; STACK_COPY_BYTES],
}

/// A thread of the subject that blocked or entered a syscall: when, and where (off-CPU and
/// syscall modes).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Blocked {
    pub ts_ns: u64,
    pub tgid: u32,
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// Syscall number + 1 in syscall mode, else 0.
    pub syscall: u32,
    /// Key of the Python stack in `PY_STACKS`, or 0 when the thread runs no Python.
    pub python_stack: u64,
}

/// A blocked thread's kernel stack, innermost frame first, taken when its episode ends
/// (off-CPU mode): only episodes of at least `min_ns` pay for the unwinding.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct KernelStack {
    pub len: u32,
    pub _pad: u32,
    pub ips: [u64; KSTACK_FRAMES],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    /// Stack id in the stack map, or negative when the stack could not be taken.
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// Syscall number + 1 in syscall mode (the leaf frame), else 0.
    pub syscall: u32,
    /// Key of the Python stack in `PY_STACKS`, or 0 when the thread runs no Python.
    pub python_stack: u64,
    /// Key of the kernel stack in `KSTACKS` (off-CPU mode, where `kernel_stack` is negative),
    /// or 0.
    pub kernel_frames: u64,
}

/// Distinct stacks the continuous span sampler can hold before user space clears them.
pub const SPAN_STACKS_MAX: u32 = 8192;
/// Ring buffer of continuous samples to user space.
pub const SPAN_SAMPLES_BYTES: u32 = 256 * 1024;

/// One continuous low-rate sample of a tracked thread, for span-triggered flamegraphs: its
/// time is what ties it to a span, so each sample goes to user space (tens per second per CPU).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct SpanSample {
    /// When it was taken; for an off-CPU episode, when it ended.
    pub ts_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// 0: an on-CPU sample. Else an off-CPU episode of this length that ended at `ts_ns`, with
    /// the stacks the thread blocked in.
    pub off_ns: u64,
    /// Key of the thread's Python stack in SPAN_PY_STACKS, 0 for none.
    pub py_stack: u64,
    /// Off-CPU episodes: key of the kernel stack it blocked in, in SPAN_KSTACKS (then
    /// `kernel_stack` is negative), else 0.
    pub kernel_frames: u64,
}

/// Ring buffer of the span sampler's stack copies: ~60 samples, drained every 50 ms, so 49 Hz
/// on up to ~25 CPUs busy with span senders at once; past that, samples fall back to frame
/// pointers (counted). The agent maps it (twice, as every ring buffer) for its whole life, and
/// all of it counts in its RSS: 2 MiB.
pub const SPAN_STACK_COPIES_BYTES: u32 = 1024 * 1024;

/// An on-CPU sample of the span sampler with its user stack to unwind in user space (its
/// `user_stack` is negative): taken for processes that send spans, the only ones whose samples
/// a span flamegraph can use.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct SpanStackCopy {
    pub sample: SpanSample,
    pub copy: StackCopy,
}

/// Off-CPU episodes shorter than this do not go to the span samples (a thread waiting for the
/// next request blocks for long; one spinning on locks blocks often and briefly).
pub const SPAN_OFFCPU_MIN_NS: u64 = 1_000_000;

/// Processes whose threads' off-CPU stacks the span sampler takes: those that sent a span
/// lately. Taking both stacks at every blocking switch of every tracked thread cost 1.9 us a
/// switch, 785 ms of CPU in 3 s of a pipe ping-pong that sends no span at all (`cargo xtask
/// bench`, context-switch workload). By process, not thread: servers that take a thread per
/// connection would lose the off-CPU time of every new thread's first span.
pub const SPAN_SENDERS_MAX: u32 = 4096;
/// A sender stays one this long after its last span (value: CLOCK_MONOTONIC ns, as
/// bpf_ktime_get_ns).
pub const SPAN_SENDER_TTL_NS: u64 = 60_000_000_000;
/// User space rewrites a sender's time at most this often.
pub const SPAN_SENDER_REFRESH_NS: u64 = 10_000_000_000;
