//! The commit pipeline: the newest handed-over generation is hashed, Reed–Solomon encoded and
//! spread shard by shard to its holders; once every holder acknowledged, it is committed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;

use super::{Agent, CALL_TIMEOUT, Request, cpu};
use crate::codec;
use crate::protocol::{Message, ShardHeader};
use crate::store::OwnCopy;
use crate::{Error, Result};

pub(super) async fn commit_loop(agent: Arc<Agent>) {
    loop {
        let notified = agent.handoff.notified();
        let next = agent.store.lock().expect("store lock").next_to_commit();
        let Some((generation, copy)) = next else {
            notified.await;
            continue;
        };
        agent.committing.store(true, Ordering::SeqCst);
        if let Err(e) = commit(&agent, generation, copy).await {
            tracing::info!(generation, error = %e, "generation not committed");
        }
        agent.committing.store(false, Ordering::SeqCst);
    }
}

/// Encodes one generation, stores every shard on its holder, and commits once all acknowledged.
/// Each data shard is hashed and sent on its own, so hashing one overlaps sending another and
/// the data shards (slices of the handoff) leave while the parity is still being computed; the
/// parity is hashed stripe by stripe as it is computed, in the same pass.
async fn commit(agent: &Arc<Agent>, generation: u64, copy: OwnCopy) -> Result<()> {
    let layout = agent.cfg.layout;
    let original_len = copy.bytes.len();
    let shard_len = layout.shard_len(original_len);
    let stripe = agent.cfg.stripe;
    let started = Instant::now();
    let padded = match copy.padded {
        Some(padded) => padded,
        None => {
            cpu("padding", original_len, move || {
                codec::pad(layout, copy.bytes)
            })
            .await?
        }
    };
    tracing::debug!(generation, bytes = original_len, "commit started");
    let header = |index: usize, checksum: Option<[u8; 32]>| ShardHeader {
        owner: agent.rank(),
        generation,
        index: index as u32,
        data_shards: layout.data_shards as u16,
        parity_shards: layout.parity_shards as u16,
        original_len: original_len as u64,
        checksum: checksum.unwrap_or_default(),
    };
    // Each data shard on a task of its own, so both workers hash and send them.
    let data_sends = join_all((0..layout.data_shards).map(|i| {
        let (agent, header) = (agent.clone(), header(i, None));
        let data = padded.slice(i * shard_len..(i + 1) * shard_len);
        tokio::spawn(async move { store_shard(&agent, header, data, false).await })
    }));
    let parity_sends = async {
        let input = padded.clone();
        let pool = agent.pool.clone();
        let parity = cpu("encoder", input.len(), move || {
            let mut parity: Vec<Vec<u8>> = (0..layout.parity_shards)
                .map(|_| pool.take(shard_len))
                .collect();
            let checksums = codec::encode_parity_checksummed_into(
                layout,
                &input,
                shard_len,
                stripe,
                &mut parity,
            )?;
            Ok::<_, Error>(
                parity
                    .into_iter()
                    .map(|p| pool.share(p))
                    .zip(checksums)
                    .collect::<Vec<_>>(),
            )
        })
        .await??;
        tracing::debug!(generation, "parity encoded");
        agent
            .metrics
            .encode_seconds
            .observe(started.elapsed().as_secs_f64());
        let sends = parity.into_iter().enumerate().map(|(j, (p, checksum))| {
            store_shard(
                agent,
                header(layout.data_shards + j, Some(checksum)),
                p,
                true,
            )
        });
        Ok::<_, Error>(join_all(sends).await)
    };
    let (data_sent, parity_sent) = futures::join!(data_sends, parity_sends);
    for result in data_sent {
        result.map_err(|source| Error::Task {
            what: "sending a data shard",
            source,
        })??;
    }
    for result in parity_sent? {
        result?;
    }
    let send_s = started.elapsed().as_secs_f64();
    agent.metrics.send_seconds.observe(send_s);
    tracing::debug!(generation, "every shard stored");
    let committed_own = agent
        .store
        .lock()
        .expect("store lock")
        .commit_own(generation);
    tracing::debug!(generation, "own copy marked committed");
    if !committed_own {
        return Err(Error::Superseded {
            generation,
            unreachable: None,
        });
    }
    // The holders learn of the commit before the trainer does: a generation the trainer saw
    // committed stays recoverable from the holders even if this agent dies right after.
    let announcing = Instant::now();
    announce_commit(agent, generation).await;
    tracing::debug!(
        generation,
        encode_and_send_ms = send_s * 1e3,
        announce_ms = announcing.elapsed().as_secs_f64() * 1e3,
        "committed"
    );
    agent.metrics.generations_committed.inc();
    agent.metrics.committed_generation.set(generation as i64);
    agent.publish_committed();
    agent.free_released();
    Ok(())
}

/// Sends one shard to its holder until acknowledged, or gives up once a newer handoff makes
/// this generation moot (a dead holder would otherwise block every later commit). Without a
/// `checksummed` header, the shard is hashed while it is sent (or, kept here, before).
async fn store_shard(
    agent: &Arc<Agent>,
    mut header: ShardHeader,
    data: Bytes,
    mut checksummed: bool,
) -> Result<()> {
    let (generation, index) = (header.generation, header.index);
    let holder = agent.placement.holder(agent.cfg.rank, index as usize);
    if holder == agent.cfg.rank {
        if !checksummed {
            let hashed = data.clone();
            header.checksum = cpu("checksum", data.len(), move || {
                codec::shard_checksum(&hashed)
            })
            .await?;
        }
        agent.store.lock().expect("store lock").hold(header, data);
        agent.refresh_shard_gauge();
        tracing::debug!(generation, index, "shard stored");
        return Ok(());
    }
    let mut backoff = Duration::from_millis(20);
    loop {
        let msg;
        let request = if checksummed {
            msg = Message::StoreShard {
                header,
                data: data.clone(),
            };
            Request::Message(&msg)
        } else {
            Request::HashedShard(&header, &data)
        };
        let reply = agent.request(holder, request, CALL_TIMEOUT).await;
        if let Ok((_, Some(digest))) = &reply {
            // Retries send the digest as computed; the bytes are sealed, it cannot change.
            header.checksum = *digest;
            checksummed = true;
        }
        match reply {
            Ok((Message::Ack, _)) => {
                tracing::debug!(generation, index, "shard stored");
                return Ok(());
            }
            Ok((other, _)) => {
                tracing::warn!(holder, reply = %other.kind(), "unexpected reply to a shard")
            }
            Err(e) => tracing::debug!(holder, error = %e, "shard not stored yet"),
        }
        let superseded = agent
            .store
            .lock()
            .expect("store lock")
            .pending_own()
            .is_none_or(|g| g != header.generation);
        if superseded {
            return Err(Error::Superseded {
                generation: header.generation,
                unreachable: Some(holder),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Tells every holder the generation is committed. Holders that miss it keep the shard as
/// pending; the agreement still counts it while some agent knows of the commit.
async fn announce_commit(agent: &Arc<Agent>, generation: u64) {
    let owner = agent.rank();
    let msg = Message::Commit { owner, generation };
    agent
        .notify_holders(msg, |store| store.commit_held(owner, generation))
        .await;
}
