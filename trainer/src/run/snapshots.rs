//! This rank's snapshot agent as the run sees it: whether a handoff now would queue, the newest
//! generation it committed, the handoff itself, and the agreed restore at start and after a loss.

use std::path::{Path, PathBuf};
use std::time::Duration;

use petl_snapshot::{Snapshot, SnapshotClient, Tier};

use crate::Result;

/// Where a restore came from, named as `status.lastRecovery.source` names it.
pub fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Local => "local",
        Tier::Peers => "peers",
        Tier::Durable => "durable",
    }
}

/// The connection to this rank's agent and the job's snapshot interval.
pub struct SnapshotLink {
    client: SnapshotClient,
    socket: PathBuf,
    /// Snapshot every this many steps (`spec.snapshot.everySteps`).
    pub every_steps: u64,
    /// How long agreeing and restoring may wait for every rank's agent.
    pub timeout: Duration,
}

impl SnapshotLink {
    /// Connects (lazily: the agent may still be starting) to the agent at `socket`.
    pub fn new(socket: &Path, every_steps: u64, timeout: Duration) -> SnapshotLink {
        SnapshotLink {
            client: SnapshotClient::new(socket),
            socket: socket.to_path_buf(),
            every_steps: every_steps.max(1),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Nothing waiting or in flight, and the last handoff committed (or definitely not): a
    /// handoff now would not outrun the last one.
    pub fn ready(&self) -> bool {
        self.client.ready()
    }

    /// The newest generation this rank's agent committed, as far as the client knows.
    pub fn committed(&self) -> Option<u64> {
        self.client.last_committed()
    }

    /// Hands `snapshot` over without waiting.
    pub fn put(&self, snapshot: Snapshot) {
        self.client.put(snapshot);
    }

    /// The generation every rank resumes from (`None`: a fresh job) and this rank's copy of it,
    /// from the best tier that has it. An agent not up yet (its socket missing, a pod's sidecar
    /// still starting) is waited for until the timeout.
    pub fn restore(&self) -> Result<Option<(Snapshot, Tier)>> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            match self.client.restore(self.timeout) {
                Err(petl_snapshot::Error::Unreachable { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return Ok(other?),
            }
        }
    }
}
