//! Child processes that cannot outlive their harness: own process group, log file, kill on drop.
//! Also picks free loopback ports for them.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::error::{Error, IoContext, Result};

/// Spawns children from one dedicated thread that lives exactly as long as the
/// harness: the kernel's parent-death signal fires when the *spawning thread*
/// exits, so spawning from a tokio worker could kill a child early, while this
/// thread only ends on drop (or when the test process dies, even by SIGKILL).
pub(crate) struct Spawner {
    requests: Option<mpsc::Sender<SpawnRequest>>,
    thread: Option<JoinHandle<()>>,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

impl Spawner {
    pub(crate) fn new() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let thread = std::thread::Builder::new()
            .name("petl-test-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .context(|| "starting the process spawner thread".to_string())?;
        Ok(Self {
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Starts `program` in its own process group with stdout and stderr going to `log`.
    pub(crate) fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Supervised> {
        let out = File::create(log).context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .context(|| format!("cloning {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only calls prctl(2),
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        let spawned = self
            .requests
            .as_ref()
            .and_then(|requests| requests.send((command, reply_tx)).ok())
            .and_then(|()| reply_rx.recv().ok());
        let child = match spawned {
            Some(result) => result.context(|| format!("starting {}", program.display()))?,
            None => {
                return Err(Error::Io {
                    what: format!("starting {name}"),
                    source: std::io::Error::other("the spawner thread has stopped"),
                });
            }
        };
        Ok(Supervised {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            reaped: false,
        })
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running component; killed with its whole process group on drop.
pub(crate) struct Supervised {
    pub(crate) name: String,
    child: Child,
    log: PathBuf,
    /// Once waited for, its pid may belong to someone else: never signal it again.
    reaped: bool,
}

impl Supervised {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail when the process has already exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.reaped = true;
                Err(Error::Exited {
                    component: self.name.clone(),
                    status: status.to_string(),
                    log_tail: self.log_tail(40),
                })
            }
            Err(source) => Err(Error::Io {
                what: format!("checking on {}", self.name),
                source,
            }),
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    pub(crate) fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // The group id is the child's pid (process_group(0)); signal the group so
        // anything the component forked goes too.
        let pid = self.child.id() as i32;
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Waits up to `timeout` for the process to exit by itself; true when it did (it is then
    /// reaped, and `kill` does nothing).
    pub(crate) fn wait_exit(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    self.reaped = true;
                    return true;
                }
                Ok(None) if std::time::Instant::now() > deadline => return false,
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file, each indented, or a note when unreadable.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut tail = format!("  ({})\n", path.display());
            for line in &all[start..] {
                tail.push_str("  ");
                tail.push_str(line);
                tail.push('\n');
            }
            tail
        }
        Err(e) => format!("  (cannot read {}: {e})\n", path.display()),
    }
}

/// A loopback port that was free a moment ago. Another process may still take it
/// before the component binds; callers retry startup when a bind fails.
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context(|| "binding 127.0.0.1:0 to find a free port".to_string())?;
    let port = listener
        .local_addr()
        .context(|| "reading a bound port".to_string())?
        .port();
    Ok(port)
}
