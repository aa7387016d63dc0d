//! Empty on purpose: the programs are in the `pipeprobe-ebpf` binary. This library target only
//! lets `agent` declare a build-dependency on this crate so cargo rebuilds it on changes.
#![no_std]
