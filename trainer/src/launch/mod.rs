//! `petl run` for a job of several ranks (or with `--kill`): the job as Kubernetes would run it,
//! on this machine. One trainer and one snapshot agent per rank on loopback with free ports, a
//! fresh job secret, the durable store and the logs under the output directory; a process that
//! dies is restarted as a kubelet would restart it (a trainer alone: it restores from its agent;
//! trainer and agent: a new agent rebuilds from peers); Ctrl-C stops them all.
//!
//! `children` starts and watches the processes, `agent` is the `petl snapshot-agent` subcommand.

pub mod agent;
mod children;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use petl_crds::{PetlJobSpec, exit_code};

use crate::cli::CommonArgs;
use crate::run::fault::{self, Fault, FaultKind};
use crate::source::Resolver;
use crate::{Error, Result};
use children::{Event, Plan, Proc, describe};

/// Starts of one process (first start included) before the launcher gives up on the job.
const MAX_STARTS: u32 = 10;

/// The signal that asked the launcher to stop (0: none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: i32) {
    STOP.store(signal, Ordering::SeqCst);
}

/// Runs `spec` (read from `job_file`, named `name`) as `spec.workers.replicas` local ranks and
/// returns the exit code: 0 after rank 0 published, a failed rank's code, or 128 + the signal.
pub fn run_local(
    job_file: &Path,
    name: &str,
    spec: &PetlJobSpec,
    output: Option<String>,
    kills: &[Fault],
    common: &CommonArgs,
) -> Result<u8> {
    let world = usize::try_from(spec.workers.replicas).unwrap_or(1).max(1);
    if world < 2 {
        return Err(Error::Config {
            field: "--kill".into(),
            message: "a fault needs spec.workers.replicas ≥ 2: a rank's snapshot shards live on the other ranks' agents".into(),
        });
    }
    for k in kills {
        if k.rank.is_none_or(|r| r >= world) {
            return Err(Error::Config {
                field: "--kill".into(),
                message: format!(
                    "{k} names no rank of this job's {world} (spec.workers.replicas); use rank=0..{}",
                    world - 1
                ),
            });
        }
    }
    let uri = output.unwrap_or_else(|| spec.output.uri.clone());
    let out = Resolver::from_env().output(&uri)?;
    let run = RunDir::create()?;
    let logs = out.join("logs");
    let durable = out.join(".snapshots");
    // A new job: no snapshot of an earlier run may be taken for this one's.
    let _ = std::fs::remove_dir_all(&durable);
    for dir in [&logs, &durable] {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let ports = free_ports(2 * world)?;
    let (trainer_ports, agent_ports) = ports.split_at(world);
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let ec = spec
        .snapshot
        .erasure_coding_for(i32::try_from(world).unwrap_or(i32::MAX));
    let every_steps = spec.snapshot.every_steps.max(1);
    let durable_every = spec
        .snapshot
        .durable
        .as_ref()
        .map_or(100, |d| d.every_snapshots.max(1))
        * every_steps;
    let config = std::fs::canonicalize(job_file).map_err(|source| Error::Io {
        path: job_file.display().to_string(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        path: "the petl executable".into(),
        source,
    })?;
    let s = |v: &dyn std::fmt::Display| v.to_string();
    let plan = Plan {
        exe,
        trainer_args: (0..world)
            .map(|rank| {
                let mut args = vec![
                    "--config".into(),
                    s(&config.display()),
                    "--rank".into(),
                    s(&rank),
                    "--world-size".into(),
                    s(&world),
                    "--peers".into(),
                    list(trainer_ports),
                    "--port".into(),
                    s(&trainer_ports[rank]),
                    "--job".into(),
                    name.into(),
                    "--secret-file".into(),
                    s(&run.secret.display()),
                    "--snapshot-socket".into(),
                    s(&run.socket(rank).display()),
                    "--output".into(),
                    s(&out.display()),
                    "--termination-log".into(),
                    s(&run.dir.join(format!("artifact-{rank}.json")).display()),
                    "--device".into(),
                    s(&common.device),
                    "--log-format".into(),
                    if rank == 0 {
                        common.log_format.as_str().into()
                    } else {
                        "json".into()
                    },
                ];
                if rank == 0
                    && let Some(addr) = common.metrics_addr
                {
                    args.extend(["--metrics-addr".into(), s(&addr)]);
                }
                if let Some(every) = common.log_every {
                    args.extend(["--log-every".into(), s(&every)]);
                }
                args
            })
            .collect(),
        agent_args: (0..world)
            .map(|rank| {
                vec![
                    "--rank".into(),
                    s(&rank),
                    "--world-size".into(),
                    s(&world),
                    "--peers".into(),
                    list(agent_ports),
                    "--data-shards".into(),
                    s(&ec.data_shards),
                    "--parity-shards".into(),
                    s(&ec.parity_shards),
                    "--listen".into(),
                    format!("127.0.0.1:{}", agent_ports[rank]),
                    "--local-socket".into(),
                    s(&run.socket(rank).display()),
                    "--job".into(),
                    name.into(),
                    "--secret-file".into(),
                    s(&run.secret.display()),
                    "--durable-dir".into(),
                    s(&durable.display()),
                    "--durable-every".into(),
                    s(&durable_every),
                ]
            })
            .collect(),
        logs: logs.clone(),
        threads: std::env::var_os("RAYON_NUM_THREADS").is_none().then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / world).max(1)
        }),
    };
    install_signal_handlers();
    eprintln!(
        "petl: {world} ranks of {name} on loopback ({}+{} erasure coding, snapshot every {every_steps} step(s), durable every {durable_every}); logs in {}",
        ec.data_shards,
        ec.parity_shards,
        logs.display()
    );
    let mut launcher = Launcher::start(plan, world, kills)?;
    let code = launcher.supervise();
    launcher.stop();
    if matches!(code, Ok(0)) {
        let _ = std::fs::remove_dir_all(&durable);
        let artifact = launcher.artifact.join("\n");
        if !artifact.trim().is_empty() {
            println!("{artifact}");
        }
    }
    code
}

