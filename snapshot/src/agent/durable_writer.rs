//! Durable checkpoints, written off the commit path: the first handoff of every span of
//! `durable_every` generations goes to the durable store, one write at a time, newest span first.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::Agent;
use crate::durable;
use crate::store::KEEP_COMMITTED;

/// Writes the first handoff of every span of `durable_every` generations to the durable store,
/// off the commit path. Taken at handoff rather than at commit so that every rank writes the
/// same generations even when the commit pipeline skips intermediate ones.
pub(super) fn write_durable(agent: &Arc<Agent>, generation: u64, bytes: Bytes) {
    if agent.cfg.durable.is_none() {
        return;
    }
    let span = span_of(agent, generation);
    if agent.durable_span.fetch_max(span, Ordering::SeqCst) >= span {
        return;
    }
    // One slot: while the volume is slow, a newer span replaces a waiting older one.
    *agent.durable_slot.lock().expect("durable slot") = Some((generation, bytes));
    if agent.durable_busy.swap(true, Ordering::SeqCst) {
        return;
    }
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || {
        loop {
            let next = agent.durable_slot.lock().expect("durable slot").take();
            let Some((generation, bytes)) = next else {
                agent.durable_busy.store(false, Ordering::SeqCst);
                // A handoff may have filled the slot after the take and before the store.
                let refilled = agent.durable_slot.lock().expect("durable slot").is_some();
                if refilled && !agent.durable_busy.swap(true, Ordering::SeqCst) {
                    continue;
                }
                return;
            };
            write_one(&agent, generation, &bytes);
        }
    });
}

/// The job resumes at `generation`: the first handoff of its span came before it (on the
/// timeline every rank shares, so it was written then), and each later span's first handoff on
/// the resumed timeline is written anew, replacing what an abandoned timeline left there. Also
/// right for a replaced agent, which starts without any span.
pub(super) fn resume_at(agent: &Agent, generation: u64) {
    agent
        .durable_span
        .store(span_of(agent, generation), Ordering::SeqCst);
}

/// 1 + the span `generation` falls in (0 means no span yet).
fn span_of(agent: &Agent, generation: u64) -> u64 {
    generation / agent.cfg.durable_every.max(1) + 1
}

fn write_one(agent: &Agent, generation: u64, bytes: &[u8]) {
    let store = agent.cfg.durable.as_ref().expect("checked by the caller");
    match durable::write_and_retain(
        store.as_ref(),
        agent.rank(),
        generation,
        bytes,
        KEEP_COMMITTED,
    ) {
        Ok(()) => {
            agent.metrics.durable_writes.inc();
        }
        Err(e) => {
            agent.metrics.durable_failures.inc();
            tracing::warn!(generation, error = %e, "durable checkpoint failed");
        }
    }
}
