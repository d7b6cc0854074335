//! One node per machine at a time: the bridge, the node IP, its ports, the kubelet's cgroup root
//! and the iptables chains are host-global, so a node holds an exclusive file lock while it lives.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::Instant;

use crate::error::{IoContext, Result};

/// Outside every cache dir on purpose: two checkouts with different caches share the host.
const LOCK_FILE: &str = "/run/petl-node.lock";

/// Held for a node's lifetime; the kernel releases it when the process dies, however it dies.
pub(crate) struct HostLock {
    _file: File,
}

impl HostLock {
    /// Takes the lock, waiting (blocking) while another node holds it. Call it off the async
    /// runtime's worker threads.
    pub(crate) fn acquire() -> Result<Self> {
        let path = Path::new(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .context(|| format!("opening the node lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => return Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => {
                return Err(e).context(|| format!("locking {}", path.display()));
            }
        }
        eprintln!(
            "petl-tests: another node runs on this machine (lock {}); waiting for it to stop",
            path.display()
        );
        let waited = Instant::now();
        file.lock()
            .context(|| format!("locking {}", path.display()))?;
        eprintln!(
            "petl-tests: got the node lock after {:.0}s",
            waited.elapsed().as_secs_f64()
        );
        Ok(Self { _file: file })
    }
}
