//! Which rank holds which shard: shard i of rank r lives on rank (r + 1 + i) mod world, so the
//! k + m shards of a rank sit on k + m distinct ranks and losing any m ranks loses no rank's state.

use crate::codec::Layout;
use crate::{Error, Result};

/// The deterministic map from (owner rank, shard index) to holder rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    world: usize,
    layout: Layout,
}

impl Placement {
    /// Needs k + m ≤ world: each holder may keep at most one shard of any owner.
    pub fn new(world: usize, layout: Layout) -> Result<Placement> {
        if layout.total() > world {
            return Err(Error::Layout(format!(
                "{}+{} shards need at least {} ranks, the job has {world}; lower dataShards/parityShards or add workers",
                layout.data_shards,
                layout.parity_shards,
                layout.total()
            )));
        }
        Ok(Placement { world, layout })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The rank that holds shard `index` of `owner`.
    pub fn holder(&self, owner: usize, index: usize) -> usize {
        (owner + 1 + index) % self.world
    }

    /// The shard index of `owner` that `holder` keeps, if any.
    pub fn index_held(&self, owner: usize, holder: usize) -> Option<usize> {
        let index = (holder + self.world - owner - 1) % self.world;
        (index < self.layout.total()).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subsets(n: usize, size: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == size)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn losing_any_m_ranks_leaves_k_shards_of_every_rank() {
        for (world, k, m) in [
            (3, 2, 1),
            (4, 2, 1),
            (6, 4, 2),
            (8, 6, 2),
            (10, 8, 2),
            (7, 3, 3),
        ] {
            let p = Placement::new(world, Layout::new(k, m).unwrap()).unwrap();
            for lost in subsets(world, m) {
                for owner in 0..world {
                    let left = (0..k + m)
                        .filter(|&i| !lost.contains(&p.holder(owner, i)))
                        .count();
                    assert!(
                        left >= k,
                        "world {world} {k}+{m}, lost {lost:?}, owner {owner}"
                    );
                }
            }
        }
    }

    #[test]
    fn index_held_inverts_holder() {
        let p = Placement::new(8, Layout::new(4, 2).unwrap()).unwrap();
        for owner in 0..8 {
            for i in 0..6 {
                assert_eq!(p.index_held(owner, p.holder(owner, i)), Some(i));
            }
            let holders: Vec<_> = (0..6).map(|i| p.holder(owner, i)).collect();
            for h in (0..8).filter(|h| !holders.contains(h)) {
                assert_eq!(p.index_held(owner, h), None);
            }
        }
    }

    #[test]
    fn refuses_more_shards_than_ranks() {
        let err = Placement::new(4, Layout::new(4, 2).unwrap()).unwrap_err();
        assert!(err.to_string().contains("at least 6 ranks"));
    }
}
