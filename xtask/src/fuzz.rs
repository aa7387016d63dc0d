//! `cargo xtask fuzz`: builds the cargo-fuzz targets of fuzz/ (libFuzzer with AddressSanitizer,
//! nightly) and runs each for a bounded time from its seed corpus (fuzz/corpus/NAME). What a
//! run adds to the corpus is kept under target/ for the next run; a crash leaves its input in
//! target/fuzz-artifacts/NAME/ and fails the run.
use std::process::Command;

use anyhow::{Context as _, bail};
use xtask::{exec, root};

/// The targets, each the parser of something the agent takes from outside.
pub const TARGETS: [&str; 4] = ["config", "selector", "otlp", "control"];

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Only these targets (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// `cargo +nightly fuzz ...` in the workspace root: through rustup's proxy, not the cargo that
/// runs xtask (the sanitizer flags need nightly).
fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"]);
    c.env_remove("RUSTUP_TOOLCHAIN");
    c
}

pub fn build() -> anyhow::Result<()> {
    exec(cargo_fuzz().args(["build", "-O", "--target-dir", "target/fuzz"]))
        .context("building the fuzz targets (cargo fuzz, nightly) failed")
}

/// Runs `target` for `secs` seconds; an error if libFuzzer found a crash, leak or timeout.
pub fn run_one(target: &str, secs: u64) -> anyhow::Result<()> {
    let seeds = root().join("fuzz/corpus").join(target);
    let corpus = root().join("target/fuzz-corpus").join(target);
    let artifacts = root().join("target/fuzz-artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    for seed in std::fs::read_dir(&seeds).with_context(|| format!("{}", seeds.display()))? {
        let seed = seed?.path();
        std::fs::copy(&seed, corpus.join(seed.file_name().expect("a file")))?;
    }
    // libFuzzer reports every new input: its output goes to a log, the result to the console.
    let log_path = root()
        .join("target/fuzz-logs")
        .join(format!("{target}.log"));
    std::fs::create_dir_all(log_path.parent().expect("has a parent"))?;
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = cargo_fuzz();
    cmd.current_dir(root())
        .args(["run", "-O", "--target-dir", "target/fuzz", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Inputs the agent would refuse long before (64 KiB control lines, OTLP bodies capped
        // by max_request_bytes) only slow the search.
        .args([
            "-max_len=65536",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("+ {} (output in {})", xtask::show(&cmd), log_path.display());
    let status = cmd.status().context("cannot run cargo fuzz")?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        for l in tail.into_iter().rev() {
            eprintln!("  {l}");
        }
        bail!(
            "fuzz target {target} failed ({status}): the input is in {}, the log in {}",
            artifacts.display(),
            log_path.display()
        );
    }
    if let Some(done) = text.lines().find(|l| l.starts_with("Done ")) {
        eprintln!("fuzz {target}: {done}, nothing found");
    }
    Ok(())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::run()?;
    build()?;
    let wanted: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| opts.only.is_empty() || opts.only.iter().any(|o| o == t))
        .collect();
    if wanted.is_empty() {
        bail!("no such fuzz target; they are {}", TARGETS.join(", "));
    }
    let mut failed = Vec::new();
    for t in &wanted {
        if let Err(e) = run_one(t, opts.secs) {
            eprintln!("{e:#}");
            failed.push(*t);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    eprintln!(
        "fuzz: {} targets ran {} s each, nothing found",
        wanted.len(),
        opts.secs
    );
    Ok(())
}
