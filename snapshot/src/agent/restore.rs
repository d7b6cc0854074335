//! The restore tiers: this agent's own copy, a rebuild from k shards fetched from
//! peers, or the durable store; and the rollback that voids generations after the agreed one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;

use super::{Agent, CALL_TIMEOUT, DRAIN_TIMEOUT, blocking, durable_writer};
use crate::codec::{self, Shard};
use crate::manifest;
use crate::protocol::{Message, ShardHeader, Tier};
use crate::{Error, Result};

/// Returns the encoded snapshot of this rank at `generation` from the first tier at or after
/// `from` that has it. The trainer verifies every checksum and asks again from the next tier
/// when they fail.
pub(super) async fn restore(
    agent: &Arc<Agent>,
    generation: u64,
    from: Tier,
) -> Result<(Tier, Bytes)> {
    roll_back_to(agent, generation).await;
    if from <= Tier::Local {
        let copy = agent
            .store
            .lock()
            .expect("store lock")
            .own(generation)
            .cloned();
        // Committed or not: the copy is the whole state the trainer handed over.
        if let Some(copy) = copy {
            agent.metrics.recovered(Tier::Local);
            return Ok((Tier::Local, copy.bytes));
        }
    }
    let mut reasons = Vec::new();
    if from <= Tier::Peers {
        match rebuild_from_peers(agent, generation).await {
            Ok(bytes) => {
                keep_restored(agent, generation, bytes.clone());
                agent.metrics.recovered(Tier::Peers);
                return Ok((Tier::Peers, bytes));
            }
            Err(e) => reasons.push(format!("peers: {e}")),
        }
    }
    if let Some(store) = agent.cfg.durable.clone() {
        let rank = agent.rank();
        let found = blocking("durable reader", move || store.get(rank, generation)).await??;
        if let Some(bytes) = found {
            let bytes = Bytes::from(bytes);
            keep_restored(agent, generation, bytes.clone());
            agent.metrics.recovered(Tier::Durable);
            return Ok((Tier::Durable, bytes));
        }
        reasons.push("durable: not stored".into());
    } else {
        reasons.push("durable: no --durable-dir".into());
    }
    Err(Error::Recovery(format!(
        "generation {generation} of rank {}: {}",
        agent.cfg.rank,
        reasons.join("; ")
    )))
}

/// A restored generation becomes the committed own copy: it was committed everywhere.
fn keep_restored(agent: &Agent, generation: u64, bytes: Bytes) {
    agent
        .store
        .lock()
        .expect("store lock")
        .put_own_committed(generation, bytes);
    agent.publish_committed();
}

/// Newer generations belong to a timeline the job abandons; they must not win a later
/// agreement, neither in memory (own copies, shards held by peers) nor in the durable store.
async fn roll_back_to(agent: &Arc<Agent>, generation: u64) {
    let owner = agent.rank();
    agent
        .store
        .lock()
        .expect("store lock")
        .rollback_own(generation);
    agent.publish_committed();
    // The agreed generation may be a handoff whose commit was skipped for a newer one: commit
    // it now, so that peers hold its shards and this agent reads as settled again.
    agent.handoff.notify_one();
    let msg = Message::Rollback { owner, generation };
    agent
        .notify_holders(msg, |store| store.rollback_held(owner, generation))
        .await;
    roll_back_durable(agent, generation).await;
}

/// Drops durable checkpoints of this rank newer than `generation` (a waiting one included,
/// and after the one being written finished), and restarts span counting there.
async fn roll_back_durable(agent: &Arc<Agent>, generation: u64) {
    let Some(store) = agent.cfg.durable.clone() else {
        return;
    };
    {
        let mut slot = agent.durable_slot.lock().expect("durable slot");
        if slot.as_ref().is_some_and(|(g, _)| *g > generation) {
            *slot = None;
        }
    }
    let started = Instant::now();
    while agent.durable_busy.load(Ordering::SeqCst) && started.elapsed() < DRAIN_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    durable_writer::resume_at(agent, generation);
    let rank = agent.rank();
    let removed = blocking("durable rollback", move || -> Result<Vec<u64>> {
        let newer: Vec<u64> = store
            .list(rank)?
            .into_iter()
            .filter(|&g| g > generation)
            .collect();
        for &g in &newer {
            store.remove(rank, g)?;
        }
        Ok(newer)
    })
    .await;
    match removed {
        Ok(Ok(newer)) if !newer.is_empty() => {
            tracing::info!(generation, removed = ?newer, "durable checkpoints of an abandoned timeline removed");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) | Err(e) => {
            tracing::warn!(generation, error = %e, "durable checkpoints newer than the agreed generation could not be removed");
        }
    }
}

