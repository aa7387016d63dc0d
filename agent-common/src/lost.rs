//! Reasons the kernel side dropped something, indexing the per-CPU `LOST` counter array.
//!
//! Nothing is dropped silently: each reason becomes `pipeprobe_events_lost_total{reason}`.

/// A forked child of a tracked process could not be added: the tracked-process map is full.
pub const TRACKED_MAP_FULL: u32 = 0;
/// A process event (exec, fork, exit) did not fit in the ring buffer to user space.
pub const PROC_EVENTS_FULL: u32 = 1;
/// A tracked thread leaving a CPU could not record it: no memory for its task storage.
pub const RUNQ_PENDING_FULL: u32 = 2;
/// A thread leaving a CPU inside a syscall could not keep its start time, or its syscall totals:
/// no memory for its task storage.
pub const SYSCALL_PENDING_FULL: u32 = 3;
/// A new (target, syscall) pair could not be added: the syscall statistics map is full.
pub const SYSCALL_STATS_FULL: u32 = 4;
/// A socket of a tracked process could not be recorded: the socket owner table is full
/// (`[tcp] max_sockets`).
pub const TCP_SOCKETS_FULL: u32 = 5;
/// A listening socket could not be recorded: the listener map is full. (A connect in flight is
/// kept with its socket's owner, `TCP_SOCKETS_FULL`.)
pub const TCP_CONNECTS_FULL: u32 = 6;
/// A new (target, peer) pair could not be added: the per-peer map is full (`max_peers`).
pub const TCP_PEERS_FULL: u32 = 7;
/// A CPU sample whose stack could not be stored (stack map full or hash collision).
pub const STACK_MISSING: u32 = 8;
/// A CPU sample with a new stack key did not fit in the sample map.
pub const SAMPLES_FULL: u32 = 9;
/// A Python stack could not be walked (unreadable thread state) or stored (map full).
pub const PYTHON_STACK_MISSING: u32 = 10;
/// A CPU sample's copy of its user stack did not fit in the ring buffer to user space: its
/// user stack was taken by frame pointers instead.
pub const STACK_COPIES_FULL: u32 = 11;
/// Size of the `LOST` array.
pub const COUNT: u32 = 12;

/// Label value for each reason, by index.
pub const NAMES: [&str; COUNT as usize] = [
    "tracked_map_full",
    "proc_events_full",
    "runq_pending_full",
    "syscall_pending_full",
    "syscall_stats_full",
    "tcp_sockets_full",
    "tcp_connects_full",
    "tcp_peers_full",
    "stack_missing",
    "samples_full",
    "python_stack_missing",
    "stack_copies_full",
];
