//! The trainer's side of the agent: the local Unix socket, where handoffs arrive (as a memfd or
//! inline), and agreement, restore and commit waits are asked for.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{UnixListener, UnixStream};

use super::{Agent, agree, durable_writer, restore};
use crate::handoff;
use crate::manifest;
use crate::protocol::{Conn, Message, ProtocolError};
use crate::{Error, Rejection, Result};

pub(super) async fn accept(agent: Arc<Agent>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(agent: Arc<Agent>, stream: UnixStream) {
    let mut conn = Conn::new(stream, agent.cfg.max_frame);
    loop {
        let (msg, fd) = match conn.recv_local().await {
            Ok(received) => received,
            // The trainer is done with this connection (or went away mid-frame: nobody to answer).
            Err(Error::Protocol(ProtocolError::Closed | ProtocolError::Truncated { .. })) => {
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from the trainer");
                let _ = conn.send(&Message::error(&e)).await;
                return;
            }
        };
        let reply = match handle(&agent, msg, fd).await {
            Ok(reply) => reply,
            Err(e) => Message::error(&e),
        };
        let sent = conn.send(&reply).await;
        agent.free_released();
        if sent.is_err() {
            return;
        }
    }
}

async fn handle(agent: &Arc<Agent>, msg: Message, fd: Option<OwnedFd>) -> Result<Message> {
    match msg {
        Message::Put { snapshot } => take_handoff(agent, snapshot, None),
        Message::PutFd { len } => {
            let fd = fd.ok_or(Rejection::MissingDescriptor)?;
            if len > agent.cfg.max_frame as u64 {
                return Err(Rejection::HandoffTooLarge {
                    len,
                    limit: agent.cfg.max_frame,
                }
                .into());
            }
            let len = len as usize;
            let padded_len = agent.cfg.layout.padded_len(len);
            // Growing, sealing and mapping (not populated) are a few syscalls: inline.
            let padded = handoff::map_padded(fd, len, padded_len)?;
            take_handoff(agent, padded.slice(..len), Some(padded))
        }
        Message::Agree { timeout_ms } => {
            let agreement = agree::agree(agent, Duration::from_millis(timeout_ms)).await?;
            Ok(Message::Agreement(agreement))
        }
        Message::Restore { generation, from } => {
            let (tier, snapshot) = restore::restore(agent, generation, from).await?;
            Ok(Message::Restored { tier, snapshot })
        }
        Message::WaitCommitted {
            generation,
            timeout_ms,
        } => {
            let mut rx = agent.committed.subscribe();
            let wait = rx.wait_for(|c| c.is_some_and(|c| c >= generation));
            let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), wait).await;
            // Committed means published, which is after the holders were told; a generation
            // committed in the store but still being announced is reported as pending, so a
            // reply in between never reads as "neither".
            let newest = *agent.committed.borrow();
            let store = agent.store.lock().expect("store lock");
            let announcing = store.newest_committed_own().filter(|&g| Some(g) != newest);
            Ok(Message::Committed {
                newest,
                pending: store.pending_own().or(announcing),
            })
        }
        Message::StatusQuery => Ok(Message::Status(agent.status())),
        other => Err(other.unexpected("on the local socket").into()),
    }
}

/// Keeps a handed-over snapshot as the newest own copy and wakes the commit pipeline.
fn take_handoff(agent: &Arc<Agent>, snapshot: Bytes, padded: Option<Bytes>) -> Result<Message> {
    let generation = manifest::peek(&snapshot)?.generation;
    tracing::debug!(generation, bytes = snapshot.len(), "handoff taken");
    agent.metrics.snapshot_bytes.set(snapshot.len() as i64);
    agent
        .store
        .lock()
        .expect("store lock")
        .put_own(generation, snapshot.clone(), padded);
    agent.publish_committed();
    agent.handoff.notify_one();
    durable_writer::write_durable(agent, generation, snapshot);
    let durable_every = match agent.cfg.durable {
        Some(_) => agent.cfg.durable_every.max(1),
        None => 0,
    };
    Ok(Message::PutAck {
        generation,
        durable_every,
        data_shards: agent.cfg.layout.data_shards as u16,
        parity_shards: agent.cfg.layout.parity_shards as u16,
    })
}
