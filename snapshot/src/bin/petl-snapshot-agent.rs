//! The snapshot agent binary: runs next to a trainer as a native sidecar, one per rank.
//! Flags (and their `PETL_*` variables) are `petl_snapshot::agent::AgentArgs`.

use std::process::ExitCode;

use clap::Parser;
use petl_snapshot::agent::{self, AgentArgs};

fn main() -> ExitCode {
    agent::main_with(AgentArgs::parse())
}
