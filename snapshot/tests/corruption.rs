//! Corrupted shards and durable files are detected and never restored, end to end through
//! real agent processes.

mod cluster;

use std::time::Duration;

use cluster::{Cluster, JOB, SECRET, SIZE, TIMEOUT, restore_all, state, try_restore_all};
use petl_snapshot::auth::{self, Secret};
use petl_snapshot::codec::shard_checksum;
use petl_snapshot::protocol::{Conn, Message};
use petl_snapshot::{DurableStore, SnapshotClient, Tier};

fn commit_generations(cluster: &Cluster, generations: std::ops::RangeInclusive<u64>) {
    let clients: Vec<SnapshotClient> = (0..cluster.world).map(|r| cluster.client(r)).collect();
    for g in generations {
        for (rank, c) in clients.iter().enumerate() {
            c.put(state(rank, g, SIZE));
        }
        for c in &clients {
            assert!(c.wait_committed(g, TIMEOUT).unwrap() >= Some(g));
        }
    }
}

/// Speaks to an agent as `rank` of the job, the way a buggy (but authenticated) peer would.
async fn peer_link(cluster: &Cluster, to: usize, rank: u32) -> Conn<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", cluster.peer_ports[to]))
        .await
        .unwrap();
    let mut conn = Conn::new(stream, 1 << 30);
    let secret = Secret::new(SECRET.trim().as_bytes().to_vec()).unwrap();
    auth::connect(&mut conn, &secret, JOB, rank).await.unwrap();
    conn
}

/// Replaces the shard `index` of `owner` at `generation` that `holder` keeps with a copy that
/// has one flipped byte but a matching shard checksum, as memory corruption before
/// checksumming would: only the decoded state's part checksums can catch it.
fn plant_corrupted_shard(
    cluster: &Cluster,
    holder: usize,
    owner: u32,
    generation: u64,
    index: u32,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut link = peer_link(cluster, holder, owner).await;
        let fetch = Message::FetchShard {
            owner,
            generation,
            index,
        };
        let Message::Shard { mut header, data } = link.call(&fetch).await.unwrap() else {
            panic!("rank {holder} holds no shard {index} of rank {owner}");
        };
        let mut bad = data.to_vec();
        bad[data.len() / 2] ^= 0x01;
        header.checksum = shard_checksum(&bad);
        let store = Message::StoreShard {
            header,
            data: bad.into(),
        };
        assert_eq!(link.call(&store).await.unwrap(), Message::Ack);
        let commit = Message::Commit { owner, generation };
        assert_eq!(link.call(&commit).await.unwrap(), Message::Ack);
    });
}

#[test]
fn a_shard_corrupted_before_its_checksum_is_caught_and_another_shard_set_rebuilds_the_state() {
    // 4 ranks, 2+1: rank 0's shards 0, 1, 2 lie on ranks 1, 2, 3.
    // Durable checkpoints only every 1000 generations: generation 2 can come only from peers.
    let mut cluster = Cluster::start(4, 2, 1, 1000);
    commit_generations(&cluster, 1..=2);
    plant_corrupted_shard(&cluster, 1, 0, 2, 0);
    cluster.replace_agent(0);
    let restored = restore_all(&cluster);
    for (rank, (snapshot, tier)) in restored.iter().enumerate() {
        let expected = if rank == 0 { Tier::Peers } else { Tier::Local };
        assert_eq!(*tier, expected, "rank {rank}");
        assert!(
            *snapshot == state(rank, 2, SIZE),
            "rank {rank} restored other bytes"
        );
    }
}

#[test]
fn when_no_shard_set_decodes_intact_the_restore_falls_to_the_durable_store() {
    // 3 ranks, 2+1: rank 0's own shard 2 goes with its agent, so shards 0 and 1 (on ranks 1
    // and 2) are the only set, and shard 0 is corrupted.
    let mut cluster = Cluster::start(3, 2, 1, 1);
    commit_generations(&cluster, 1..=2);
    cluster.wait_durable(2);
    plant_corrupted_shard(&cluster, 1, 0, 2, 0);
    cluster.replace_agent(0);
    let restored = restore_all(&cluster);
    let (snapshot, tier) = &restored[0];
    assert_eq!(
        *tier,
        Tier::Durable,
        "the decoded state failed its checksum"
    );
    assert!(*snapshot == state(0, 2, SIZE));
    for (rank, (snapshot, tier)) in restored.iter().enumerate().skip(1) {
        assert_eq!(*tier, Tier::Local);
        assert!(*snapshot == state(rank, 2, SIZE));
    }
}

#[test]
fn flipped_or_truncated_durable_checkpoints_are_never_restored() {
    let mut cluster = Cluster::start(3, 2, 1, 1);
    commit_generations(&cluster, 1..=2);
    cluster.wait_durable(2);
    std::thread::sleep(Duration::from_millis(200)); // let the last durable writes finish
    let root = cluster.durable_dir().join(JOB);
    let flipped = root.join("rank-0/gen-00000000000000000002.snap");
    let mut bytes = std::fs::read(&flipped).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x80;
    std::fs::write(&flipped, bytes).unwrap();
    let truncated = root.join("rank-1/gen-00000000000000000002.snap");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(cluster.durable().list(0).unwrap(), vec![1, 2]);

    for rank in 0..3 {
        cluster.kill_agent(rank);
    }
    for rank in 0..3 {
        cluster.spawn_agent(rank);
        cluster.wait_ready(rank);
    }
    let results = try_restore_all(&cluster);
    for rank in [0, 1] {
        let err = results[rank]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("rank {rank} restored corrupted bytes"))
            .to_string();
        assert!(err.contains("every tier failed verification"), "{err}");
    }
    let (snapshot, tier) = results[2].as_ref().unwrap();
    assert_eq!(*tier, Tier::Durable);
    assert!(*snapshot == state(2, 2, SIZE));
}
