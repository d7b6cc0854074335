//! Bounded soak: many cycles of snapshots, a failure (trainers, one agent, or one trainer and
//! one agent), agreement and restore, with zero lost committed generations.

mod cluster;

use std::time::{Duration, Instant};

use cluster::{Cluster, SIZE, TIMEOUT, restore_all, state, write_generations};
use petl_snapshot::SnapshotClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SOAK: Duration = Duration::from_secs(20);

#[test]
fn many_kill_and_recover_cycles_lose_no_committed_generation() {
    let world = 4;
    let mut cluster = Cluster::start(world, 2, 1, 5);
    let mut rng = StdRng::seed_from_u64(2026);
    let started = Instant::now();
    let (mut generation, mut cycles, mut agent_losses) = (0u64, 0, 0);
    while started.elapsed() < SOAK {
        let clients: Vec<SnapshotClient> = (0..world).map(|r| cluster.client(r)).collect();
        let n = rng.random_range(1..4);
        write_generations(&clients, generation + 1, generation + n, &mut rng);
        generation += n;
        for c in &clients {
            assert!(c.wait_committed(generation, TIMEOUT).unwrap() >= Some(generation));
        }
        let confirmed = generation;
        // Data-parallel ranks run in lockstep: at a failure, ranks differ by at most one
        // handoff, which the two kept committed generations cover.
        let in_flight = rng.random_range(0..2);
        write_generations(&clients, generation + 1, generation + in_flight, &mut rng);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
        let lost = match rng.random_range(0..3) {
            0 => None,
            _ => Some(rng.random_range(0..world)),
        };
        if let Some(rank) = lost {
            cluster.kill_agent(rank);
            agent_losses += 1;
        }
        drop(clients);
        if let Some(rank) = lost {
            cluster.spawn_agent(rank);
            cluster.wait_ready(rank);
        }
        let restored = restore_all(&cluster);
        let agreed = restored[0].0.generation;
        assert!(
            agreed >= confirmed,
            "cycle {cycles}: resumed at {agreed}, {confirmed} was committed"
        );
        for (rank, (snapshot, tier)) in restored.iter().enumerate() {
            assert!(
                *snapshot == state(rank, agreed, SIZE),
                "cycle {cycles}: rank {rank} restored wrong bytes from {tier:?}"
            );
        }
        generation = agreed;
        cycles += 1;
    }
    assert!(
        cycles >= 5 && agent_losses >= 2,
        "only {cycles} cycles, {agent_losses} agent losses"
    );
}
