//! Integration tests of the real agent binary on the real kernel, as root. One test binary so
//! that the privileged tests run in one process; `cargo xtask test` runs them one at a time
//! because the run-queue test measures scheduling.
mod bench;
mod cli;
mod deploy;
mod docs;
mod flamegraph;
mod gpu;
mod kubernetes;
mod load;
mod prometheus;
mod python;
mod sched;
mod soak;
mod spans;
mod syscalls;
mod targets;
mod tcp;
