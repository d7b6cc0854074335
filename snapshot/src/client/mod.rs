//! The trainer's side: `put` hands a snapshot to a background thread and returns at once; the
//! `sender` thread serialises it and hands it to the local agent, the `watcher` thread learns
//! when the agent committed it. `ready` tells the trainer whether the last handoff is settled;
//! agreement and restore are plain calls.
//!
//! The handoff is a move into an outbox (newest wins, see `mailbox`), so the training step never
//! waits on serialisation, the memfd or the agent; bench/snapshot measures the stall.

mod sender;
mod watcher;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

pub use crate::protocol::Tier;

use crate::agreement::Agreement;
use crate::codec::Layout;
use crate::mailbox::Outbox;
use crate::manifest::Snapshot;
use crate::protocol::{self, Message};
use crate::{Error, Result};

/// Largest reply the client accepts from its own agent (a restored snapshot).
const MAX_REPLY: usize = 1 << 40;
/// The newest generation of this rank known committed on every shard holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    pub generation: u64,
    /// When this client learned of the commit.
    pub at: SystemTime,
    /// From `put` of this generation to the commit being learned; `None` when the generation
    /// was not put by this client (a restored one, or one committed before it connected).
    pub took: Option<Duration>,
}

/// What the trainer reports about its snapshots (e.g. in the job's status).
#[derive(Clone, Debug, Default)]
pub struct ClientStatus {
    /// See [`SnapshotClient::ready`].
    pub ready: bool,
    pub last_committed: Option<CommitRecord>,
    /// A generation handed over whose commit is not known yet.
    pub committing: Option<u64>,
    /// The job's layout as the agent reported it with its first acknowledgement: the job
    /// survives the loss of `parity_shards` ranks at once from memory.
    pub layout: Option<Layout>,
    /// Handoffs replaced in the outbox before they were sent.
    pub superseded: u64,
    /// Handoffs that failed or whose generation was never committed.
    pub failed: u64,
    /// The last failure, as text (the error itself is returned by `flush`).
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Mailbox {
    outbox: Outbox,
    sending: bool,
    /// The sender is idle, asleep until woken; `put` wakes it (a busy one needs no wake).
    parked: bool,
    closed: bool,
    last_acked: Option<u64>,
    last_error: Option<Arc<Error>>,
    superseded: u64,
    failed: u64,
    discarded: Vec<Snapshot>,
    /// Generation and time of the last `put`, to time its commit.
    last_put: Option<(u64, Instant)>,
    /// A generation acknowledged by the agent whose commit the watcher is waiting to learn.
    committing: Option<u64>,
    committed: Option<CommitRecord>,
    layout: Option<Layout>,
    /// The watcher's connection, so that closing the client can interrupt its wait.
    watch_link: Option<UnixStream>,
}

impl Mailbox {
    fn ready(&self) -> bool {
        self.outbox.is_empty() && !self.sending && self.committing.is_none()
    }

    /// Records the agent's newest committed generation, when it changed.
    fn learn_committed(&mut self, newest: Option<u64>) {
        let Some(generation) = newest else {
            return;
        };
        if self.committed.is_some_and(|c| c.generation == generation) {
            return;
        }
        let took = self
            .last_put
            .filter(|(g, _)| *g == generation)
            .map(|(_, at)| at.elapsed());
        self.committed = Some(CommitRecord {
            generation,
            at: SystemTime::now(),
            took,
        });
    }
}

type Shared = Arc<(Mutex<Mailbox>, Condvar)>;

/// A trainer's connection to its snapshot agent.
pub struct SnapshotClient {
    socket: PathBuf,
    shared: Shared,
    threads: Vec<JoinHandle<()>>,
}

impl SnapshotClient {
    /// Starts the background sender and watcher; the agent need not be up yet (both retry).
    pub fn new(socket: impl AsRef<Path>) -> SnapshotClient {
        let socket = socket.as_ref().to_path_buf();
        let shared: Shared = Arc::default();
        let spawn = |name: &str, body: fn(&Path, &Shared)| {
            let (socket, shared) = (socket.clone(), shared.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&socket, &shared))
                .expect("spawning a snapshot client thread")
        };
        let threads = vec![
            spawn("petl-snapshot-send", sender::send_loop),
            spawn("petl-snapshot-watch", watcher::watch_loop),
        ];
        SnapshotClient {
            socket,
            shared,
            threads,
        }
    }

