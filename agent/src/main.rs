use clap::Parser as _;

fn main() -> std::process::ExitCode {
    pipeprobe::run(pipeprobe::cli::Cli::parse())
}
