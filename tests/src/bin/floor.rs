//! The benchmark floor: attaches the agent object's empty programs (`agent-ebpf/src/floor.rs`)
//! to the hooks named on the command line and holds them until killed.
//!
//!     floor sys_enter sys_exit          # tp_btf hooks
//!     floor sock/inet_sock_set_state    # classic tracepoints
//!     floor cpu-clock:99                # a perf_event program on every CPU at 99 Hz
//!     floor sys_enter+clock             # a program that only reads the clock
//!     floor sched_switch+state          # ... that only gets the thread's task storage
//!     floor sched_switch+stack          # ... that only takes the user stack where it blocks
//!     floor inet_sock_set_state+owner   # ... that only gets the socket's local storage
use anyhow::{Context as _, bail};
use aya::{
    Btf, EbpfLoader,
    programs::{
        BtfTracePoint, PerfEvent, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};

fn main() -> anyhow::Result<()> {
    let hooks: Vec<String> = std::env::args().skip(1).collect();
    if hooks.is_empty() {
        bail!("usage: floor HOOK... (sys_enter, sock/inet_sock_set_state, cpu-clock:HZ)");
    }
    let btf = Btf::from_sys_fs().context("kernel BTF")?;
    let mut bpf = EbpfLoader::new()
        .btf(Some(&btf))
        .allow_unsupported_maps()
        // The agent leaves it at one entry (agent-ebpf/src/floor.rs); a few stacks recur here.
        .map_max_entries("FLOOR_STACKS", 64)
        .load(pipeprobe::ebpf::OBJECT)
        .context("loading the eBPF object")?;
    for hook in &hooks {
        if let Some(hz) = hook.strip_prefix("cpu-clock:") {
            let p: &mut PerfEvent = bpf
                .program_mut("floor_cpu_sample")
                .context("floor_cpu_sample")?
                .try_into()?;
            p.load()?;
            for cpu in aya::util::online_cpus().map_err(|(_, e)| e)? {
                p.attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(hz.parse()?),
                    false,
                )?;
            }
        } else if let Some((category, name)) = hook.split_once('/') {
            let prog = format!("floor_{name}");
            let p: &mut TracePoint = bpf
                .program_mut(&prog)
                .with_context(|| format!("no program {prog}"))?
                .try_into()?;
            p.load()?;
            p.attach(category, name)?;
        } else {
            let (hook, prog) = match hook.split_once('+') {
                Some((h, what)) => (h, format!("floor_{what}_{h}")),
                None => (hook.as_str(), format!("floor_{hook}")),
            };
            let p: &mut BtfTracePoint = bpf
                .program_mut(&prog)
                .with_context(|| format!("no program {prog}"))?
                .try_into()?;
            p.load(hook, &btf)?;
            p.attach()?;
        }
    }
    println!("ATTACHED");
    loop {
        std::thread::park();
    }
}
