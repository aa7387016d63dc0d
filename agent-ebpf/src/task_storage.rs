//! Local storage: a value hung off a kernel object itself, the `task_struct`
//! (`BPF_MAP_TYPE_TASK_STORAGE`) or a socket (`BPF_MAP_TYPE_SK_STORAGE`). Reaching it costs a
//! pointer chase instead of a hash lookup, it needs no delete (the kernel frees it with its
//! object), and it cannot fill up. aya-ebpf 0.2 offers no task flavour, and its socket flavour
//! takes only a sock_addr program's context, so both are declared here the way BTF map
//! definitions are: a `.maps` static whose field types encode the map's parameters.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::{bpf_sk_storage_get, bpf_task_storage_get},
};

const TASK: usize = bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize;
const SK: usize = bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize;

#[repr(C)]
pub struct LocalStorage<T, const TYPE: usize> {
    r#type: *const [i32; TYPE],
    key: *const i32,
    value: *const T,
    // Local storage has no max_entries (0) and must not be preallocated.
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

/// Per-thread values, on a BTF-typed `task_struct` pointer.
pub type TaskStorage<T> = LocalStorage<T, TASK>;
/// Per-socket values, on a BTF-typed `sock` pointer.
pub type SkStorage<T> = LocalStorage<T, SK>;

// SAFETY: the fields only describe the map to the loader in BTF; nothing reads them.
unsafe impl<T, const TYPE: usize> Sync for LocalStorage<T, TYPE> {}

impl<T, const TYPE: usize> LocalStorage<T, TYPE> {
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
    fn map(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// The object's value, if it has one; created zeroed when `create` (None only when memory
    /// runs out). `object` must be a pointer the verifier typed as this storage's object (a
    /// tp_btf argument or `bpf_get_current_task_btf`); the helper checks everything else.
    #[inline(always)]
    fn get_with(&self, object: *const u8, create: bool) -> Option<*mut T> {
        let flags = if create {
            u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        let object = object.cast_mut();
        // SAFETY: as documented above; the helpers validate the pointer's type.
        let p = unsafe {
            if TYPE == TASK {
                bpf_task_storage_get(self.map(), object.cast(), core::ptr::null_mut(), flags)
            } else {
                bpf_sk_storage_get(self.map(), object.cast(), core::ptr::null_mut(), flags)
            }
        };
        (!p.is_null()).then_some(p.cast())
    }

    /// The object's value, if it has one.
    #[inline(always)]
    pub fn get(&self, object: *const u8) -> Option<*mut T> {
        self.get_with(object, false)
    }

    /// The object's value, created zeroed if it has none (None only when memory runs out).
    #[inline(always)]
    pub fn get_or_create(&self, object: *const u8) -> Option<*mut T> {
        self.get_with(object, true)
    }
}
