//! Agreement gathering: asks every rank's agent for its status until all are reachable and
//! settled, then decides (`agreement::decide`) the generation every rank resumes from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;

use super::{Agent, NOTICE_TIMEOUT};
use crate::agreement::{self, Agreement};
use crate::protocol::{AgentStatus, Message};
use crate::{Error, Rejection, Result};

/// Gathers every rank's status once all are reachable and settled, then decides.
pub(super) async fn agree(agent: &Arc<Agent>, timeout: Duration) -> Result<Option<Agreement>> {
    let deadline = Instant::now() + timeout;
    loop {
        let queries = (0..agent.cfg.world_size).map(|r| async move {
            if r == agent.cfg.rank {
                return Ok(agent.status());
            }
            match agent.call(r, &Message::StatusQuery, NOTICE_TIMEOUT).await? {
                Message::Status(s) if s.rank as usize == r => Ok(s),
                Message::Status(s) => Err(Rejection::StatusOfAnotherRank {
                    asked: r,
                    answered: s.rank,
                }
                .into()),
                other => Err(other.unexpected("in reply to StatusQuery").into()),
            }
        });
        let results: Vec<Result<AgentStatus>> = join_all(queries).await;
        let waiting: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(r, s)| match s {
                Ok(s) if s.settled => None,
                Ok(_) => Some(format!("rank {r} is still committing")),
                Err(e) => Some(format!("rank {r}: {e}")),
            })
            .collect();
        if waiting.is_empty() {
            let statuses: Vec<AgentStatus> = results.into_iter().map(|s| s.expect("ok")).collect();
            return agreement::decide(&agent.placement, &statuses);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "no agreement: not every rank is reachable and settled ({})",
                    waiting.join("; ")
                ),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
