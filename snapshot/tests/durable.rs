//! The durable tier with real agent processes: every rank checkpoints the same generations even
//! when its trainer's handoffs are superseded, and a SIGTERM'd agent finishes its write first.

mod cluster;

use std::time::{Duration, Instant};

use cluster::{Cluster, SIZE, TIMEOUT, state};
use petl_snapshot::{DurableStore, Snapshot};

#[test]
fn every_rank_checkpoints_the_same_generations_when_handoffs_are_superseded() {
    let durable_every = 10;
    let cluster = Cluster::start(4, 2, 1, durable_every);
    let clients: Vec<_> = (0..4).map(|r| cluster.client(r)).collect();
    let states = |generation: u64, bytes: usize| -> Vec<Snapshot> {
        (0..4).map(|r| state(r, generation, bytes)).collect()
    };
    let mut generation = 0;
    for span in 1..=4u64 {
        while generation < span * durable_every - 2 {
            generation += 1;
            for (rank, s) in states(generation, SIZE).into_iter().enumerate() {
                clients[rank].put(s);
            }
        }
        // The last span's checkpoint gets time to finish. Then a large handoff keeps every
        // sender busy while the span's opener and the handoff after it arrive back to back:
        // the opener is what a newest-wins mailbox would drop.
        std::thread::sleep(Duration::from_millis(300));
        let slow = states(span * durable_every - 1, 16 << 20);
        let opener = states(span * durable_every, SIZE);
        let after = states(span * durable_every + 1, SIZE);
        for batch in [slow, opener, after] {
            for (rank, s) in batch.into_iter().enumerate() {
                clients[rank].put(s);
            }
        }
        generation = span * durable_every + 1;
    }
    for client in &clients {
        assert_eq!(client.flush(TIMEOUT).unwrap(), Some(generation));
    }
    let superseded: u64 = clients.iter().map(|c| c.superseded()).sum();
    assert!(superseded > 0, "no handoff was superseded: nothing tested");

    let store = cluster.durable();
    let expected = vec![30, 40];
    let deadline = Instant::now() + Duration::from_secs(20);
    let lists = loop {
        let lists: Vec<Vec<u64>> = (0..4).map(|r| store.list(r).unwrap()).collect();
        if lists.iter().all(|l| *l == expected) || Instant::now() > deadline {
            break lists;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for (rank, list) in lists.iter().enumerate() {
        assert_eq!(
            *list, expected,
            "rank {rank} checkpointed other generations than the span openers; all: {lists:?}"
        );
    }
    for rank in 0..4 {
        let bytes = store.get(rank, 30).unwrap().unwrap();
        assert!(Snapshot::decode(&bytes).unwrap() == state(rank as usize, 30, SIZE));
    }
}

#[test]
fn sigterm_finishes_the_durable_write_in_flight_and_exits_cleanly() {
    let mut cluster = Cluster::start(4, 2, 1, 1);
    let client = cluster.client(0);
    // Large enough that its fsync'd write is still running when the signal arrives.
    let big = 48 << 20;
    client.put(state(0, 1, big));
    assert_eq!(client.flush(TIMEOUT).unwrap(), Some(1));
    let status = cluster.terminate_agent(0);
    assert!(
        status.success(),
        "the agent did not exit cleanly on SIGTERM: {status}\n{}",
        cluster.log(0)
    );
    let store = cluster.durable();
    assert_eq!(store.list(0).unwrap(), vec![1], "{}", cluster.log(0));
    let bytes = store.get(0, 1).unwrap().unwrap();
    assert!(Snapshot::decode(&bytes).unwrap() == state(0, 1, big));
}

#[test]
fn ranks_that_snapshot_only_when_all_are_ready_checkpoint_the_same_span_openers() {
    // A trainer's gate: at every step each rank asks ready(), and only if all are ready does
    // every rank put that step. Skipped steps differ from run to run, never between ranks.
    let durable_every = 5;
    let cluster = Cluster::start(3, 2, 1, durable_every);
    let clients: Vec<_> = (0..3).map(|r| cluster.client(r)).collect();
    let mut put = Vec::new();
    for step in 1..=40u64 {
        if clients.iter().all(|c| c.ready()) {
            for (rank, client) in clients.iter().enumerate() {
                client.put(state(rank, step, SIZE));
            }
            put.push(step);
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    for client in &clients {
        client.flush(TIMEOUT).unwrap();
    }
    let mut openers: Vec<u64> = Vec::new();
    for &g in &put {
        if openers
            .last()
            .is_none_or(|&o| g / durable_every > o / durable_every)
        {
            openers.push(g);
        }
    }
    let expected = openers[openers.len() - 2..].to_vec();
    let store = cluster.durable();
    let deadline = Instant::now() + Duration::from_secs(20);
    let lists = loop {
        let lists: Vec<Vec<u64>> = (0..3).map(|r| store.list(r).unwrap()).collect();
        if lists.iter().all(|l| *l == expected) || Instant::now() > deadline {
            break lists;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        lists.iter().all(|l| *l == expected),
        "put {put:?}: expected the last two span openers {expected:?} on every rank, got {lists:?}"
    );
}

#[test]
fn a_rollback_drops_durable_checkpoints_of_the_abandoned_timeline_and_rewrites_them() {
    let cluster = Cluster::start(3, 2, 1, 1);
    let clients: Vec<_> = (0..3).map(|r| cluster.client(r)).collect();
    for g in 1..=3 {
        for (rank, client) in clients.iter().enumerate() {
            client.put(state(rank, g, SIZE));
        }
    }
    // Generation 4 reaches ranks 0 and 1 only: the job resumes from 3.
    for (rank, client) in clients.iter().enumerate().take(2) {
        client.put(state(rank, 4, SIZE));
    }
    for (rank, client) in clients.iter().enumerate() {
        let newest = if rank < 2 { 4 } else { 3 };
        assert_eq!(
            client.wait_committed(newest, TIMEOUT).unwrap(),
            Some(newest)
        );
    }
    cluster.wait_durable(3);
    let store = cluster.durable();
    assert!(eventually_listed(&store, 0, 4), "{:?}", store.list(0));
    drop(clients);

    let restored = cluster::restore_all(&cluster);
    assert!(restored.iter().all(|(s, _)| s.generation == 3));
    for rank in 0..3 {
        assert!(
            store.list(rank).unwrap().iter().all(|&g| g <= 3),
            "rank {rank} kept a checkpoint of the abandoned timeline: {:?}",
            store.list(rank)
        );
    }

    // The resumed timeline's generation 4 (different bytes) is checkpointed anew.
    let clients: Vec<_> = (0..3).map(|r| cluster.client(r)).collect();
    for (rank, client) in clients.iter().enumerate() {
        client.put(state(rank, 4, SIZE / 2));
        client.flush(TIMEOUT).unwrap();
    }
    cluster.wait_durable(4);
    for rank in 0..3u32 {
        let bytes = store.get(rank, 4).unwrap().unwrap();
        assert!(
            Snapshot::decode(&bytes).unwrap() == state(rank as usize, 4, SIZE / 2),
            "rank {rank} holds the abandoned timeline's generation 4"
        );
    }
}

fn eventually_listed(store: &petl_snapshot::DirStore, rank: u32, generation: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if store.list(rank).unwrap().contains(&generation) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