/// Tier 2: fetches this rank's shards from their holders, keeps the intact ones, decodes.
/// Data shards are asked for first: when all k arrive intact no parity moves and nothing is
/// decoded; parity is fetched only for what is missing. Shards that fail their checksum on
/// receipt are dropped. A shard corrupted before it was checksummed passes that check but
/// spoils the decoded state, whose part checksums then fail: the agent then fetches every
/// shard and tries other sets of k (at most [`MAX_SHARD_SETS`]) before it gives up, so such a
/// state is never handed out and one bad shard does not cost the tier.
async fn rebuild_from_peers(agent: &Arc<Agent>, generation: u64) -> Result<Bytes> {
    let layout = agent.cfg.layout;
    let owner = agent.rank();
    let mut shards: Vec<Shard> = Vec::new();
    let mut original_len = None;
    let mut fetched = 0;
    for wave in [0..layout.data_shards, layout.data_shards..layout.total()] {
        if shards.len() >= layout.data_shards {
            break;
        }
        fetched = wave.end;
        fetch_wave(
            agent,
            owner,
            generation,
            wave,
            &mut shards,
            &mut original_len,
        )
        .await;
    }
    let original_len = original_len.ok_or_else(|| {
        Error::Recovery(format!(
            "no intact shard of generation {generation} on any peer"
        ))
    })?;
    let first = decode_verified(agent, original_len, shards.clone(), generation).await;
    let spoiled = match first {
        Ok(bytes) => return Ok(bytes),
        Err(e @ (Error::Checksum { .. } | Error::Manifest(_))) => e,
        Err(e) => return Err(e),
    };
    tracing::warn!(generation, error = %spoiled, "the state rebuilt from peers' shards is corrupted; trying other shard sets");
    fetch_wave(
        agent,
        owner,
        generation,
        fetched..layout.total(),
        &mut shards,
        &mut Some(original_len),
    )
    .await;
    for set in shard_sets(shards.len(), layout.data_shards).take(MAX_SHARD_SETS) {
        let chosen: Vec<Shard> = set.iter().map(|&i| shards[i].clone()).collect();
        if let Ok(bytes) = decode_verified(agent, original_len, chosen, generation).await {
            let indices: Vec<usize> = set.iter().map(|&i| shards[i].index).collect();
            tracing::info!(generation, shards = ?indices, "rebuilt from another shard set");
            return Ok(bytes);
        }
    }
    Err(Error::Recovery(format!(
        "no set of {} of the {} shards fetched for generation {generation} decodes to an intact state ({spoiled})",
        layout.data_shards,
        shards.len()
    )))
}

/// How many sets of k shards a rebuild tries once the first decoded state failed its checksums.
const MAX_SHARD_SETS: usize = 64;

/// Fetches the shards with indices in `indices` and keeps those that fit this rank, this
/// generation, the layout and the length the first one gave.
async fn fetch_wave(
    agent: &Arc<Agent>,
    owner: u32,
    generation: u64,
    indices: std::ops::Range<usize>,
    shards: &mut Vec<Shard>,
    original_len: &mut Option<u64>,
) {
    let layout = agent.cfg.layout;
    let fetches = indices.map(|i| fetch_shard(agent, owner, generation, i));
    for (header, data) in join_all(fetches).await.into_iter().flatten() {
        let fits = header.owner == owner
            && header.generation == generation
            && header.data_shards as usize == layout.data_shards
            && header.parity_shards as usize == layout.parity_shards
            && original_len.is_none_or(|l| l == header.original_len);
        // The digest is checked by `codec::decode` (remote shards also on receipt).
        if fits {
            *original_len = Some(header.original_len);
            shards.push(Shard {
                index: header.index as usize,
                checksum: header.checksum,
                data,
            });
        }
    }
}

/// Decodes `shards` off the async threads and checks the result: its manifest, every part's
/// checksum and its generation.
async fn decode_verified(
    agent: &Arc<Agent>,
    original_len: u64,
    shards: Vec<Shard>,
    generation: u64,
) -> Result<Bytes> {
    let (layout, stripe) = (agent.cfg.layout, agent.cfg.stripe);
    let bytes = blocking("decoder", move || -> Result<Vec<u8>> {
        let bytes = codec::decode(layout, original_len as usize, &shards, stripe)?;
        manifest::verify(&bytes)?;
        Ok(bytes)
    })
    .await??;
    let manifest = manifest::peek(&bytes)?;
    if manifest.generation != generation {
        return Err(Error::Recovery(format!(
            "shards of generation {generation} decode to generation {}",
            manifest.generation
        )));
    }
    Ok(Bytes::from(bytes))
}

/// Every set of `k` of the positions `0..n`, in lexicographic order.
fn shard_sets(n: usize, k: usize) -> impl Iterator<Item = Vec<usize>> {
    let mut next = (k <= n).then(|| (0..k).collect::<Vec<usize>>());
    std::iter::from_fn(move || {
        let current = next.take()?;
        let mut following = current.clone();
        // The rightmost position that can still move right, then everything after it packed.
        if let Some(i) = (0..k).rev().find(|&i| following[i] < n - k + i) {
            following[i] += 1;
            for j in i + 1..k {
                following[j] = following[j - 1] + 1;
            }
            next = Some(following);
        }
        Some(current)
    })
}

async fn fetch_shard(
    agent: &Arc<Agent>,
    owner: u32,
    generation: u64,
    index: usize,
) -> Option<(ShardHeader, Bytes)> {
    let holder = agent.placement.holder(agent.cfg.rank, index);
    let (header, data) = if holder == agent.cfg.rank {
        let store = agent.store.lock().expect("store lock");
        let held = store.held(owner, generation)?;
        (held.header, held.data.clone())
    } else {
        let msg = Message::FetchShard {
            owner,
            generation,
            index: index as u32,
        };
        match agent.call(holder, &msg, CALL_TIMEOUT).await {
            Ok(Message::Shard { header, data }) => (header, data),
            _ => return None,
        }
    };
    (header.index as usize == index).then_some((header, data))
}

#[cfg(test)]
mod tests {
    use super::shard_sets;

    #[test]
    fn shard_sets_are_every_combination_once() {
        let sets: Vec<Vec<usize>> = shard_sets(4, 2).collect();
        assert_eq!(
            sets,
            vec![
                vec![0, 1],
                vec![0, 2],
                vec![0, 3],
                vec![1, 2],
                vec![1, 3],
                vec![2, 3]
            ]
        );
        assert_eq!(shard_sets(5, 5).count(), 1);
        assert_eq!(shard_sets(2, 3).count(), 0);
        assert_eq!(shard_sets(6, 3).count(), 20);
    }
}