/// The running job: every rank's trainer and agent, what to inject, what rank 0 printed.
struct Launcher {
    plan: Plan,
    trainers: Vec<Proc>,
    agents: Vec<Proc>,
    done: Vec<bool>,
    /// Per rank, the faults still to inject (by step).
    faults: BTreeMap<usize, Vec<Fault>>,
    events: mpsc::Sender<Event>,
    inbox: Receiver<Event>,
    /// Rank 0's stdout lines other than fault markers: the published artifact.
    artifact: Vec<String>,
    /// The trainers' stdout streams seen closed, as (rank, incarnation), whoever received the
    /// event.
    closed: BTreeSet<(usize, u32)>,
}

impl Launcher {
    fn start(plan: Plan, world: usize, kills: &[Fault]) -> Result<Launcher> {
        let (events, inbox) = mpsc::channel();
        let mut faults: BTreeMap<usize, Vec<Fault>> = BTreeMap::new();
        for k in kills {
            if let Some(rank) = k.rank {
                faults.entry(rank).or_default().push(*k);
            }
        }
        for list in faults.values_mut() {
            list.sort_by_key(|f| f.step);
        }
        let agents = (0..world)
            .map(|rank| plan.start_agent(rank, 0))
            .collect::<Result<Vec<_>>>()?;
        let mut launcher = Launcher {
            plan,
            trainers: Vec::with_capacity(world),
            agents,
            done: vec![false; world],
            faults,
            events,
            inbox,
            artifact: Vec::new(),
            closed: BTreeSet::new(),
        };
        for rank in 0..world {
            let fault = launcher.next_fault(rank);
            let proc = launcher
                .plan
                .start_trainer(rank, 0, fault, &launcher.events)?;
            launcher.trainers.push(proc);
        }
        Ok(launcher)
    }

    /// The next fault to give rank `rank`'s trainer (one per start: it dies with the first).
    fn next_fault(&mut self, rank: usize) -> Option<Fault> {
        self.faults.get(&rank).and_then(|f| f.first().copied())
    }

    /// Watches the processes until every trainer exited 0, one failed for good, or a signal.
    fn supervise(&mut self) -> Result<u8> {
        loop {
            let signal = STOP.load(Ordering::SeqCst);
            if signal != 0 {
                eprintln!("petl: signal {signal}, stopping every rank");
                return Ok(u8::try_from(128 + signal).unwrap_or(130));
            }
            if let Ok(event) = self.inbox.recv_timeout(Duration::from_millis(50)) {
                self.handle(event)?;
            }
            for rank in 0..self.trainers.len() {
                if self.done[rank] {
                    continue;
                }
                if let Some(status) = self.trainers[rank].try_wait()
                    && let Some(code) = self.trainer_ended(rank, status)?
                {
                    return Ok(code);
                }
            }
            for rank in 0..self.agents.len() {
                if let Some(status) = self.agents[rank].try_wait() {
                    if self.done.iter().all(|d| *d) {
                        continue;
                    }
                    eprintln!(
                        "petl: rank {rank}'s snapshot agent ended ({}); starting a new one",
                        describe(status)
                    );
                    self.restart_agent(rank)?;
                }
            }
            if self.done.iter().all(|d| *d) {
                return Ok(0);
            }
        }
    }

