//! Starting and restarting a rank's training: every rank takes the generation its agents agree
//! on from the best tier it has, the group is (re)formed, the parameters are all-gathered, and
//! the ranks tell each other where their state came from so rank 0 can report the recovery.

use std::time::Instant;

use petl_snapshot::Tier;

use super::snapshots::{SnapshotLink, tier_name};
use crate::collective::{Collective, CollectiveError};
use crate::manifest::RecoveryRecord;
use crate::train::Trainer;
use crate::{Error, Result};

/// What a (re)start needs besides the trainer.
pub struct Resume<'a> {
    /// This rank's snapshot agent; `None` runs without snapshots (a fresh start only).
    pub link: Option<&'a SnapshotLink>,
    /// Forms a new group of all ranks.
    pub connect: &'a dyn Fn() -> Result<Box<dyn Collective>>,
    pub batches_per_epoch: usize,
}

/// Restores the agreed generation (if any), forms the group and makes every rank hold the same
/// full parameters. `new_process`: this trainer has just started (it was lost, or the job is
/// new); `since`: when the loss was noticed (or the process started). Returns the recovery the
/// ranks went through, `None` for a fresh job.
pub fn resume(
    trainer: &mut Trainer,
    resume: &Resume<'_>,
    new_process: bool,
    since: Instant,
) -> Result<Option<RecoveryRecord>> {
    trainer.drop_group();
    let restored = match resume.link {
        Some(link) => link.restore()?,
        None => None,
    };
    if restored.is_none() && !new_process {
        // Nothing committed yet: only new processes can start over from step 0 together.
        return Err(Error::NothingToRestore);
    }
    let tier = match &restored {
        Some((snapshot, tier)) => {
            trainer.restore(snapshot, resume.batches_per_epoch)?;
            Some(*tier)
        }
        None => None,
    };
    trainer.set_group((resume.connect)()?)?;
    if tier.is_some() {
        trainer.synchronize()?;
    }
    let mine = RankResume {
        generation: tier.map(|_| trainer.step()),
        tier,
        new_process,
        seconds: since.elapsed().as_secs_f64(),
    };
    let all = trainer.group()?.all_gather_bytes(&mine.encode())?;
    let ranks = all
        .iter()
        .enumerate()
        .map(|(rank, bytes)| RankResume::decode(rank, bytes))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(other) = ranks.iter().position(|r| r.generation != mine.generation) {
        return Err(Error::Internal(format!(
            "rank {} resumed from generation {:?}, rank {} from {:?}: the agents disagreed",
            trainer.rank(),
            mine.generation,
            other,
            ranks[other].generation
        )));
    }
    trainer.check_replicas()?;
    let Some(generation) = mine.generation else {
        return Ok(None);
    };
    let record = RecoveryRecord {
        restored_generation: generation,
        lost_ranks: ranks
            .iter()
            .enumerate()
            .filter(|(_, r)| r.new_process)
            .map(|(rank, _)| rank)
            .collect(),
        tiers: ranks
            .iter()
            .map(|r| r.tier.map(tier_name).unwrap_or("none").to_string())
            .collect(),
        seconds: ranks.iter().map(|r| r.seconds).fold(0.0, f64::max),
    };
    Ok(Some(record))
}

/// One rank's part of the exchange at a resume point.
#[derive(Clone, Copy, Debug, PartialEq)]
struct RankResume {
    generation: Option<u64>,
    tier: Option<Tier>,
    new_process: bool,
    seconds: f64,
}

impl RankResume {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&self.generation.unwrap_or(u64::MAX).to_le_bytes());
        out.push(self.tier.map_or(0, |t| t as u8));
        out.push(u8::from(self.new_process));
        out.extend_from_slice(&self.seconds.to_le_bytes());
        out
    }

    fn decode(rank: usize, bytes: &[u8]) -> std::result::Result<RankResume, CollectiveError> {
        let bad = || CollectiveError::Protocol {
            rank,
            reason: format!("a resume report of {} bytes", bytes.len()),
        };
        if bytes.len() != 18 {
            return Err(bad());
        }
        let generation = u64::from_le_bytes(bytes[0..8].try_into().expect("8"));
        let tier = match bytes[8] {
            0 => None,
            1 => Some(Tier::Local),
            2 => Some(Tier::Peers),
            3 => Some(Tier::Durable),
            _ => return Err(bad()),
        };
        Ok(RankResume {
            generation: (generation != u64::MAX).then_some(generation),
            tier,
            new_process: bytes[9] != 0,
            seconds: f64::from_le_bytes(bytes[10..18].try_into().expect("8")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_report_survives_its_byte_form() {
        for r in [
            RankResume {
                generation: Some(40),
                tier: Some(Tier::Peers),
                new_process: true,
                seconds: 1.5,
            },
            RankResume {
                generation: None,
                tier: None,
                new_process: false,
                seconds: 0.0,
            },
        ] {
            assert_eq!(RankResume::decode(1, &r.encode()).unwrap(), r);
        }
        assert!(RankResume::decode(1, &[0; 3]).is_err());
    }
}
