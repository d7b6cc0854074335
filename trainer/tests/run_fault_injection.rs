//! Faults injected into `petl run` of a real job on loopback, each at a random step (seeded and
//! printed): a killed trainer restores from its own agent, a lost pod from its peers' shards, m
//! lost pods at once from peers, m + 1 from the durable store — and every run ends with an
//! adapter byte-identical to the uninterrupted run of the same spec. A rank whose parameters
//! drift stops the job with the divergence error.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use common::{Run, parallel_job, petl_run};

const LST: &str = "{ type: lst, lst: { reduction: 8 } }";
const STEPS: u32 = 8;

/// (replicas, snapshot block) of each scenario.
const TWO_RANKS: (u32, &str) = (
    2,
    "{ everySteps: 1, durable: { uri: \"file:///unused\", everySnapshots: 2 } }",
);
const FOUR_RANKS_2_2: (u32, &str) = (
    4,
    "{ everySteps: 1, erasureCoding: { dataShards: 2, parityShards: 2 }, durable: { uri: \"file:///unused\", everySnapshots: 2 } }",
);

fn yaml((replicas, snapshot): (u32, &str)) -> String {
    parallel_job(LST, replicas, STEPS, snapshot, "out")
}

fn run(spec: (u32, &str), kills: &[String]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = Vec::new();
    for k in kills {
        extra.push("--kill");
        extra.push(k.as_str());
    }
    petl_run(dir.path(), &yaml(spec), &extra)
}

/// One adapter's bytes, computed once and shared by the tests that need it.
type Cell = Arc<OnceLock<Arc<Vec<u8>>>>;

/// The uninterrupted run of `spec`, once per test binary.
fn baseline(spec: (u32, &str)) -> Arc<Vec<u8>> {
    static RUNS: OnceLock<Mutex<HashMap<u32, Cell>>> = OnceLock::new();
    let cell = RUNS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap()
        .entry(spec.0)
        .or_default()
        .clone();
    cell.get_or_init(|| {
        let r = run(spec, &[]);
        assert_eq!(r.code, 0, "the uninterrupted run failed:\n{}", r.stderr);
        Arc::new(r.adapter)
    })
    .clone()
}

/// A step in `2..=STEPS-2` and ranks drawn from a seed (`PETL_FAULT_SEED`, else the clock), printed
/// so a failure can be replayed.
fn draw(test: &str, ranks: u32, count: usize) -> (u64, Vec<u32>) {
    let seed: u64 = std::env::var("PETL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let step = 2 + next() % u64::from(STEPS - 3);
    let mut chosen = Vec::new();
    while chosen.len() < count {
        let r = (next() % u64::from(ranks)) as u32;
        if !chosen.contains(&r) {
            chosen.push(r);
        }
    }
    chosen.sort_unstable();
    eprintln!("{test}: PETL_FAULT_SEED={seed} → step {step}, ranks {chosen:?}");
    (step, chosen)
}

/// Kills `what` of `count` random ranks at one random step; checks the adapter against the
/// uninterrupted run and returns the tiers the manifest recorded (per rank) and the lost ranks.
fn recover(
    test: &str,
    spec: (u32, &str),
    count: usize,
    what: &str,
) -> (Vec<String>, Vec<usize>, Vec<u32>) {
    let (step, ranks) = draw(test, spec.0, count);
    let kills: Vec<String> = ranks
        .iter()
        .map(|r| format!("rank={r},step={step},what={what}"))
        .collect();
    let faulted = run(spec, &kills);
    assert_eq!(
        faulted.code, 0,
        "{test}: the run with faults failed:\n{}",
        faulted.stderr
    );
    assert!(
        faulted.stderr.contains("fault injected"),
        "{test}: no fault happened:\n{}",
        faulted.stderr
    );
    assert!(
        faulted.adapter == *baseline(spec),
        "{test}: the adapter differs from the uninterrupted run's"
    );
    let manifest = faulted.manifest.expect("a manifest");
    let record = manifest
        .recoveries
        .last()
        .unwrap_or_else(|| panic!("{test}: no recovery recorded:\n{}", faulted.stderr));
    assert!(record.restored_generation >= 1 && record.restored_generation <= step);
    (record.tiers.clone(), record.lost_ranks.clone(), ranks)
}

#[test]
fn a_killed_trainer_restores_from_its_own_agent() {
    let (tiers, lost, killed) = recover("trainer", TWO_RANKS, 1, "trainer");
    assert_eq!(lost, [killed[0] as usize]);
    assert!(tiers.iter().all(|t| t == "local"), "{tiers:?}");
}

#[test]
fn a_lost_pod_rebuilds_its_state_from_the_peers() {
    let (tiers, lost, killed) = recover("pod", TWO_RANKS, 1, "both");
    let r = killed[0] as usize;
    assert_eq!(lost, [r]);
    assert_eq!(tiers[r], "peers", "{tiers:?}");
    assert_eq!(tiers[1 - r], "local", "{tiers:?}");
}

#[test]
fn m_pods_lost_at_once_rebuild_from_the_peers() {
    let (tiers, lost, killed) = recover("m pods", FOUR_RANKS_2_2, 2, "both");
    assert_eq!(lost, killed.iter().map(|&r| r as usize).collect::<Vec<_>>());
    for (rank, tier) in tiers.iter().enumerate() {
        let want = if killed.contains(&(rank as u32)) {
            "peers"
        } else {
            "local"
        };
        assert_eq!(tier, want, "rank {rank}: {tiers:?}");
    }
}

#[test]
fn more_than_m_pods_lost_fall_back_to_the_durable_store() {
    let (tiers, lost, _) = recover("m+1 pods", TWO_RANKS, 2, "both");
    assert_eq!(lost, [0, 1]);
    assert!(tiers.iter().all(|t| t == "durable"), "{tiers:?}");
}

#[test]
fn a_rank_whose_parameters_drift_stops_the_job_as_a_bug() {
    let r = run(TWO_RANKS, &["rank=1,step=2,what=perturb".into()]);
    assert_eq!(r.code, 70, "{}", r.stderr);
    assert!(
        r.stderr.contains("replicas diverged") && r.stderr.contains("[1]"),
        "{}",
        r.stderr
    );
}
