//! One `petl run` of a job, watched line by line: when each step completed (rank 0's JSON step
//! lines, timed as they arrive), when faults were injected, and the manifest at the end.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use petl_trainer::manifest::Manifest;

use crate::job::Job;

/// What a run showed.
pub struct Watched {
    pub manifest: Manifest,
    /// (step, seconds since start) of every step line, in arrival order (a recovery repeats steps).
    pub steps: Vec<(u64, f64)>,
    /// Seconds since start of each injected fault.
    pub faults: Vec<f64>,
    /// CPU seconds (user + system) of `petl run` and every process it waited for: launcher,
    /// ranks, snapshot agents. Unlike wall time, other load on the machine barely moves it.
    pub cpu_seconds: f64,
}

/// User + system CPU seconds of every child process tree this process has reaped so far.
fn children_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer it is given, which points to one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    assert_eq!(
        rc, 0,
        "getrusage(RUSAGE_CHILDREN) cannot fail with valid arguments"
    );
    // SAFETY: initialised above (zeroed, then filled by the successful call).
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `job` with `petl` in a fresh directory, with extra flags and environment.
pub fn run(petl: &Path, job: &Job, extra: &[String], env: &[(&str, String)]) -> Result<Watched> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, job.yaml())?;
    let start = Instant::now();
    let cpu_before = children_cpu_seconds();
    let mut child = Command::new(petl)
        .arg("run")
        .arg(&file)
        .args(["--log-format", "json", "--log-every", "1"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", petl.display()))?;
    let mut steps = Vec::new();
    let mut faults = Vec::new();
    let mut tail = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let at = start.elapsed().as_secs_f64();
            if line.contains("fault injected") {
                faults.push(at);
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "step"
                && let Some(step) = v["fields"]["step"].as_u64()
            {
                steps.push((step, at));
            }
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait()?;
    let cpu_seconds = children_cpu_seconds() - cpu_before;
    if !status.success() {
        bail!("petl run failed ({status}):\n{}", tail.join("\n"));
    }
    let manifest = Manifest::read(&dir.path().join("out"))?;
    Ok(Watched {
        manifest,
        steps,
        faults,
        cpu_seconds,
    })
}

impl Watched {
    /// Mean seconds per step over the run (training time only, from the manifest's samples/s).
    pub fn step_seconds(&self, batch: usize) -> f64 {
        batch as f64 / self.manifest.metrics.samples_per_second
    }

    /// A step's time before the first fault: the median, over pairs of successive step lines,
    /// of the time between them divided by the steps between them (runs log every step, but a
    /// recovery repeats steps and a pair may straddle a gap).
    pub fn steady_step(&self) -> f64 {
        let until = self.faults.first().copied().unwrap_or(f64::INFINITY);
        let mut gaps: Vec<f64> = self
            .steps
            .windows(2)
            .filter(|w| w[1].1 < until && w[1].0 > w[0].0)
            .map(|w| (w[1].1 - w[0].1) / (w[1].0 - w[0].0) as f64)
            .collect();
        gaps.sort_by(f64::total_cmp);
        gaps.get(gaps.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// From the first fault to the first step past `kill_step` completed after the last fault
    /// (recomputation included). Faults injected at one step on several ranks strike one after
    /// the other, and a rank not yet killed may still log the kill step in between; no rank can
    /// complete a later step before the killed ones are back, so that line marks recovery.
    pub fn lost(&self, kill_step: u64) -> Option<f64> {
        let fault = *self.faults.first()?;
        let last = *self.faults.last()?;
        let past = self
            .steps
            .iter()
            .find(|(s, at)| *at > last && *s > kill_step)?
            .1;
        Some(past - fault)
    }
}
