//! An agent's memory: full copies of its own rank's snapshots and the shards it holds for
//! other ranks, each marked pending or committed, pruned to what an agreement can still pick.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::protocol::{AgentStatus, ShardHeader};

/// Committed generations kept per rank; the one before the newest covers a failure that
/// strikes while the newest commits on some ranks but not yet on others.
pub const KEEP_COMMITTED: usize = 2;

/// Own handoffs kept whatever their commit state. A live agent restores its own rank from any
/// of them, and ranks that train in lockstep are at most one handoff apart when one fails; the
/// commit pipeline skips intermediate handoffs independently on each rank, so the one before
/// the newest may be the only generation every rank still has.
pub const KEEP_HANDOFFS: usize = 2;

/// Most own copies kept at once. Beyond the committed and newest ones, an agent keeps its
/// copies back to the newest generation every rank whose shards it holds has committed (a rank
/// lost with its agent is rebuilt at that generation, and the others must still have it); while
/// commits lag far behind, that could grow without bound, so it stops here and the durable
/// store covers the rest.
pub const MAX_OWN_COPIES: usize = 6;

/// A full encoded snapshot of this agent's own rank.
#[derive(Clone, Debug)]
pub struct OwnCopy {
    pub bytes: Bytes,
    /// `bytes` followed by zeros to the layout's padded length, when the handoff came that way.
    pub padded: Option<Bytes>,
    pub committed: bool,
}

/// One shard of another rank's snapshot.
#[derive(Clone, Debug)]
pub struct HeldShard {
    pub header: ShardHeader,
    pub data: Bytes,
    pub committed: bool,
}

/// Own copies by generation and held shards by (owner, generation).
#[derive(Debug, Default)]
pub struct Store {
    own: BTreeMap<u64, OwnCopy>,
    held: BTreeMap<(u32, u64), HeldShard>,
    /// The bytes of pruned copies and shards, to be freed off the commit path and outside the
    /// lock (see [`Store::take_released`]): unmapping a handed-over memfd of 50 MiB and
    /// returning its pages took 20–40 ms, which was spent under the lock between the last
    /// shard's acknowledgement and the commit.
    released: Vec<Bytes>,
}

impl Store {
    /// A new handoff from the trainer. Generations at or past it belong to a timeline the trainer
    /// rolled back from, so they go.
    pub fn put_own(&mut self, generation: u64, bytes: Bytes, padded: Option<Bytes>) {
        self.retain_own(|g| g < generation);
        self.own.insert(
            generation,
            OwnCopy {
                bytes,
                padded,
                committed: false,
            },
        );
        self.prune_own();
    }

    /// A copy rebuilt by a recovery: it was committed everywhere when it was made.
    pub fn put_own_committed(&mut self, generation: u64, bytes: Bytes) {
        self.retain_own(|g| g != generation);
        self.own.insert(
            generation,
            OwnCopy {
                bytes,
                padded: None,
                committed: true,
            },
        );
        self.prune_own();
    }

    /// Marks a generation committed; false when it was dropped meanwhile.
    pub fn commit_own(&mut self, generation: u64) -> bool {
        let Some(copy) = self.own.get_mut(&generation) else {
            return false;
        };
        copy.committed = true;
        self.prune_own();
        true
    }

    /// Drops own generations newer than the one every rank resumes from.
    pub fn rollback_own(&mut self, generation: u64) {
        self.retain_own(|g| g <= generation);
    }

    pub fn own(&self, generation: u64) -> Option<&OwnCopy> {
        self.own.get(&generation)
    }

    pub fn newest_committed_own(&self) -> Option<u64> {
        self.own
            .iter()
            .rev()
            .find(|(_, c)| c.committed)
            .map(|(&g, _)| g)
    }

    /// The generation the commit pipeline should work on next: the newest handoff, when it is
    /// newer than everything committed (intermediate ones are skipped, not queued).
    pub fn next_to_commit(&self) -> Option<(u64, OwnCopy)> {
        let (&g, copy) = self.own.iter().next_back()?;
        (!copy.committed).then(|| (g, copy.clone()))
    }

    /// The generation the commit pipeline works on or will work on next, if any (as
    /// `next_to_commit`, without the copy).
    pub fn pending_own(&self) -> Option<u64> {
        let (&g, copy) = self.own.iter().next_back()?;
        (!copy.committed).then_some(g)
    }

