//! Faults a user (or a test) injects to watch recovery: `petl run --kill rank=1,step=40,what=both`.
//! The rank acts at the end of that step: it names the fault on stdout (the launcher kills its
//! agent for `agent` and `both`) and kills itself with SIGKILL for `trainer` and `both`;
//! `perturb` moves one of its parameters so the divergence check must stop the job.

use std::io::Write;
use std::str::FromStr;

use crate::{Error, Result};

/// The line prefix a rank prints when it reaches its fault; the launcher watches for it.
pub const FAULT_MARKER: &str = "petl-fault";

/// What to kill or break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 of the trainer: it restarts and restores from its own agent (tier 1).
    Trainer,
    /// kill -9 of the agent alone: the trainer goes on; a new agent takes the next snapshots.
    Agent,
    /// Both, as when a pod is lost: the new agent rebuilds the state from peers (tier 2).
    Both,
    /// Test only: one parameter of this rank moves, the divergence check stops the job.
    Perturb,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trainer => "trainer",
            FaultKind::Agent => "agent",
            FaultKind::Both => "both",
            FaultKind::Perturb => "perturb",
        }
    }
}

/// One injected fault: `rank` (absent in a rank's own flag) at the end of step `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub rank: Option<usize>,
    pub step: u64,
    pub what: FaultKind,
}

impl FromStr for Fault {
    type Err = Error;

    /// `rank=1,step=40[,what=trainer|agent|both|perturb]` (`what` defaults to `trainer`).
    fn from_str(text: &str) -> Result<Fault> {
        let bad = |message: String| Error::Config {
            field: "--kill".into(),
            message: format!(
                "{message} in {text:?}; write rank=<r>,step=<s>[,what=trainer|agent|both|perturb]"
            ),
        };
        let (mut rank, mut step, mut what) = (None, None, FaultKind::Trainer);
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            match key {
                "rank" => {
                    rank = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("rank {value:?} is not a number")))?,
                    )
                }
                "step" => {
                    step = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|s| *s >= 1)
                            .ok_or_else(|| bad(format!("step {value:?} is not a step ≥ 1")))?,
                    )
                }
                "what" => {
                    what = match value {
                        "trainer" => FaultKind::Trainer,
                        "agent" => FaultKind::Agent,
                        "both" => FaultKind::Both,
                        "perturb" => FaultKind::Perturb,
                        other => return Err(bad(format!("unknown what={other}"))),
                    }
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(Fault {
            rank,
            step: step.ok_or_else(|| bad("no step".into()))?,
            what,
        })
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(rank) = self.rank {
            write!(f, "rank={rank},")?;
        }
        write!(f, "step={},what={}", self.step, self.what.as_str())
    }
}

/// The marker line of `rank`'s fault.
pub fn marker(rank: usize, fault: &Fault) -> String {
    format!(
        "{FAULT_MARKER} rank={rank} step={} what={}",
        fault.step,
        fault.what.as_str()
    )
}

/// Parses a marker line back: (rank, fault).
pub fn parse_marker(line: &str) -> Option<(usize, Fault)> {
    let rest = line.trim().strip_prefix(FAULT_MARKER)?.trim();
    let fault: Fault = rest.replace(' ', ",").parse().ok()?;
    Some((fault.rank?, fault))
}

/// Announces the fault on stdout and, for `trainer` and `both`, ends this process as kill -9
/// would: no destructors, no flushing, sockets reset by the kernel.
pub fn strike(rank: usize, fault: &Fault) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", marker(rank, fault));
    let _ = out.flush();
    drop(out);
    if matches!(fault.what, FaultKind::Trainer | FaultKind::Both) {
        // SAFETY: kill(2) with this process's own id and a valid signal number.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_flags_parse_and_print_back() {
        let f: Fault = "rank=1,step=40,what=both".parse().unwrap();
        assert_eq!(
            f,
            Fault {
                rank: Some(1),
                step: 40,
                what: FaultKind::Both
            }
        );
        assert_eq!(f.to_string(), "rank=1,step=40,what=both");
        let plain: Fault = "rank=0,step=3".parse().unwrap();
        assert_eq!(plain.what, FaultKind::Trainer);
        assert_eq!(
            parse_marker(&marker(2, &f)),
            Some((2, Fault { rank: Some(2), ..f }))
        );
        for bad in [
            "rank=1",
            "rank=x,step=2",
            "step=0",
            "rank=1,step=2,what=pod",
            "nope",
        ] {
            let err = bad.parse::<Fault>().unwrap_err().to_string();
            assert!(err.contains("--kill"), "{bad}: {err}");
        }
    }
}
