//! The benchmark's own instruments (`cargo xtask bench`): what they measure must be what they
//! say, or every ratio built on them is wrong.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use pipeprobe_tests::{Proc, linked_programs, run, workload_bin};

/// The `floor` tool's `HOOK+WORK` floors attach the program doing only that work, and the
/// off-CPU one takes user stacks into a map the tool sized (the agent creates it with one
/// entry).
#[test]
fn floors_with_work_attach_their_programs_and_take_stacks() {
    let floor_bin = workload_bin().with_file_name("floor");
    let mut floor = Proc::spawn(
        Command::new(&floor_bin)
            .args(["sched_switch+state", "sched_switch+stack"])
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(floor.0.stdout.as_mut().expect("piped"))
        .read_line(&mut line)
        .expect("floor's stdout");
    assert_eq!(line.trim(), "ATTACHED", "floor said {line:?}");
    let mut linked = linked_programs(floor.pid());
    linked.sort();
    assert_eq!(
        linked,
        ["floor_stack_sched_switch", "floor_state_sched_switch"],
        "programs the floor tool attached"
    );

    // Blocking switches of a process with a user stack.
    let out = run(Command::new(workload_bin()).args(["pingpong", "--secs", "0.5"]));
    assert!(out.contains("OPS_PER_SEC"), "pingpong said {out:?}");

    // The floor program's own stack map (an agent running meanwhile has one too).
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&run(Command::new("bpftool").args(args))).expect("bpftool JSON")
    };
    let prog = json(&["prog", "show", "name", "floor_stack_sched_switch", "-j"]);
    // One program prints as an object, several as a list.
    let prog = prog.as_array().map_or(&prog, |a| &a[0]);
    let stacks = prog["map_ids"]
        .as_array()
        .expect("the program's maps")
        .iter()
        .map(|id| json(&["map", "show", "id", &id.to_string(), "-j"]))
        .find(|m| m["name"] == "FLOOR_STACKS")
        .expect("floor_stack_sched_switch uses FLOOR_STACKS");
    assert_eq!(
        stacks["max_entries"], 64,
        "FLOOR_STACKS as the floor tool sized it"
    );
    let dump =
        run(Command::new("bpftool").args(["map", "dump", "id", &stacks["id"].to_string(), "-j"]));
    let entries: serde_json::Value = serde_json::from_str(&dump).expect("bpftool prints JSON");
    assert!(
        !entries.as_array().expect("a list of entries").is_empty(),
        "no user stack taken at the ping-pong's blocking switches"
    );
}
