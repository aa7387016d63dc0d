//! Task-local storage (`BPF_MAP_TYPE_TASK_STORAGE`): a value hung off the `task_struct` itself.
//! Reaching it costs a pointer chase instead of a hash lookup, it needs no delete (the kernel
//! frees it with the task), and it cannot fill up. aya-ebpf 0.2 offers the cgroup, inode and
//! socket flavours of local storage but not this one, so it is declared here the way BTF map
//! definitions are: a `.maps` static whose field types encode the map's parameters.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::bpf_task_storage_get,
};

#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    // Local storage has no max_entries (0) and must not be preallocated.
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields only describe the map to the loader in BTF; nothing reads them.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn get_with(&self, task: *const u8, flags: u64) -> Option<*mut T> {
        // SAFETY: `task` is a task_struct pointer the verifier typed (tracepoint argument or
        // bpf_get_current_task_btf); the helper checks everything else.
        let p = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                task.cast_mut().cast(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }

    /// The task's value, if it has one.
    #[inline(always)]
    pub fn get(&self, task: *const u8) -> Option<*mut T> {
        self.get_with(task, 0)
    }

    /// The task's value, created zeroed if it has none (None only when memory runs out).
    #[inline(always)]
    pub fn get_or_create(&self, task: *const u8) -> Option<*mut T> {
        self.get_with(task, u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE))
    }
}
