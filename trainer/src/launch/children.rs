//! The processes `petl run` starts for a job of several ranks: one trainer and one snapshot
//! agent per rank, re-executions of this binary (`petl train`, `petl snapshot-agent`), each in
//! its own process group so that Ctrl-C reaches only the launcher, which stops them in order.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Sender;

use crate::run::fault::Fault;
use crate::{Error, Result};

/// Which of a rank's two processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Trainer,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Trainer => "trainer",
            Role::Agent => "agent",
        }
    }
}

/// What a trainer's stdout reader reports.
pub enum Event {
    /// A line the trainer printed (fault markers; rank 0's artifact).
    Line { rank: usize, text: String },
    /// The trainer's stdout closed: the process `incarnation` of `rank` is gone or going.
    Closed { rank: usize, incarnation: u32 },
}

/// How to start each rank's processes.
pub struct Plan {
    pub exe: PathBuf,
    /// Per rank, the arguments after `petl train` (fault flags are added per start).
    pub trainer_args: Vec<Vec<String>>,
    /// Per rank, the arguments after `petl snapshot-agent`.
    pub agent_args: Vec<Vec<String>>,
    /// Where the logs go: `rank-<r>.log`, `agent-<r>.log` (rank 0's trainer keeps the terminal).
    pub logs: PathBuf,
    /// Compute threads per trainer (`RAYON_NUM_THREADS`): the machine's cores split over the
    /// ranks unless the variable is set, so N ranks do not each start a thread per core.
    pub threads: Option<usize>,
}

/// One running process and how often it was started.
pub struct Proc {
    pub role: Role,
    pub rank: usize,
    pub child: Child,
    /// 0 for the first start.
    pub incarnation: u32,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// Sends `signal` (SIGTERM for a clean stop, SIGKILL for an injected fault).
    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        if pid > 0 {
            // SAFETY: kill(2) on the id of a child this process started and has not reaped.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Plan {
    /// Starts rank `rank`'s trainer; its stdout lines go to `events`.
    pub fn start_trainer(
        &self,
        rank: usize,
        incarnation: u32,
        fault: Option<Fault>,
        events: &Sender<Event>,
    ) -> Result<Proc> {
        let mut command = self.command("train", &self.trainer_args[rank]);
        if let Some(threads) = self.threads {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        if let Some(f) = fault {
            command
                .arg("--fault")
                .arg(Fault { rank: None, ..f }.to_string());
        }
        command.stdout(Stdio::piped());
        if rank == 0 {
            command.stderr(Stdio::inherit());
        } else {
            command.stderr(self.log(&format!("rank-{rank}.log"))?);
        }
        let mut child = command.spawn().map_err(|e| spawn_error(&self.exe, e))?;
        if let Some(stdout) = child.stdout.take() {
            let events = events.clone();
            std::thread::Builder::new()
                .name(format!("petl-rank-{rank}-stdout"))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                        if events.send(Event::Line { rank, text: line }).is_err() {
                            return;
                        }
                    }
                    let _ = events.send(Event::Closed { rank, incarnation });
                })
                .map_err(|e| spawn_error(&self.exe, e))?;
        }
        Ok(Proc {
            role: Role::Trainer,
            rank,
            child,
            incarnation,
        })
    }

    /// Starts rank `rank`'s snapshot agent.
    pub fn start_agent(&self, rank: usize, incarnation: u32) -> Result<Proc> {
        let mut command = self.command("snapshot-agent", &self.agent_args[rank]);
        command
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent-{rank}.log"))?);
        let child = command.spawn().map_err(|e| spawn_error(&self.exe, e))?;
        Ok(Proc {
            role: Role::Agent,
            rank,
            child,
            incarnation,
        })
    }

    fn command(&self, subcommand: &str, args: &[String]) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(&self.exe);
        command.arg(subcommand).args(args).stdin(Stdio::null());
        // Its own process group: the terminal's Ctrl-C goes to the launcher alone.
        command.process_group(0);
        command
    }

    /// A log file, appended to (a restarted process continues its predecessor's log).
    fn log(&self, name: &str) -> Result<File> {
        let path = self.logs.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })
    }
}

fn spawn_error(exe: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: format!("starting {}", exe.display()),
        source,
    }
}

/// How a process ended, in words: `exit code 75`, `killed by signal 9`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".into(),
    }
}
