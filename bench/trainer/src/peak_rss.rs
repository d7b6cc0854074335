//! Peak resident memory of this process over a stretch of work, taken exactly as `peer.py` takes
//! it: trim the heap, note VmRSS, reset the high-water mark VmHWM, work, read VmHWM.

use anyhow::{Context, Result};

/// The resting resident set, noted when the measured stretch starts.
pub struct PeakRss {
    base_kib: i64,
}

impl PeakRss {
    /// Returns freed heap to the kernel first, so that memory the loading phase freed but malloc
    /// kept does not hide in the baseline and get reused by training unseen; the peer does the same.
    pub fn start() -> Result<Self> {
        // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps.
        unsafe { libc::malloc_trim(0) };
        let base_kib = status_kib("VmRSS")?;
        // "5" resets VmHWM to the current VmRSS (Linux >= 4.0, proc(5)).
        std::fs::write("/proc/self/clear_refs", "5")
            .context("resetting the RSS high-water mark through /proc/self/clear_refs")?;
        Ok(Self { base_kib })
    }

    /// Highest resident set since `start`, above the resting one.
    pub fn delta_bytes(&self) -> Result<i64> {
        Ok((status_kib("VmHWM")? - self.base_kib) * 1024)
    }
}

fn status_kib(field: &str) -> Result<i64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} missing from /proc/self/status"))
}