    fn mailbox(&self) -> std::sync::MutexGuard<'_, Mailbox> {
        self.shared.0.lock().expect("mailbox lock")
    }

    /// Hands a snapshot over and returns without waiting. A snapshot still waiting when the
    /// next arrives is replaced by it (the agent only ever needs the newest), unless it is the
    /// first of a durable span, which every rank delivers (see `mailbox`).
    pub fn put(&self, snapshot: Snapshot) {
        let (lock, cv) = &*self.shared;
        let wake = {
            let mut mailbox = lock.lock().expect("mailbox lock");
            mailbox.last_put = Some((snapshot.generation, Instant::now()));
            let replaced = mailbox.outbox.put(snapshot);
            mailbox.superseded += replaced.len() as u64;
            // Freeing tens of MiB (munmap) is left to the sender thread, not the step.
            mailbox.discarded.extend(replaced);
            mailbox.parked
        };
        // A busy sender finds the handoff when it is done: only an idle (parked) one is woken.
        if wake {
            cv.notify_all();
        }
    }

    /// Whether a new snapshot can be put without outrunning the last one: nothing waits in the
    /// outbox, nothing is being sent, and the last generation handed over is committed by the
    /// agent or will definitely not be (refused, superseded, its agent gone). Never blocks.
    ///
    /// Data-parallel ranks must snapshot the same generations, so at a snapshot step each rank
    /// computes `ready()`, the ranks AND it over their collective, and only if all are ready
    /// does every rank `put` that step. A commit that cannot finish (a holder is down) keeps
    /// `ready` false until it does, so the ranks never drift more than one generation apart.
    pub fn ready(&self) -> bool {
        self.mailbox().ready()
    }

    /// The newest generation of this rank known committed (by a commit this client saw, or by
    /// a restore).
    pub fn last_committed(&self) -> Option<u64> {
        self.mailbox().committed.map(|c| c.generation)
    }

    /// As [`SnapshotClient::last_committed`], with when it was learned and how long it took.
    pub fn last_commit(&self) -> Option<CommitRecord> {
        self.mailbox().committed
    }

    /// The job's layout (k data + m parity shards), known after the agent's first
    /// acknowledgement.
    pub fn layout(&self) -> Option<Layout> {
        self.mailbox().layout
    }

    /// Everything the trainer may report about snapshots, in one look.
    pub fn status(&self) -> ClientStatus {
        let mailbox = self.mailbox();
        ClientStatus {
            ready: mailbox.ready(),
            last_committed: mailbox.committed,
            committing: mailbox.committing,
            layout: mailbox.layout,
            superseded: mailbox.superseded,
            failed: mailbox.failed,
            last_error: mailbox.last_error.as_ref().map(|e| e.to_string()),
        }
    }

    /// Handoffs replaced before they were sent.
    pub fn superseded(&self) -> u64 {
        self.mailbox().superseded
    }

    /// Waits until every handed snapshot reached the agent; returns the last generation it
    /// acknowledged. A failed send is reported here.
    pub fn flush(&self, timeout: Duration) -> Result<Option<u64>> {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut mailbox = lock.lock().expect("mailbox lock");
        while !mailbox.outbox.is_empty() || mailbox.sending {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!(
                        "handoff not acknowledged by the snapshot agent at {} ({})",
                        self.socket.display(),
                        mailbox
                            .last_error
                            .as_ref()
                            .map_or("agent busy or unreachable".to_string(), |e| e.to_string())
                    ),
                    after: timeout,
                });
            }
            mailbox = cv.wait_timeout(mailbox, left).expect("mailbox lock").0;
        }
        match &mailbox.last_error {
            Some(e) => Err(Error::HandoffFailed(e.clone())),
            None => Ok(mailbox.last_acked),
        }
    }

    /// Waits until `generation` (or a newer one) is committed on every shard holder; returns the
    /// newest committed generation.
    pub fn wait_committed(&self, generation: u64, timeout: Duration) -> Result<Option<u64>> {
        let reply = self.call(
            &Message::WaitCommitted {
                generation,
                timeout_ms: timeout.as_millis() as u64,
            },
            timeout + Duration::from_secs(5),
        )?;
        match reply {
            Message::Committed { newest, .. } => Ok(newest),
            other => Err(other.unexpected("in reply to WaitCommitted").into()),
        }
    }

    /// The generation all ranks resume from, computed by the agents once every rank is
    /// reachable and settled. Call it after the last `put` of the old run (handoffs are flushed).
    pub fn agree_generation(&self, timeout: Duration) -> Result<Option<Agreement>> {
        let _ = self.flush(timeout);
        let reply = self.call(
            &Message::Agree {
                timeout_ms: timeout.as_millis() as u64,
            },
            timeout + Duration::from_secs(10),
        )?;
        match reply {
            Message::Agreement(a) => Ok(a),
            other => Err(other.unexpected("in reply to Agree").into()),
        }
    }

    /// Agrees on a generation and restores it: `Ok(None)` on a fresh job.
    pub fn restore(&self, timeout: Duration) -> Result<Option<(Snapshot, Tier)>> {
        match self.agree_generation(timeout)? {
            Some(agreement) => self
                .restore_generation(agreement.generation, timeout)
                .map(Some),
            None => Ok(None),
        }
    }

    /// Restores one generation, trying local copy, peers, durable store in turn; bytes that
    /// fail any checksum are discarded and the next tier is asked.
    pub fn restore_generation(
        &self,
        generation: u64,
        timeout: Duration,
    ) -> Result<(Snapshot, Tier)> {
        let mut from = Some(Tier::Local);
        let mut failures = Vec::new();
        while let Some(tier) = from {
            let request = Message::Restore {
                generation,
                from: tier,
            };
            let (tier, bytes) = match self.call(&request, timeout)? {
                Message::Restored { tier, snapshot } => (tier, snapshot),
                other => return Err(other.unexpected("in reply to Restore").into()),
            };
            match Snapshot::decode(&bytes) {
                Ok(s) if s.generation == generation => {
                    self.mailbox().learn_committed(Some(generation));
                    return Ok((s, tier));
                }
                Ok(s) => failures.push(format!("tier {tier:?} held generation {}", s.generation)),
                Err(e) => failures.push(format!("tier {tier:?}: {e}")),
            }
            from = tier.next();
        }
        Err(Error::Recovery(format!(
            "generation {generation}: every tier failed verification ({})",
            failures.join("; ")
        )))
    }

    /// One request on a fresh connection to the agent.
    fn call(&self, msg: &Message, timeout: Duration) -> Result<Message> {
        let mut stream = connect(&self.socket)?;
        request(&mut stream, msg, timeout)
    }
}

impl Drop for SnapshotClient {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        {
            let mut mailbox = lock.lock().expect("mailbox lock");
            mailbox.closed = true;
            // The watcher may be blocked reading a reply: end its wait now.
            if let Some(link) = &mailbox.watch_link {
                let _ = link.shutdown(std::net::Shutdown::Both);
            }
        }
        cv.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).map_err(|source| Error::Unreachable {
        what: format!(
            "the snapshot agent at {} (is the sidecar running?)",
            socket.display()
        ),
        source,
    })
}

/// One request–reply on `stream`; an `Error` reply becomes [`Error::Remote`].
fn request(stream: &mut UnixStream, msg: &Message, timeout: Duration) -> Result<Message> {
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    protocol::send_blocking(stream, msg)?;
    match protocol::recv_blocking(stream, MAX_REPLY)? {
        Message::Error { fault, message } => Err(Error::Remote {
            from: "the snapshot agent".into(),
            fault,
            message,
        }),
        reply => Ok(reply),
    }
}
