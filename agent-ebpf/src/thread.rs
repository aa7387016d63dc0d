//! Each thread's `ThreadState` (agent_common::spans), hung off its task_struct: what the sched
//! and syscalls programs carry between two events of a thread, and its running totals.
use agent_common::spans::ThreadState;
use aya_ebpf::{helpers::generated::bpf_get_current_task_btf, macros::btf_map};

use crate::task_storage::TaskStorage;

#[btf_map]
static THREAD: TaskStorage<ThreadState> = TaskStorage::new();

/// `task`'s state, created zeroed when it has none (None only when memory runs out).
#[inline(always)]
pub fn state(task: *const u8) -> Option<&'static mut ThreadState> {
    // SAFETY: task storage of a live task; each field has one writer at a time (the thread
    // itself, or the CPU waking or switching it, which the scheduler serialises).
    THREAD.get_or_create(task).map(|p| unsafe { &mut *p })
}

/// `task`'s state if it has one.
#[inline(always)]
pub fn existing(task: *const u8) -> Option<&'static mut ThreadState> {
    // SAFETY: as above.
    THREAD.get(task).map(|p| unsafe { &mut *p })
}

/// The current task, as task storage wants it.
#[inline(always)]
pub fn current() -> *const u8 {
    // SAFETY: no preconditions; the result is a trusted task pointer.
    unsafe { bpf_get_current_task_btf() as *const u8 }
}
