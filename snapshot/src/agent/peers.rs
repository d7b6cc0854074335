//! Serving other agents: the authenticated peer port, where shards are stored and fetched,
//! commits and rollbacks announced, and statuses queried. Bad input is refused and counted.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::{Agent, HANDSHAKE_TIMEOUT};
use crate::auth;
use crate::metrics::Refused;
use crate::protocol::{Conn, Message, ProtocolError, ShardHeader};
use crate::{Error, Rejection, Result};

pub(super) async fn accept(agent: Arc<Agent>, listener: TcpListener) -> Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve(agent: Arc<Agent>, stream: TcpStream) {
    let mut conn = Conn::new(stream, agent.cfg.max_frame).with_pool(agent.pool.clone());
    let handshake = auth::accept(&mut conn, &agent.cfg.secret, &agent.cfg.job);
    let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(rank)) if (rank as usize) < agent.cfg.world_size => rank,
        Ok(Ok(rank)) => {
            agent.metrics.rejected(Refused::Rank);
            tracing::warn!(rank, "peer claims a rank outside the job");
            return;
        }
        Ok(Err(e)) => {
            agent.metrics.rejected(match e {
                Error::Auth(_) => Refused::Auth,
                _ => Refused::Handshake,
            });
            tracing::warn!(error = %e, "peer handshake refused");
            return;
        }
        Err(_) => {
            agent.metrics.rejected(Refused::Handshake);
            return;
        }
    };
    loop {
        let msg = match conn.recv().await {
            Ok(msg) => msg,
            // The peer is done with the link, or went away mid-frame (it was killed or its
            // pod replaced): nobody is left to answer.
            Err(Error::Protocol(ProtocolError::Closed | ProtocolError::Truncated { .. })) => {
                return;
            }
            Err(e @ Error::Checksum { .. }) => {
                // A whole, authenticated frame whose shard bytes miss their digest: the link
                // is intact, only this shard is refused.
                agent.metrics.rejected(Refused::Content);
                tracing::warn!(peer, error = %e, "corrupted shard from a peer");
                if conn.send(&Message::error(&e)).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                // The link's sequence is broken after a bad frame: answer, then close.
                agent.metrics.rejected(match e {
                    Error::Protocol(ProtocolError::BadMac) => Refused::Mac,
                    _ => Refused::Frame,
                });
                tracing::warn!(peer, error = %e, "bad frame from a peer");
                let _ = conn.send(&Message::error(&e)).await;
                return;
            }
        };
        let reply = match handle(&agent, peer, msg) {
            Ok(reply) => reply,
            Err(e) => {
                agent.metrics.rejected(Refused::Content);
                Message::error(&e)
            }
        };
        let sent = conn.send(&reply).await;
        agent.free_released();
        if sent.is_err() {
            return;
        }
    }
}

fn handle(agent: &Agent, peer: u32, msg: Message) -> Result<Message> {
    match msg {
        Message::StoreShard { header, data } => {
            check_shard(agent, peer, &header, &data)?;
            agent.store.lock().expect("store lock").hold(header, data);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::Commit { owner, generation } => {
            check_owner(peer, owner)?;
            agent
                .store
                .lock()
                .expect("store lock")
                .commit_held(owner, generation);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::Rollback { owner, generation } => {
            check_owner(peer, owner)?;
            agent
                .store
                .lock()
                .expect("store lock")
                .rollback_held(owner, generation);
            agent.refresh_shard_gauge();
            Ok(Message::Ack)
        }
        Message::FetchShard {
            owner,
            generation,
            index,
        } => {
            let store = agent.store.lock().expect("store lock");
            Ok(match store.held(owner, generation) {
                Some(h) if h.header.index == index => Message::Shard {
                    header: h.header,
                    data: h.data.clone(),
                },
                _ => Message::NotFound,
            })
        }
        Message::StatusQuery => Ok(Message::Status(agent.status())),
        other => Err(other.unexpected("on a peer link").into()),
    }
}

fn check_owner(peer: u32, owner: u32) -> Result<(), Rejection> {
    if peer != owner {
        return Err(Rejection::NotOwner { peer, owner });
    }
    Ok(())
}

/// A shard is stored only if it is the one this agent should hold, of the job's layout, with
/// the length its header implies (its bytes were checked against its digest on receipt).
fn check_shard(
    agent: &Agent,
    peer: u32,
    header: &ShardHeader,
    data: &[u8],
) -> Result<(), Rejection> {
    check_owner(peer, header.owner)?;
    let layout = agent.cfg.layout;
    if header.data_shards as usize != layout.data_shards
        || header.parity_shards as usize != layout.parity_shards
    {
        return Err(Rejection::WrongLayout {
            data_shards: header.data_shards,
            parity_shards: header.parity_shards,
            job_data_shards: layout.data_shards,
            job_parity_shards: layout.parity_shards,
        });
    }
    let expected = agent
        .placement
        .index_held(header.owner as usize, agent.cfg.rank);
    if expected != Some(header.index as usize) {
        return Err(Rejection::Misplaced {
            index: header.index,
            owner: header.owner,
            holder: agent.cfg.rank,
            expected,
        });
    }
    let shard_len = layout.shard_len(header.original_len as usize);
    if data.len() != shard_len {
        return Err(Rejection::ShardLength {
            len: data.len(),
            original_len: header.original_len,
            expected: shard_len,
        });
    }
    // The bytes matched `header.checksum` as they arrived (`Conn::recv` hashes bound payloads).
    Ok(())
}
