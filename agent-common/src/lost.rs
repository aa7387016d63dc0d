//! Reasons the kernel side dropped something, indexing the per-CPU `LOST` counter array.
//!
//! Nothing is dropped silently: each reason becomes `pipeprobe_events_lost_total{reason}`.

/// A forked child of a tracked process could not be added: the tracked-process map is full.
pub const TRACKED_MAP_FULL: u32 = 0;
/// A process event (exec, fork, exit) did not fit in the ring buffer to user space.
pub const PROC_EVENTS_FULL: u32 = 1;
/// A runnable thread could not be timestamped: the pending run-queue map is full.
pub const RUNQ_PENDING_FULL: u32 = 2;
/// Size of the `LOST` array.
pub const COUNT: u32 = 3;

/// Label value for each reason, by index.
pub const NAMES: [&str; COUNT as usize] =
    ["tracked_map_full", "proc_events_full", "runq_pending_full"];
