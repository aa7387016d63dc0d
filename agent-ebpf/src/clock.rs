//! The monotonic clock, read lazily: programs on scheduler hooks run at every switch of the
//! host, and most switches involve no tracked thread, so they should not pay for a clock read
//! (a helper call, tens of nanoseconds on a CPU with retpolines and return thunks).
use aya_ebpf::helpers::bpf_ktime_get_ns;

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
