//! CPU sampling for flamegraphs: a perf_event program on every CPU, attached only while a
//! capture runs, counting (process, user stack, kernel stack) in the kernel. Nothing per sample
//! crosses to user space; the capture reads the counts once at its end.
use agent_common::{
    lost,
    stacks::{CaptureConfig, SAMPLES_MAX, STACKS_MAX, StackKey},
};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::{map, perf_event},
    maps::{Array, HashMap, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext as _},
};

use crate::{aggregate::atomic_add, lost::count as count_lost, targets::target_of};

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(STACKS_MAX, 0);

/// One entry: the capture in progress.
#[map]
static CAPTURE: Array<CaptureConfig> = Array::with_max_entries(1, 0);

#[map]
static CPU_SAMPLES: HashMap<StackKey, u64> = HashMap::with_max_entries(SAMPLES_MAX, 0);

#[perf_event]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    let Some(cfg) = CAPTURE.get(0).copied() else {
        return 0;
    };
    if cfg.active == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == 0 {
        return 0;
    }
    let selected = if cfg.pid != 0 {
        tgid == cfg.pid
    } else {
        target_of(tgid) == Some(cfg.target)
    };
    if !selected {
        return 0;
    }
    let user = ctx
        .get_stackid(&STACKS, u64::from(BPF_F_USER_STACK))
        .map_or(-1, |id| id as i32);
    let kernel = ctx.get_stackid(&STACKS, 0).map_or(-1, |id| id as i32);
    if user < 0 && kernel < 0 {
        count_lost(lost::STACK_MISSING);
    }
    let key = StackKey {
        tgid,
        user_stack: user,
        kernel_stack: kernel,
        _pad: 0,
    };
    if let Some(count) = CPU_SAMPLES.get_ptr_mut(&key) {
        // SAFETY: points into a live map value; other CPUs may add to the same key.
        unsafe { atomic_add(count, 1) };
    } else if CPU_SAMPLES
        .insert(&key, &1, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU inserted it meanwhile, or the map is full.
        match CPU_SAMPLES.get_ptr_mut(&key) {
            // SAFETY: as above.
            Some(count) => unsafe { atomic_add(count, 1) },
            None => count_lost(lost::SAMPLES_FULL),
        }
    }
    0
}
