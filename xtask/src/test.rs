//! `cargo xtask test`: everything CI runs. Lints, a build of the agent and the workloads, then
//! every test (unit and privileged integration) in one `cargo test`, as root.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use xtask::{cargo, exec, is_root};

use crate::{fuzz, setup};

/// Seconds each fuzz target runs in the test command (`cargo xtask fuzz` runs longer).
const FUZZ_SECS: u64 = 20;

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Arguments for the test binaries (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run()?;
    if !opts.no_lint {
        exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
        exec(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // The integration tests run the real binaries: build them first (cargo test would not).
    exec(cargo().args(["build", "--bins"]))?;
    let mut test = cargo();
    test.args(["test", "--no-fail-fast"]);
    if !is_root() {
        // The probes need root; run the test binaries (only them) through sudo.
        eprintln!("not root: running the test binaries with sudo");
        test.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    // One at a time: the run-queue test measures scheduling and others must not disturb it.
    test.args(["--", "--test-threads=1"]).args(&opts.test_args);
    let mut totals = run_counting(&mut test)?;
    // Each fuzz target counts as a test: it passes when libFuzzer finds nothing in its time.
    if opts.test_args.is_empty() {
        fuzz::build()?;
        for t in fuzz::TARGETS {
            match fuzz::run_one(t, FUZZ_SECS) {
                Ok(()) => {
                    println!("fuzz {t} ({FUZZ_SECS} s) ... ok");
                    totals.passed += 1;
                }
                Err(e) => {
                    println!("fuzz {t} ({FUZZ_SECS} s) ... FAILED: {e:#}");
                    totals.failed += 1;
                }
            }
        }
    }
    // One closing line for all test binaries (cargo's last line is often an empty doc-test run).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.failed > 0 || !totals.ok {
        bail!("{} tests failed", totals.failed.max(1));
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    ok: bool,
}

/// Adds up cargo's `test result:` lines.
fn count(line: &str, t: &mut Totals) {
    let Some(rest) = line.strip_prefix("test result: ") else {
        return;
    };
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (
            words.next().and_then(|n| n.parse::<u64>().ok()),
            words.next(),
        ) {
            match what {
                "passed" => t.passed += n,
                "failed" => t.failed += n,
                "ignored" => t.ignored += n,
                _ => {}
            }
        }
    }
}

fn run_counting(cmd: &mut Command) -> anyhow::Result<Totals> {
    cmd.current_dir(xtask::root()).stdout(Stdio::piped());
    eprintln!("+ {}", xtask::show(cmd));
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let mut totals = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        count(&line, &mut totals);
    }
    totals.ok = child.wait()?.success();
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_result_lines() {
        let mut t = Totals::default();
        count(
            "test result: ok. 30 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.62s",
            &mut t,
        );
        count(
            "test result: FAILED. 8 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            &mut t,
        );
        count("test foo ... ok", &mut t);
        assert_eq!((t.passed, t.failed, t.ignored), (38, 1, 2));
    }
}
