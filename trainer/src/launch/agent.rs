//! `petl snapshot-agent`: one rank's snapshot agent run from the `petl` binary itself, so `petl
//! run` needs no second executable. The flags are the agent binary's (`petl_snapshot::AgentArgs`).

pub use petl_snapshot::agent::{AgentArgs, main_with as main};