    /// Stores a shard for its owner, replacing the same generation and dropping newer ones of a
    /// timeline the owner rolled back from.
    pub fn hold(&mut self, header: ShardHeader, data: Bytes) {
        let owner = header.owner;
        self.retain_held(|(o, g)| o != owner || g < header.generation);
        let replaced = self.held.insert(
            (owner, header.generation),
            HeldShard {
                header,
                data,
                committed: false,
            },
        );
        self.released.extend(replaced.map(|shard| shard.data));
        self.prune_held(owner);
    }

    pub fn commit_held(&mut self, owner: u32, generation: u64) {
        if let Some(shard) = self.held.get_mut(&(owner, generation)) {
            shard.committed = true;
            self.prune_held(owner);
            self.prune_own();
        }
    }

    pub fn rollback_held(&mut self, owner: u32, generation: u64) {
        self.retain_held(|(o, g)| o != owner || g <= generation);
    }

    pub fn held(&self, owner: u32, generation: u64) -> Option<&HeldShard> {
        self.held.get(&(owner, generation))
    }

    pub fn shards_held(&self) -> usize {
        self.held.len()
    }

    /// What this agent can contribute to an agreement.
    pub fn status(&self, rank: u32) -> AgentStatus {
        AgentStatus {
            rank,
            own: self.own.iter().map(|(&g, c)| (g, c.committed)).collect(),
            held: self
                .held
                .iter()
                .map(|(&(o, g), s)| (o, g, s.header.index, s.committed))
                .collect(),
            durable: Vec::new(),
            settled: true,
        }
    }

    /// Keeps the own copies an agreement may still pick (see `KEEP_COMMITTED`, `KEEP_HANDOFFS`
    /// and `MAX_OWN_COPIES`); the rest go.
    fn prune_own(&mut self) {
        let mut keep: BTreeSet<u64> = self
            .own
            .iter()
            .rev()
            .filter(|(_, c)| c.committed)
            .take(KEEP_COMMITTED)
            .map(|(&g, _)| g)
            .collect();
        keep.extend(self.own.keys().rev().take(KEEP_HANDOFFS));
        if let Some(watermark) = self.peers_committed() {
            for &g in self.own.keys().rev().take_while(|&&g| g >= watermark) {
                if keep.len() >= MAX_OWN_COPIES {
                    break;
                }
                keep.insert(g);
            }
        }
        self.retain_own(|g| keep.contains(&g));
    }

    /// The newest generation every rank whose shards this agent holds has committed, as far as
    /// the commit notices it got say.
    fn peers_committed(&self) -> Option<u64> {
        let mut newest: BTreeMap<u32, u64> = BTreeMap::new();
        for (&(owner, generation), shard) in &self.held {
            if shard.committed {
                let n = newest.entry(owner).or_default();
                *n = (*n).max(generation);
            }
        }
        newest.into_values().min()
    }

    fn prune_held(&mut self, owner: u32) {
        let mut mine: BTreeMap<u64, bool> = self
            .held
            .iter()
            .filter(|((o, _), _)| *o == owner)
            .map(|(&(_, g), s)| (g, s.committed))
            .collect();
        prune(&mut mine);
        self.retain_held(|(o, g)| o != owner || mine.contains_key(&g));
    }

    /// The bytes of everything pruned since the last call, for the caller to drop where it
    /// costs nothing (see `released`).
    pub fn take_released(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.released)
    }

    /// Keeps the own copies whose generation `keep` accepts; the rest go to `released`.
    fn retain_own(&mut self, keep: impl Fn(u64) -> bool) {
        let (kept, gone) = std::mem::take(&mut self.own)
            .into_iter()
            .partition(|(g, _)| keep(*g));
        self.own = kept;
        for (_, copy) in gone {
            self.released.push(copy.bytes);
            self.released.extend(copy.padded);
        }
    }

    /// Keeps the held shards whose (owner, generation) `keep` accepts; the rest go to
    /// `released`.
    fn retain_held(&mut self, keep: impl Fn((u32, u64)) -> bool) {
        let (kept, gone): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(key, _)| keep(*key));
        self.held = kept;
        self.released
            .extend(gone.into_values().map(|shard| shard.data));
    }
}

