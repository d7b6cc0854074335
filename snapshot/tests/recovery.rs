//! Real agent processes per rank; trainers write snapshots while ranks are killed at seeded
//! random moments; every recovery must return exactly the bytes of the agreed generation.

mod cluster;

use std::time::Duration;

use cluster::{Cluster, SIZE, TIMEOUT, restore_all, state, write_generations};
use petl_snapshot::{SnapshotClient, Tier};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Every trainer process restarts; the agents live.
    Trainers,
    /// This many agents (pods) are killed at once and replaced.
    Agents(usize),
}

fn scenario(world: usize, k: usize, m: usize, loss: Loss, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let durable_every = 2;
    let mut cluster = Cluster::start(world, k, m, durable_every);
    let clients: Vec<SnapshotClient> = (0..world).map(|r| cluster.client(r)).collect();

    // Generations up to `settled` are committed on every rank before the failure.
    let settled = rng.random_range(3..6);
    write_generations(&clients, 1, settled, &mut rng);
    for client in &clients {
        let newest = client.wait_committed(settled, TIMEOUT).unwrap();
        assert!(
            newest >= Some(settled),
            "generation {settled} not committed: {newest:?}"
        );
    }
    // Every rank has written the durable checkpoint of the last span the settled generations
    // reach (the first handoff of each span of `durable_every`), so killing more than m ranks
    // has one generation to fall back to. A span started while the failure strikes is not
    // promised: the tier keeps the two newest, so the settled one survives it.
    cluster.wait_durable(settled - settled % durable_every);

    // More generations are in flight when the failure strikes at a random moment.
    // At most one generation in flight: data-parallel ranks run in lockstep, so at a failure
    // they differ by one handoff at most (the two kept committed generations cover that).
    let extra = rng.random_range(0..2);
    write_generations(&clients, settled + 1, settled + extra, &mut rng);
    std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
    let mut lost: Vec<usize> = Vec::new();
    if let Loss::Agents(n) = loss {
        let mut ranks: Vec<usize> = (0..world).collect();
        ranks.shuffle(&mut rng);
        lost = ranks[..n].to_vec();
        for &r in &lost {
            cluster.kill_agent(r);
        }
    }
    drop(clients); // every trainer restarts
    for &r in &lost {
        cluster.spawn_agent(r);
    }
    for &r in &lost {
        cluster.wait_ready(r);
    }

    let restored = restore_all(&cluster);
    let generation = restored[0].0.generation;
    let beyond_parity = lost.len() > m;
    for (rank, (snapshot, tier)) in restored.iter().enumerate() {
        assert_eq!(
            snapshot.generation, generation,
            "rank {rank} resumed elsewhere"
        );
        assert!(
            *snapshot == state(rank, generation, SIZE),
            "rank {rank}: restored bytes differ from generation {generation} (tier {tier:?})"
        );
        if lost.contains(&rank) && !beyond_parity {
            assert_eq!(*tier, Tier::Peers, "rank {rank} lost its agent");
        }
        if !lost.contains(&rank) && !beyond_parity {
            assert_eq!(*tier, Tier::Local, "rank {rank} kept its agent");
        }
    }
    if beyond_parity && world == k + m {
        // Every lost rank held one of its own shards: m+1 losses leave fewer than k.
        assert!(restored.iter().any(|(_, t)| *t == Tier::Durable));
    } else {
        assert!(
            generation >= settled,
            "lost committed generations: resumed at {generation}, {settled} was committed"
        );
    }

    // Training goes on from the agreed generation and commits again.
    let clients: Vec<SnapshotClient> = (0..world).map(|r| cluster.client(r)).collect();
    write_generations(&clients, generation + 1, generation + 1, &mut rng);
    for client in &clients {
        assert!(client.wait_committed(generation + 1, TIMEOUT).unwrap() >= Some(generation + 1));
    }
    if !lost.is_empty() {
        let metrics = cluster.http_get(lost[0], "/metrics");
        let tier = if beyond_parity { "" } else { "tier=\"2\"" };
        assert!(
            metrics.contains("petl_snapshot_recoveries_total{") && metrics.contains(tier),
            "{metrics}"
        );
        assert!(
            metrics.contains("petl_snapshot_generations_committed_total 1"),
            "{metrics}"
        );
    }
}

#[test]
fn layout_2_1_restarted_trainers_restore_their_local_copies() {
    scenario(4, 2, 1, Loss::Trainers, 11);
}

#[test]
fn layout_2_1_a_replaced_agent_rebuilds_from_peers() {
    scenario(4, 2, 1, Loss::Agents(1), 12);
}

#[test]
fn layout_2_1_two_lost_agents_of_four_still_recover() {
    // 2+1 on four ranks: no rank holds its own shard, so any two losses leave k shards or
    // else fall back to the durable tier; either way the bytes must be exact.
    scenario(4, 2, 1, Loss::Agents(2), 13);
}

#[test]
fn layout_4_2_restarted_trainers_restore_their_local_copies() {
    scenario(6, 4, 2, Loss::Trainers, 21);
}

#[test]
fn layout_4_2_one_lost_agent_rebuilds_from_peers() {
    scenario(6, 4, 2, Loss::Agents(1), 22);
}

#[test]
fn layout_4_2_two_lost_agents_rebuild_from_peers() {
    scenario(6, 4, 2, Loss::Agents(2), 23);
}

#[test]
fn layout_4_2_three_lost_agents_fall_back_to_durable() {
    scenario(6, 4, 2, Loss::Agents(3), 24);
}

#[test]
fn layout_6_2_one_lost_agent_rebuilds_from_peers() {
    scenario(8, 6, 2, Loss::Agents(1), 31);
}

#[test]
fn layout_6_2_two_lost_agents_rebuild_from_peers() {
    scenario(8, 6, 2, Loss::Agents(2), 32);
}

#[test]
fn layout_6_2_three_lost_agents_fall_back_to_durable() {
    scenario(8, 6, 2, Loss::Agents(3), 33);
}