    fn handle(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Line { rank, text } => match fault::parse_marker(&text) {
                Some((rank, f)) => self.inject(rank, f)?,
                None if rank == 0 => self.artifact.push(text),
                None => {}
            },
            Event::Closed { rank, incarnation } => {
                self.closed.insert((rank, incarnation));
            }
        }
        Ok(())
    }

    /// A rank reached its fault: its trainer kills itself; the agent is killed here.
    fn inject(&mut self, rank: usize, f: Fault) -> Result<()> {
        if let Some(list) = self.faults.get_mut(&rank) {
            list.retain(|k| k.step != f.step);
        }
        eprintln!(
            "petl: fault injected: rank {rank}'s {} at step {}",
            f.what.as_str(),
            f.step
        );
        if matches!(f.what, FaultKind::Agent | FaultKind::Both) {
            let agent = &mut self.agents[rank];
            let _ = agent.child.kill();
            let _ = agent.child.wait();
            self.restart_agent(rank)?;
        }
        Ok(())
    }

    fn restart_agent(&mut self, rank: usize) -> Result<()> {
        let incarnation = self.agents[rank].incarnation + 1;
        if incarnation >= MAX_STARTS {
            let log = self.plan.logs.join(format!("agent-{rank}.log"));
            let last = std::fs::read_to_string(&log)
                .ok()
                .and_then(|t| t.lines().last().map(str::to_string))
                .unwrap_or_default();
            return Err(Error::Internal(format!(
                "rank {rank}'s snapshot agent ended {MAX_STARTS} times, last with: {last} (see {})",
                log.display()
            )));
        }
        self.agents[rank] = self.plan.start_agent(rank, incarnation)?;
        Ok(())
    }

    /// Rank `rank`'s trainer ended: done, restarted, or the job's end (`Some(code)`).
    fn trainer_ended(&mut self, rank: usize, status: ExitStatus) -> Result<Option<u8>> {
        self.drain_stdout(rank)?;
        if status.success() {
            self.done[rank] = true;
            return Ok(None);
        }
        let log = if rank == 0 {
            "the output above".to_string()
        } else {
            self.plan
                .logs
                .join(format!("rank-{rank}.log"))
                .display()
                .to_string()
        };
        if let Some(code) = status.code()
            && exit_code::PERMANENT.contains(&code)
        {
            eprintln!("petl: rank {rank} failed ({}); see {log}", describe(status));
            return Ok(Some(u8::try_from(code).unwrap_or(1)));
        }
        let incarnation = self.trainers[rank].incarnation + 1;
        if incarnation >= MAX_STARTS {
            eprintln!(
                "petl: rank {rank} ended {MAX_STARTS} times, last {}; giving up (see {log})",
                describe(status)
            );
            return Ok(Some(
                status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(exit_code::TEMP_FAIL as u8),
            ));
        }
        eprintln!(
            "petl: rank {rank}'s trainer ended ({}); restarting it",
            describe(status)
        );
        let fault = self.next_fault(rank);
        self.trainers[rank] = self
            .plan
            .start_trainer(rank, incarnation, fault, &self.events)?;
        Ok(None)
    }

    /// Handles what the ended trainer printed before its stdout closed (its fault marker). The
    /// close may already have been received by the supervising loop, which happens whenever the
    /// reader is quicker than the exit status: then there is nothing left to wait for.
    fn drain_stdout(&mut self, rank: usize) -> Result<()> {
        let incarnation = self.trainers[rank].incarnation;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.closed.contains(&(rank, incarnation)) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.inbox.recv_timeout(left) {
                Ok(event) => self.handle(event)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Stops every process still running: trainers first, then agents (which finish the commit
    /// and durable write in flight), each given a few seconds before SIGKILL.
    fn stop(&mut self) {
        for (procs, grace) in [
            (&mut self.trainers, Duration::from_secs(5)),
            (&mut self.agents, Duration::from_secs(30)),
        ] {
            for p in procs.iter() {
                p.signal(libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            for p in procs.iter_mut() {
                while p.try_wait().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if p.try_wait().is_none() {
                    tracing::warn!(
                        rank = p.rank,
                        process = p.role.as_str(),
                        "did not stop; killing it"
                    );
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                }
            }
        }
        let _ = std::io::stderr().flush();
    }
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_signal as extern "C" fn(i32) as libc::sighandler_t,
            );
        }
    }
}

/// `n` distinct free loopback ports (bound at once, then released for the children).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|source| Error::Io {
            path: "a free loopback port".into(),
            source,
        })?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|source| Error::Io {
                    path: "a free loopback port".into(),
                    source,
                })
        })
        .collect()
}

/// The launcher's private directory: the job secret (0600) and the agents' sockets; removed
/// when the launcher ends.
struct RunDir {
    dir: PathBuf,
    secret: PathBuf,
}

impl RunDir {
    fn create() -> Result<RunDir> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let suffix: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("petl-{}-{suffix:016x}", std::process::id()));
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let secret = dir.join("job-secret");
        let bytes: [u8; 32] = rand::random();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .map_err(io(&secret))?;
        file.write_all(hex::encode(bytes).as_bytes())
            .map_err(io(&secret))?;
        Ok(RunDir { dir, secret })
    }

    fn socket(&self, rank: usize) -> PathBuf {
        self.dir.join(format!("agent-{rank}.sock"))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