/// Keeps the newest `KEEP_COMMITTED` committed generations (value `true`) and pending ones newer
/// than them.
fn prune(by_generation: &mut BTreeMap<u64, bool>) {
    let committed: Vec<u64> = by_generation
        .iter()
        .rev()
        .filter(|(_, c)| **c)
        .map(|(&g, _)| g)
        .collect();
    let newest = committed.first().copied();
    let oldest_kept = committed.get(KEEP_COMMITTED - 1).copied();
    by_generation.retain(|&g, is_committed| {
        if *is_committed {
            oldest_kept.is_none_or(|o| g >= o)
        } else {
            newest.is_none_or(|n| g > n)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(owner: u32, generation: u64) -> ShardHeader {
        ShardHeader {
            owner,
            generation,
            index: 0,
            data_shards: 2,
            parity_shards: 1,
            original_len: 4,
            checksum: [0; 32],
        }
    }

    #[test]
    fn keeps_the_last_two_committed_generations_and_newer_pending() {
        let mut s = Store::default();
        for g in 1..=4 {
            s.put_own(g, Bytes::from_static(b"x"), None);
            assert!(s.commit_own(g));
        }
        s.put_own(5, Bytes::from_static(b"y"), None);
        let own: Vec<_> = s.status(0).own;
        assert_eq!(own, vec![(3, true), (4, true), (5, false)]);
        assert_eq!(s.next_to_commit().unwrap().0, 5);
    }

    #[test]
    fn the_handoff_before_the_newest_stays_when_its_commit_was_skipped() {
        let mut s = Store::default();
        s.put_own(1, Bytes::from_static(b"1"), None);
        assert!(s.commit_own(1));
        s.put_own(2, Bytes::from_static(b"2"), None);
        s.put_own(3, Bytes::from_static(b"3"), None);
        s.put_own(4, Bytes::from_static(b"4"), None);
        assert!(s.commit_own(4), "the pipeline skipped 2 and 3");
        let own: Vec<_> = s.status(0).own;
        assert_eq!(own, vec![(1, true), (3, false), (4, true)]);
    }

    #[test]
    fn own_copies_reach_back_to_what_every_peer_committed_within_a_cap() {
        let mut s = Store::default();
        s.hold(header(1, 2), Bytes::new());
        s.commit_held(1, 2);
        s.hold(header(2, 4), Bytes::new());
        s.commit_held(2, 4);
        for g in 1..=6 {
            s.put_own(g, Bytes::from_static(b"x"), None);
            assert!(s.commit_own(g));
        }
        let own: Vec<u64> = s.status(0).own.iter().map(|(g, _)| *g).collect();
        assert_eq!(
            own,
            vec![2, 3, 4, 5, 6],
            "rank 1 could be rebuilt at 2 only"
        );
        for g in 7..=12 {
            s.put_own(g, Bytes::from_static(b"x"), None);
            assert!(s.commit_own(g));
        }
        assert_eq!(s.status(0).own.len(), MAX_OWN_COPIES);
        s.hold(header(1, 12), Bytes::new());
        s.commit_held(1, 12);
        s.hold(header(2, 12), Bytes::new());
        s.commit_held(2, 12);
        let own: Vec<u64> = s.status(0).own.iter().map(|(g, _)| *g).collect();
        assert_eq!(own, vec![11, 12]);
    }

    #[test]
    fn a_pending_generation_older_than_a_commit_is_dropped() {
        let mut s = Store::default();
        s.hold(header(1, 3), Bytes::new());
        s.hold(header(1, 4), Bytes::new());
        s.commit_held(1, 4);
        assert!(s.held(1, 3).is_none());
        assert!(s.held(1, 4).unwrap().committed);
    }

    #[test]
    fn a_rolled_back_timeline_is_replaced() {
        let mut s = Store::default();
        for g in [5, 6, 7] {
            s.hold(header(2, g), Bytes::new());
            s.commit_held(2, g);
        }
        assert!(
            s.held(2, 5).is_none(),
            "only two committed generations are kept"
        );
        s.hold(header(2, 7), Bytes::from_static(b"new"));
        assert!(!s.held(2, 7).unwrap().committed);
        assert!(s.held(2, 6).unwrap().committed);
        s.rollback_held(2, 6);
        assert!(s.held(2, 7).is_none());
        s.hold(header(2, 6), Bytes::from_static(b"newer"));
        assert!(s.held(2, 6).is_some() && s.held(2, 7).is_none());
    }
}
