//! The one small exchange every step makes: each rank's loss and squared gradient norm, whether
//! its snapshot agent is ready, its newest committed generation, whether it must stop, and
//! (every few steps) a digest of its parameters — all in one `all_gather_bytes`, combined in
//! rank order so every rank computes the same bits.

use crate::collective::{Collective, CollectiveError};
use crate::{Error, Result};

/// What one rank contributes to a step's exchange.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankReport {
    /// Mean loss over this rank's slice of the global batch.
    pub loss: f64,
    /// `Σ g²` of this rank's reduced gradient pieces (not yet scaled by 1/N²).
    pub sum_of_squares: f64,
    /// The snapshot agent has nothing waiting or in flight: a handoff now would not queue.
    pub snapshot_ready: bool,
    /// This rank's newest generation committed by its agent.
    pub committed: Option<u64>,
    /// This rank wants the run to end after this step (its wall-clock budget ran out).
    pub stop: bool,
    /// BLAKE3 of every parameter, on the steps that check for divergence.
    pub digest: Option<[u8; 32]>,
}

const READY: u8 = 1;
const STOP: u8 = 2;
const COMMITTED: u8 = 4;
const DIGEST: u8 = 8;
/// Bytes before the optional digest: loss, sum of squares, flags, committed generation.
const FIXED: usize = 8 + 8 + 1 + 8;

impl RankReport {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED + 32);
        out.extend_from_slice(&self.loss.to_le_bytes());
        out.extend_from_slice(&self.sum_of_squares.to_le_bytes());
        let mut flags = 0;
        for (set, bit) in [
            (self.snapshot_ready, READY),
            (self.stop, STOP),
            (self.committed.is_some(), COMMITTED),
            (self.digest.is_some(), DIGEST),
        ] {
            if set {
                flags |= bit;
            }
        }
        out.push(flags);
        out.extend_from_slice(&self.committed.unwrap_or(0).to_le_bytes());
        if let Some(d) = &self.digest {
            out.extend_from_slice(d);
        }
        out
    }

    fn decode(rank: usize, bytes: &[u8]) -> std::result::Result<RankReport, CollectiveError> {
        let bad = || CollectiveError::Protocol {
            rank,
            reason: format!("a step report of {} bytes", bytes.len()),
        };
        if bytes.len() < FIXED {
            return Err(bad());
        }
        let f64_at = |at: usize| f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let flags = bytes[16];
        let committed = u64::from_le_bytes(bytes[17..25].try_into().expect("8"));
        let digest = if flags & DIGEST != 0 {
            let d: [u8; 32] = bytes
                .get(FIXED..FIXED + 32)
                .ok_or_else(bad)?
                .try_into()
                .expect("32");
            Some(d)
        } else {
            None
        };
        Ok(RankReport {
            loss: f64_at(0),
            sum_of_squares: f64_at(8),
            snapshot_ready: flags & READY != 0,
            committed: (flags & COMMITTED != 0).then_some(committed),
            stop: flags & STOP != 0,
            digest,
        })
    }
}

/// What every rank knows after the exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct StepAgreement {
    /// The loss of the global batch: the mean of the ranks' (equal-sized) slices.
    pub loss: f64,
    /// `Σ` over ranks of their sums of squares.
    pub sum_of_squares: f64,
    /// Every rank's agent is ready: a snapshot of this step may be handed over.
    pub snapshot_ready: bool,
    /// The newest generation committed on every rank.
    pub committed: Option<u64>,
    pub stop: bool,
}

/// Exchanges `mine` with every rank. `step` names the step in a divergence error.
pub fn exchange(group: &mut dyn Collective, mine: &RankReport, step: u64) -> Result<StepAgreement> {
    let all = group.all_gather_bytes(&mine.encode())?;
    let reports = all
        .iter()
        .enumerate()
        .map(|(rank, bytes)| RankReport::decode(rank, bytes))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    check_digests(&reports, step)?;
    let n = reports.len().max(1) as f64;
    let mut loss = 0.0;
    let mut sum_of_squares = 0.0;
    for r in &reports {
        loss += r.loss;
        sum_of_squares += r.sum_of_squares;
    }
    let committed = reports
        .iter()
        .map(|r| r.committed)
        .try_fold(u64::MAX, |low, c| c.map(|c| low.min(c)));
    Ok(StepAgreement {
        loss: loss / n,
        sum_of_squares,
        snapshot_ready: reports.iter().all(|r| r.snapshot_ready),
        committed: committed.filter(|_| !reports.is_empty()),
        stop: reports.iter().any(|r| r.stop),
    })
}

/// Fails with the ranks whose digest differs from rank 0's, when the ranks sent digests.
fn check_digests(reports: &[RankReport], step: u64) -> Result<()> {
    let Some(reference) = reports.first().and_then(|r| r.digest) else {
        return Ok(());
    };
    let differing: Vec<usize> = reports
        .iter()
        .enumerate()
        .filter(|(_, r)| r.digest != Some(reference))
        .map(|(rank, _)| rank)
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(Error::ReplicasDiverged {
            step,
            ranks: differing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::Solo;
    use crate::sharding::test_group::ThreadGroup;

    #[test]
    fn a_report_survives_its_byte_form() {
        let r = RankReport {
            loss: 0.25,
            sum_of_squares: 3.5,
            snapshot_ready: true,
            committed: Some(41),
            stop: false,
            digest: Some([7; 32]),
        };
        assert_eq!(RankReport::decode(0, &r.encode()).unwrap(), r);
        let plain = RankReport::default();
        assert_eq!(RankReport::decode(0, &plain.encode()).unwrap(), plain);
        assert!(RankReport::decode(3, &[0; 5]).is_err());
    }

    #[test]
    fn ranks_agree_on_the_mean_loss_the_summed_norm_and_the_weakest_snapshot_state() {
        let agreed = ThreadGroup::run(3, |rank, group| {
            let mine = RankReport {
                loss: rank as f64,
                sum_of_squares: 1.0,
                snapshot_ready: rank != 1,
                committed: Some(10 - rank as u64),
                stop: rank == 2,
                digest: None,
            };
            exchange(group, &mine, 5).unwrap()
        });
        for a in &agreed {
            assert_eq!(a.loss, 1.0);
            assert_eq!(a.sum_of_squares, 3.0);
            assert!(!a.snapshot_ready);
            assert_eq!(a.committed, Some(8));
            assert!(a.stop);
        }
        let alone = exchange(&mut Solo, &RankReport::default(), 0).unwrap();
        assert_eq!(alone.committed, None);
        assert!(!alone.stop);
    }

    #[test]
    fn a_differing_digest_stops_every_rank_naming_the_rank_and_step() {
        let errors = ThreadGroup::run(3, |rank, group| {
            let mine = RankReport {
                digest: Some(if rank == 2 { [1; 32] } else { [0; 32] }),
                ..RankReport::default()
            };
            exchange(group, &mine, 40).unwrap_err()
        });
        for e in errors {
            match e {
                Error::ReplicasDiverged { step, ranks } => {
                    assert_eq!((step, ranks), (40, vec![2]));
                }
                other => panic!("{other}"),
            }
        }
    }
}
