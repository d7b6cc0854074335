//! The sender thread: takes the oldest waiting handoff, writes it into a sealed memfd (or, on
//! an old kernel, sends its bytes) and waits for the agent's acknowledgement; retries while the
//! agent (re)starts. A handoff the agent acknowledged is left to the watcher. While idle, it
//! prepares the next memfd with its pages allocated, off the path from `put` to the commit.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{Shared, connect};
use crate::codec::Layout;
use crate::handoff::HandoffFile;
use crate::manifest::Snapshot;
use crate::protocol::{self, Message};
use crate::{Error, Result};

pub(super) fn send_loop(socket: &Path, shared: &Shared) {
    let (lock, cv) = &**shared;
    let mut stream: Option<UnixStream> = None;
    let mut next_file: Option<HandoffFile> = None;
    // Length of the last handoff, until a file for the next one is prepared.
    let mut to_prepare: Option<usize> = None;
    loop {
        let (snapshot, discarded) = {
            let mut mailbox = lock.lock().expect("mailbox lock");
            while mailbox.outbox.is_empty() && !mailbox.closed {
                // The next snapshot is likely the same size: allocate its pages while idle,
                // once the last one committed (before, it would take CPU from that commit).
                if let Some(len) = to_prepare.filter(|_| mailbox.committing.is_none()) {
                    drop(mailbox);
                    next_file = HandoffFile::prepare(len).ok();
                    to_prepare = None;
                    mailbox = lock.lock().expect("mailbox lock");
                    continue;
                }
                // Idle: sleep until `put`, the watcher (a commit ended) or close wakes it.
                // Polling instead, so that `put` never makes a syscall, cost about 1 % of a
                // training job's CPU; the wake costs `put` one futex call.
                mailbox.parked = true;
                mailbox = cv.wait(mailbox).expect("mailbox lock");
                mailbox.parked = false;
            }
            if mailbox.closed {
                return;
            }
            mailbox.sending = true;
            if let Some((generation, at)) = mailbox.last_put {
                tracing::debug!(
                    generation,
                    since_put_ms = at.elapsed().as_secs_f64() * 1e3,
                    "handoff taken from the outbox"
                );
            }
            let discarded = std::mem::take(&mut mailbox.discarded);
            (mailbox.outbox.take().expect("waiting"), discarded)
        };
        drop(discarded);
        let outcome = hand_over(socket, &mut stream, &snapshot, next_file.take());
        drop(snapshot);
        let handed_len = outcome.as_ref().ok().map(|ack| ack.len);
        let mut mailbox = lock.lock().expect("mailbox lock");
        mailbox.sending = false;
        match outcome {
            Ok(ack) => {
                mailbox.outbox.learn_durable_every(ack.durable_every);
                mailbox.layout = ack.layout;
                mailbox.last_acked = Some(ack.generation);
                mailbox.last_error = None;
                // The watcher takes it from here.
                mailbox.committing = Some(ack.generation);
            }
            Err(e) => {
                stream = None;
                mailbox.failed += 1;
                mailbox.last_error = Some(Arc::new(e));
            }
        }
        cv.notify_all();
        to_prepare = handed_len;
    }
}

/// What the agent acknowledged for a handoff.
struct Ack {
    /// Bytes handed over.
    len: usize,
    generation: u64,
    durable_every: u64,
    layout: Option<Layout>,
}

/// A snapshot ready to hand over: in a sealed memfd, or (fallback) as bytes for the socket.
enum Prepared {
    Memfd(std::os::fd::OwnedFd, usize),
    Inline(Vec<Vec<u8>>),
}

/// Serialises and sends one snapshot (into `file` when one was prepared); retries a few times
/// while the agent (re)starts.
fn hand_over(
    socket: &Path,
    stream: &mut Option<UnixStream>,
    snapshot: &Snapshot,
    file: Option<HandoffFile>,
) -> Result<Ack> {
    // The memfd is written once and reused by every retry; without memfds (an old kernel) the
    // bytes go through the socket instead.
    let sealing = std::time::Instant::now();
    let prepared_file = file.is_some();
    let sealed = file
        .map_or_else(HandoffFile::new, Ok)
        .and_then(|f| f.seal(snapshot));
    tracing::debug!(
        generation = snapshot.generation,
        prepared_file,
        seal_ms = sealing.elapsed().as_secs_f64() * 1e3,
        "handoff sealed"
    );
    let prepared = match sealed {
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
    let len = match &prepared {
        Prepared::Memfd(_, len) => *len,
        Prepared::Inline(pieces) => pieces.iter().map(Vec::len).sum(),
    };
    let mut last = None;
    for attempt in 0..20u32 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(25 * attempt as u64));
        }
        let result = (|| {
            if stream.is_none() {
                *stream = Some(connect(socket)?);
            }
            let s = stream.as_mut().expect("connected");
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
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
                    data_shards,
                    parity_shards,
                } => Ok(Ack {
                    len,
                    generation,
                    durable_every,
                    layout: Layout::new(data_shards as usize, parity_shards as usize).ok(),
                }),
                Message::Error { fault, message } => Err(Error::Remote {
                    from: "the snapshot agent".into(),
                    fault,
                    message,
                }),
                other => Err(other.unexpected("in reply to a handoff").into()),
            }
        })();
        match result {
            Ok(ack) => return Ok(ack),
            Err(e @ (Error::Remote { .. } | Error::Manifest(_))) => return Err(e),
            Err(e) => {
                *stream = None;
                last = Some(e);
            }
        }
    }
    Err(last.expect("twenty attempts made"))
}
