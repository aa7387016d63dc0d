use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod setup;
mod soak;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent; fast when all is there).
    Setup {
        /// Only what building the agent needs (rust-src, LLVM, bpf-linker), not the test tools:
        /// the container image's build stage.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, build, then run every test: lints, unit and privileged integration tests.
    Test(test::Options),
    /// Set up, build, and run the agent against the bundled synthetic pipeline.
    Demo(demo::Options),
    /// Measure what the probes cost the workloads they watch (root; writes docs/benchmarks.md).
    Bench(bench::Options),
    /// Run the agent under process churn for minutes (root; writes docs/reliability.md).
    Soak(soak::Options),
    /// Fuzz the parsers of outside input with cargo-fuzz (libFuzzer), a bounded time each.
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup { build_only: false } => setup::run(),
        Command::Setup { build_only: true } => setup::build_only(),
        Command::Test(opts) => test::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::Soak(opts) => soak::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
    }
}
