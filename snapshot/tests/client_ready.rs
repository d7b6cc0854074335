//! What the trainer drives: `ready()` gates snapshot steps until the last generation committed
//! (or definitely will not), `last_committed`/`status` report it, errors keep their kind across
//! the local socket, and the agent takes its whole configuration from `PETL_*` variables.

mod cluster;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{Cluster, JOB, SECRET, SIZE, TIMEOUT, state};
use petl_snapshot::{Fault, Layout, SnapshotClient};

/// Polls `cond` until it holds or `within` passes.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Puts `generation` on every rank and waits until every client is ready again.
fn snapshot_step(clients: &[SnapshotClient], generation: u64) {
    for (rank, client) in clients.iter().enumerate() {
        client.put(state(rank, generation, SIZE));
    }
    assert!(
        eventually(TIMEOUT, || clients.iter().all(|c| c.ready())),
        "generation {generation} did not settle"
    );
}

#[test]
fn ready_is_false_while_a_commit_is_pending_and_true_once_it_committed() {
    let mut cluster = Cluster::start(3, 2, 1, 1000);
    let clients: Vec<SnapshotClient> = (0..3).map(|r| cluster.client(r)).collect();
    assert!(clients[0].ready(), "nothing handed over yet");
    assert_eq!(clients[0].last_committed(), None);

    snapshot_step(&clients, 1);
    for client in &clients {
        assert_eq!(client.last_committed(), Some(1));
        let status = client.status();
        assert_eq!(status.layout, Some(Layout::new(2, 1).unwrap()));
        assert!(status.last_committed.unwrap().took.is_some());
        assert_eq!(status.failed, 0);
    }

    // Rank 1 holds shard 0 of rank 0: while it is down, rank 0's next commit cannot finish.
    cluster.kill_agent(1);
    clients[0].put(state(0, 2, SIZE));
    assert!(
        !clients[0].ready(),
        "a put is not ready before it is even sent"
    );
    assert!(eventually(TIMEOUT, || clients[0].status().committing == Some(2)));
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_millis(500) {
        assert!(
            !clients[0].ready(),
            "ready while generation 2 is not committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(clients[0].last_committed(), Some(1));

    // A replacement pod for rank 1 takes the shard: the commit finishes and rank 0 is ready.
    cluster.spawn_agent(1);
    cluster.wait_ready(1);
    assert!(
        eventually(TIMEOUT, || clients[0].ready()),
        "not ready after the holder came back: {:?}\n{}",
        clients[0].status(),
        cluster.log(0)
    );
    assert_eq!(clients[0].last_committed(), Some(2));
    assert_eq!(clients[0].status().failed, 0);
}

#[test]
fn a_generation_its_agent_lost_counts_as_failed_and_ready_returns() {
    let mut cluster = Cluster::start(3, 2, 1, 1000);
    let clients: Vec<SnapshotClient> = (0..3).map(|r| cluster.client(r)).collect();
    snapshot_step(&clients, 1);

    cluster.kill_agent(1);
    clients[0].put(state(0, 2, SIZE));
    assert!(eventually(TIMEOUT, || clients[0].status().committing == Some(2)));
    // Rank 0's agent restarts with empty memory: generation 2 is gone with it.
    cluster.replace_agent(0);
    assert!(
        eventually(TIMEOUT, || clients[0].ready()),
        "not ready after the agent lost the generation: {:?}",
        clients[0].status()
    );
    let status = clients[0].status();
    assert_eq!(status.failed, 1, "{status:?}");
    assert!(status.last_error.is_some());
    assert_eq!(status.last_committed.map(|c| c.generation), Some(1));
}

#[test]
fn an_agreement_that_times_out_is_reported_as_temporary() {
    let mut cluster = Cluster::start(3, 2, 1, 1000);
    cluster.kill_agent(2);
    let err = cluster
        .client(0)
        .agree_generation(Duration::from_millis(300))
        .unwrap_err();
    assert!(
        matches!(
            err,
            petl_snapshot::Error::Remote {
                fault: Fault::Timeout,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.temporary(), "{err}");
}

#[test]
fn the_agent_takes_its_whole_configuration_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let ports: Vec<u16> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let socket = dir.path().join("agent.sock");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_petl-snapshot-agent"))
        .env("PETL_RANK", "0")
        .env("PETL_WORLD_SIZE", "2")
        .env(
            "PETL_SNAPSHOT_PEERS",
            format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]),
        )
        .env("PETL_SNAPSHOT_DATA_SHARDS", "1")
        .env("PETL_SNAPSHOT_PARITY_SHARDS", "1")
        .env("PETL_SNAPSHOT_LISTEN", format!("127.0.0.1:{}", ports[0]))
        .env("PETL_SNAPSHOT_SOCKET", &socket)
        .env("PETL_JOB", JOB)
        .env("PETL_SNAPSHOT_SECRET_FILE", dir.path().join("secret"))
        .env("PETL_SNAPSHOT_DURABLE_DIR", dir.path().join("durable"))
        .env("PETL_SNAPSHOT_DURABLE_EVERY", "1")
        .env(
            "PETL_SNAPSHOT_METRICS_ADDR",
            format!("127.0.0.1:{}", ports[2]),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let health = up.then(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", ports[2])).unwrap();
        write!(s, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    // The durable directory comes from the environment too: a handoff is written there.
    let client = SnapshotClient::new(&socket);
    client.put(state(0, 1, 4096));
    let flushed = client.flush(TIMEOUT);
    let durable = dir.path().join("durable").join(JOB).join("rank-0");
    let written = eventually(TIMEOUT, || {
        std::fs::read_dir(&durable).is_ok_and(|d| d.count() > 0)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(health.unwrap_or_default().contains("ok rank=0"));
    assert_eq!(flushed.unwrap(), Some(1));
    assert!(written, "no durable checkpoint in {}", durable.display());
}
