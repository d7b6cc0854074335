//! The trainer's side: `put` hands a snapshot to a background thread and returns at once; the
//! thread serialises it and sends it to the local agent. Agreement and restore are plain calls.
//!
//! The handoff is a move into an outbox (newest wins, see `mailbox`), so the training step never
//! waits on serialisation, the memfd or the agent; bench/snapshot measures the stall.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::agreement::Agreement;
use crate::handoff;
use crate::mailbox::Outbox;
use crate::manifest::Snapshot;
use crate::protocol::{self, Message};
use crate::{Error, Result};

/// Largest reply the client accepts from its own agent (a restored snapshot).
const MAX_REPLY: usize = 1 << 40;

/// Where a restored snapshot came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The local agent's copy (the trainer restarted, the agent lived).
    Local = 1,
    /// Rebuilt from k shards on peer agents (this pod was replaced).
    Peers = 2,
    /// The durable store (more than m ranks were lost).
    Durable = 3,
}

impl Tier {
    fn from_u8(tier: u8) -> Result<Tier> {
        match tier {
            1 => Ok(Tier::Local),
            2 => Ok(Tier::Peers),
            3 => Ok(Tier::Durable),
            other => Err(Error::Protocol(format!("unknown restore tier {other}"))),
        }
    }
}

#[derive(Default)]
struct Mailbox {
    outbox: Outbox,
    sending: bool,
    /// The sender sleeps until woken (no handoff for a while); otherwise it looks every
    /// `POLL` by itself and `put` need not wake it.
    parked: bool,
    closed: bool,
    last_acked: Option<u64>,
    last_error: Option<String>,
    superseded: u64,
    discarded: Vec<Snapshot>,
}

type Shared = Arc<(Mutex<Mailbox>, Condvar)>;

/// A trainer's connection to its snapshot agent.
pub struct SnapshotClient {
    socket: PathBuf,
    shared: Shared,
    sender: Option<JoinHandle<()>>,
}

impl SnapshotClient {
    /// Starts the background sender; the agent need not be up yet (the sender retries).
    pub fn new(socket: impl AsRef<Path>) -> SnapshotClient {
        let socket = socket.as_ref().to_path_buf();
        let shared: Shared = Arc::default();
        let sender = {
            let (socket, shared) = (socket.clone(), shared.clone());
            std::thread::Builder::new()
                .name("petl-snapshot-send".into())
                .spawn(move || send_loop(&socket, &shared))
                .expect("spawning the snapshot sender thread")
        };
        SnapshotClient {
            socket,
            shared,
            sender: Some(sender),
        }
    }

    /// Hands a snapshot over and returns without waiting. A snapshot still waiting when the
    /// next arrives is replaced by it (the agent only ever needs the newest), unless it is the
    /// first of a durable span, which every rank delivers (see `mailbox`).
    pub fn put(&self, snapshot: Snapshot) {
        let (lock, cv) = &*self.shared;
        let wake = {
            let mut mailbox = lock.lock().expect("mailbox lock");
            let replaced = mailbox.outbox.put(snapshot);
            mailbox.superseded += replaced.len() as u64;
            // Freeing tens of MiB (munmap) is left to the sender thread, not the step.
            mailbox.discarded.extend(replaced);
            mailbox.parked
        };
        // A busy or polling sender finds the handoff by itself: only a parked one is woken, so
        // the step rarely makes a syscall and is never preempted by the thread it wakes.
        if wake {
            cv.notify_all();
        }
    }

    /// Handoffs replaced before they were sent.
    pub fn superseded(&self) -> u64 {
        self.shared.0.lock().expect("mailbox lock").superseded
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
                return Err(Error::Agent(format!(
                    "handoff not acknowledged within {timeout:?}: {}",
                    mailbox
                        .last_error
                        .as_deref()
                        .unwrap_or("agent busy or unreachable")
                )));
            }
            mailbox = cv.wait_timeout(mailbox, left).expect("mailbox lock").0;
        }
        match &mailbox.last_error {
            Some(e) => Err(Error::Agent(e.clone())),
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
            Message::Committed { newest } => Ok(newest),
            other => Err(unexpected(&other)),
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
            other => Err(unexpected(&other)),
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
        let mut from_tier = 1;
        let mut failures = Vec::new();
        while from_tier <= 3 {
            let request = Message::Restore {
                generation,
                from_tier,
            };
            let (tier, bytes) = match self.call(&request, timeout)? {
                Message::Restored { tier, snapshot } => (Tier::from_u8(tier)?, snapshot),
                other => return Err(unexpected(&other)),
            };
            match Snapshot::decode(&bytes) {
                Ok(s) if s.generation == generation => return Ok((s, tier)),
                Ok(s) => failures.push(format!("tier {tier:?} held generation {}", s.generation)),
                Err(e) => failures.push(format!("tier {tier:?}: {e}")),
            }
            from_tier = tier as u8 + 1;
        }
        Err(Error::Recovery(format!(
            "generation {generation}: every tier failed verification ({})",
            failures.join("; ")
        )))
    }

    /// One request on a fresh connection to the agent.
    fn call(&self, msg: &Message, timeout: Duration) -> Result<Message> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| {
            Error::Agent(format!(
                "cannot reach the snapshot agent at {}: {e}; is the sidecar running?",
                self.socket.display()
            ))
        })?;
        stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        protocol::send_blocking(&mut stream, msg)?;
        match protocol::recv_blocking(&mut stream, MAX_REPLY)? {
            Message::Error { message } => Err(Error::Agent(message)),
            reply => Ok(reply),
        }
    }
}

