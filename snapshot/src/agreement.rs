//! The generation every rank resumes from: the newest one recoverable for every rank, from
//! memory (a live copy or k shards on live agents) or else from the durable store.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::placement::Placement;
use crate::protocol::AgentStatus;
use crate::{Error, Result};

/// Where the agreed generation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Local copies and peers' shards (tiers 1 and 2).
    Memory,
    /// The durable store (tier 3): more ranks were lost than the parity covers.
    Durable,
}

/// The outcome every agent computes alike from the same settled statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    pub generation: u64,
    pub source: Source,
}

/// Decides from one status per rank (index = rank). `Ok(None)` means nothing was ever
/// snapshotted: a fresh start.
pub fn decide(placement: &Placement, statuses: &[AgentStatus]) -> Result<Option<Agreement>> {
    let world = placement.world();
    if statuses.len() != world {
        return Err(Error::Recovery(format!(
            "{} statuses for {world} ranks",
            statuses.len()
        )));
    }
    let k = placement.layout().data_shards;
    // (owner, generation) → committed anywhere, and how many live holders keep a shard of it.
    let mut shards: BTreeMap<(u32, u64), (bool, usize)> = BTreeMap::new();
    for status in statuses {
        for &(owner, generation, _, committed) in &status.held {
            let entry = shards.entry((owner, generation)).or_default();
            entry.0 |= committed;
            entry.1 += 1;
        }
    }
    for (rank, status) in statuses.iter().enumerate() {
        for &(generation, committed) in &status.own {
            if committed && let Some(entry) = shards.get_mut(&(rank as u32, generation)) {
                entry.0 = true;
            }
        }
    }
    let memory: Vec<BTreeSet<u64>> = statuses
        .iter()
        .enumerate()
        .map(|(rank, status)| {
            // A live agent restores its own rank from any copy it keeps, committed or not.
            let local = status.own.iter().map(|(g, _)| *g);
            let rebuilt = shards
                .iter()
                .filter(|((o, _), (committed, n))| *o == rank as u32 && *committed && *n >= k)
                .map(|((_, g), _)| *g);
            local.chain(rebuilt).collect()
        })
        .collect();
    let durable: Vec<BTreeSet<u64>> = statuses
        .iter()
        .map(|s| s.durable.iter().copied().collect())
        .collect();
    let newest_memory = newest_common(&memory);
    let newest_durable = newest_common(&durable);
    let agreement = match (newest_memory, newest_durable) {
        (Some(m), Some(d)) if d > m => Some((d, Source::Durable)),
        (Some(m), _) => Some((m, Source::Memory)),
        (None, Some(d)) => Some((d, Source::Durable)),
        (None, None) => None,
    };
    if let Some((generation, source)) = agreement {
        return Ok(Some(Agreement { generation, source }));
    }
    let anything = statuses
        .iter()
        .any(|s| !s.own.is_empty() || !s.held.is_empty() || !s.durable.is_empty());
    if !anything {
        return Ok(None);
    }
    let detail: Vec<String> = (0..world)
        .map(|r| format!("rank {r}: memory {:?} durable {:?}", memory[r], durable[r]))
        .collect();
    Err(Error::Recovery(format!(
        "no generation is recoverable on every rank ({}); configure a durable store (--durable-dir) to survive more than {} lost ranks",
        detail.join("; "),
        placement.layout().parity_shards
    )))
}

fn newest_common(sets: &[BTreeSet<u64>]) -> Option<u64> {
    let (first, rest) = sets.split_first()?;
    first
        .iter()
        .rev()
        .find(|g| rest.iter().all(|s| s.contains(g)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Layout;

    /// Statuses of a healthy 4-rank 2+1 job that committed `generations` everywhere.
    fn healthy(generations: &[u64]) -> (Placement, Vec<AgentStatus>) {
        let p = Placement::new(4, Layout::new(2, 1).unwrap()).unwrap();
        let mut statuses: Vec<AgentStatus> = (0..4)
            .map(|r| AgentStatus {
                rank: r,
                settled: true,
                ..Default::default()
            })
            .collect();
        for owner in 0..4 {
            for &g in generations {
                statuses[owner].own.push((g, true));
                for i in 0..3 {
                    statuses[p.holder(owner, i)]
                        .held
                        .push((owner as u32, g, i as u32, true));
                }
            }
        }
        (p, statuses)
    }

    fn lose(statuses: &mut [AgentStatus], rank: usize) {
        statuses[rank] = AgentStatus {
            rank: rank as u32,
            settled: true,
            ..Default::default()
        };
    }

    #[test]
    fn a_fresh_job_has_nothing_to_agree_on() {
        let (p, statuses) = healthy(&[]);
        assert_eq!(decide(&p, &statuses).unwrap(), None);
    }

    #[test]
    fn the_newest_generation_committed_everywhere_wins() {
        let (p, mut statuses) = healthy(&[4, 5]);
        // Rank 2 committed 6 too, the others did not.
        statuses[2].own.push((6, true));
        let a = decide(&p, &statuses).unwrap().unwrap();
        assert_eq!((a.generation, a.source), (5, Source::Memory));
    }

    #[test]
    fn a_live_agents_uncommitted_copy_counts_for_its_own_rank() {
        // Ranks 0 and 1 skipped committing 6 (7 came first); rank 2 never got 7.
        let (p, mut statuses) = healthy(&[4, 5]);
        for (rank, status) in statuses.iter_mut().enumerate() {
            status.own.push((6, rank >= 2));
            if rank < 2 {
                status.own.push((7, true));
            }
        }
        let a = decide(&p, &statuses).unwrap().unwrap();
        assert_eq!((a.generation, a.source), (6, Source::Memory));
    }

    #[test]
    fn a_lost_rank_is_rebuilt_from_shards() {
        let (p, mut statuses) = healthy(&[4, 5]);
        lose(&mut statuses, 1);
        let a = decide(&p, &statuses).unwrap().unwrap();
        assert_eq!(a.generation, 5);
    }

    #[test]
    fn more_losses_than_parity_fall_back_to_durable() {
        let (p, mut statuses) = healthy(&[4, 5]);
        // With 2+1 on 4 ranks a rank holds none of its own shards: two losses still leave k.
        lose(&mut statuses, 1);
        lose(&mut statuses, 2);
        assert_eq!(
            decide(&p, &statuses).unwrap().unwrap().source,
            Source::Memory
        );
        lose(&mut statuses, 3);
        let err = decide(&p, &statuses).unwrap_err().to_string();
        assert!(err.contains("--durable-dir"), "{err}");
        for s in statuses.iter_mut() {
            s.durable = vec![2, 4];
        }
        let a = decide(&p, &statuses).unwrap().unwrap();
        assert_eq!((a.generation, a.source), (4, Source::Durable));
    }
}
