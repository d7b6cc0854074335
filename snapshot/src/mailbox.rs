//! The trainer's outbox of handoffs not yet taken by the sender: the newest replaces a waiting
//! older one, except the first handoff of each durable span, which is always delivered.
//!
//! Agents write the first handoff they receive in each span of `durable_every` generations to the
//! durable store. If one rank's outbox dropped that handoff and another's did not, the ranks would
//! checkpoint different generations and the durable tier would hold no generation common to all.
//! Ranks put the same generations, so delivering every span's first makes them write the same.

use std::collections::VecDeque;

use crate::manifest::Snapshot;

/// Handoffs held at most: a span's first, the next span's first, the newest. Only a sender slower
/// than a whole durable span of steps fills it; then the oldest goes (and that rank may miss the
/// span's checkpoint, which the agreement tolerates by falling back one more span).
const MAX_WAITING: usize = 3;

#[derive(Default)]
pub struct Outbox {
    waiting: VecDeque<Snapshot>,
    /// The agent's durable interval, learned from its acknowledgements (0: no durable store);
    /// unknown at first, when every handoff counts as a span's first.
    durable_every: Option<u64>,
    /// Generation of the last handoff the sender took.
    last_taken: Option<u64>,
}

impl Outbox {
    /// Queues a handoff; returns the ones it replaced, to be freed off the caller's thread.
    pub fn put(&mut self, snapshot: Snapshot) -> Vec<Snapshot> {
        let mut replaced = Vec::new();
        if let Some(last) = self.waiting.back() {
            let before = self.waiting.iter().rev().nth(1).map(|s| s.generation);
            if !self.opens_span(last.generation, before.or(self.last_taken)) {
                replaced.extend(self.waiting.pop_back());
            }
        }
        while self.waiting.len() >= MAX_WAITING {
            replaced.extend(self.waiting.pop_front());
        }
        self.waiting.push_back(snapshot);
        replaced
    }

    /// The next handoff to send, oldest first.
    pub fn take(&mut self) -> Option<Snapshot> {
        let next = self.waiting.pop_front()?;
        self.last_taken = Some(next.generation);
        Some(next)
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Records the agent's durable interval from an acknowledgement.
    pub fn learn_durable_every(&mut self, durable_every: u64) {
        self.durable_every = Some(durable_every);
    }

    /// Whether `generation` is the first handoff of its durable span after `before`.
    fn opens_span(&self, generation: u64, before: Option<u64>) -> bool {
        match self.durable_every {
            None => true,
            Some(0) => false,
            Some(n) => before.is_none_or(|b| generation / n > b / n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(generation: u64) -> Snapshot {
        Snapshot {
            generation,
            ..Snapshot::default()
        }
    }

    fn drain(outbox: &mut Outbox) -> Vec<u64> {
        std::iter::from_fn(|| outbox.take().map(|s| s.generation)).collect()
    }

    #[test]
    fn without_a_durable_store_the_newest_replaces_a_waiting_handoff() {
        let mut outbox = Outbox::default();
        outbox.learn_durable_every(0);
        for g in 1..=5 {
            outbox.put(snap(g));
        }
        assert_eq!(drain(&mut outbox), vec![5]);
    }

    #[test]
    fn the_first_handoff_of_each_durable_span_is_always_delivered() {
        let mut outbox = Outbox::default();
        outbox.learn_durable_every(10);
        outbox.put(snap(8));
        assert_eq!(drain(&mut outbox), vec![8]);
        // 10 opens span 1 and waits while 11..14 replace one another behind it.
        let mut replaced = Vec::new();
        for g in 10..=14 {
            replaced.extend(outbox.put(snap(g)).into_iter().map(|s| s.generation));
        }
        assert_eq!(replaced, vec![11, 12, 13]);
        assert_eq!(drain(&mut outbox), vec![10, 14]);
        // Nothing in 15..19 opens a span: newest wins.
        for g in 15..=19 {
            outbox.put(snap(g));
        }
        assert_eq!(drain(&mut outbox), vec![19]);
    }

    #[test]
    fn every_rank_delivers_the_same_span_openers_whatever_its_sender_timing() {
        // Two ranks put the same generations; one sender takes each at once, the other only
        // now and then. Both must deliver the same first-of-span generations.
        let openers = |takes_every: u64| {
            let mut outbox = Outbox::default();
            outbox.learn_durable_every(4);
            let mut delivered = Vec::new();
            for g in 1..=40 {
                outbox.put(snap(g));
                if g % takes_every == 0 {
                    delivered.extend(outbox.take().map(|s| s.generation));
                }
            }
            delivered.extend(drain(&mut outbox));
            let mut first = Vec::new();
            for g in delivered {
                if first.last().is_none_or(|&f: &u64| g / 4 > f / 4) {
                    first.push(g);
                }
            }
            first
        };
        assert_eq!(openers(1), openers(3));
        assert_eq!(openers(1)[1..], [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]);
    }

    #[test]
    fn before_the_interval_is_known_nothing_waiting_is_replaced_beyond_the_bound() {
        let mut outbox = Outbox::default();
        for g in 1..=5 {
            outbox.put(snap(g));
        }
        assert_eq!(drain(&mut outbox), vec![3, 4, 5]);
    }
}