impl Drop for SnapshotClient {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().expect("mailbox lock").closed = true;
        cv.notify_all();
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
    }
}

fn unexpected(msg: &Message) -> Error {
    let name = format!("{msg:?}");
    Error::Protocol(format!(
        "unexpected reply {} from the agent",
        name.split([' ', '(', '{']).next().unwrap_or("?")
    ))
}

/// How often an idle sender looks for a handoff by itself, and for how long after its last one
/// before it parks until woken: a trainer snapshotting every few steps never wakes it.
const POLL: Duration = Duration::from_millis(2);
const STAY_AWAKE: Duration = Duration::from_secs(5);

fn send_loop(socket: &Path, shared: &Shared) {
    let (lock, cv) = &**shared;
    let mut stream: Option<UnixStream> = None;
    let mut last_handoff = Instant::now();
    loop {
        let (snapshot, discarded) = {
            let mut mailbox = lock.lock().expect("mailbox lock");
            while mailbox.outbox.is_empty() && !mailbox.closed {
                if last_handoff.elapsed() < STAY_AWAKE {
                    mailbox = cv.wait_timeout(mailbox, POLL).expect("mailbox lock").0;
                } else {
                    mailbox.parked = true;
                    mailbox = cv.wait(mailbox).expect("mailbox lock");
                    mailbox.parked = false;
                }
            }
            if mailbox.closed {
                return;
            }
            mailbox.sending = true;
            let discarded = std::mem::take(&mut mailbox.discarded);
            (mailbox.outbox.take().expect("waiting"), discarded)
        };
        drop(discarded);
        let outcome = hand_over(socket, &mut stream, &snapshot);
        drop(snapshot);
        last_handoff = Instant::now();
        let mut mailbox = lock.lock().expect("mailbox lock");
        mailbox.sending = false;
        match outcome {
            Ok((generation, durable_every)) => {
                mailbox.outbox.learn_durable_every(durable_every);
                mailbox.last_acked = Some(generation);
                mailbox.last_error = None;
            }
            Err(e) => {
                stream = None;
                mailbox.last_error = Some(e.to_string());
            }
        }
        cv.notify_all();
    }
}

/// Serialises and sends one snapshot; retries a few times while the agent (re)starts.
/// A snapshot ready to hand over: in a sealed memfd, or (fallback) as bytes for the socket.
enum Prepared {
    Memfd(std::os::fd::OwnedFd, usize),
    Inline(Vec<Vec<u8>>),
}

/// Returns the acknowledged generation and the agent's durable interval.
fn hand_over(
    socket: &Path,
    stream: &mut Option<UnixStream>,
    snapshot: &Snapshot,
) -> Result<(u64, u64)> {
    // The memfd is written once and reused by every retry; without memfds (an old kernel) the
    // bytes go through the socket instead.
    let prepared = match handoff::write_sealed(snapshot) {
        Ok((fd, len)) => Prepared::Memfd(fd, len),
        Err(e @ Error::Manifest(_)) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "memfd handoff unavailable, sending through the socket");
            let (head, parts) = snapshot.encode_parts()?;
            Prepared::Inline(
                std::iter::once(head)
                    .chain(parts.iter().map(|p| p.to_vec()))
                    .collect(),
            )
        }
    };
    let mut last = None;
    for attempt in 0..20u32 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(25 * attempt as u64));
        }
        let result = (|| {
            if stream.is_none() {
                let s = UnixStream::connect(socket)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                *stream = Some(s);
            }
            let s = stream.as_mut().expect("connected");
            match &prepared {
                Prepared::Memfd(fd, len) => {
                    protocol::send_put_fd_blocking(s, *len as u64, fd.as_fd())?
                }
                Prepared::Inline(pieces) => {
                    let pieces: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
                    protocol::send_put_blocking(s, &pieces)?
                }
            }
            match protocol::recv_blocking(s, 1 << 20)? {
                Message::PutAck {
                    generation,
                    durable_every,
                } => Ok((generation, durable_every)),
                Message::Error { message } => Err(Error::Agent(message)),
                other => Err(unexpected(&other)),
            }
        })();
        match result {
            Ok(generation) => return Ok(generation),
            Err(e @ (Error::Agent(_) | Error::Manifest(_))) => return Err(e),
            Err(e) => {
                *stream = None;
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Agent("handoff failed".into())))
}
