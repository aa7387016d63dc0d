//! Stack sampling (flamegraph) types.

/// Distinct stacks a capture can hold (user and kernel stacks share the map). Each entry costs
/// 127 frames x 8 bytes, so this is ~4 MiB.
pub const STACKS_MAX: u32 = 4096;
/// Distinct (process, user stack, kernel stack) sample keys per capture.
pub const SAMPLES_MAX: u32 = 16_384;

/// What the running capture selects; `active == 0` when none runs.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct CaptureConfig {
    pub active: u32,
    /// Target id to sample, or `NO_TARGET` when `pid` selects.
    pub target: u32,
    /// Process to sample, or 0 when `target` selects.
    pub pid: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    /// Stack id in the stack map, or negative when the stack could not be taken.
    pub user_stack: i32,
    pub kernel_stack: i32,
    pub _pad: u32,
}
