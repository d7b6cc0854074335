//! Test harness: real agent processes on loopback, one per rank, with deterministic snapshot
//! contents so that any restored state can be checked byte for byte.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use petl_snapshot::{DirStore, Dtype, DurableStore, NamedTensor, Snapshot, SnapshotClient, Tier};
use rand::Rng;
use rand::rngs::StdRng;

pub const JOB: &str = "job-under-test";
pub const SECRET: &str = "a-test-secret-of-enough-length\n";
/// Bytes of trainable state per rank: "a few MiB".
pub const SIZE: usize = 2 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub world: usize,
    pub k: usize,
    pub m: usize,
    pub durable_every: u64,
    pub peer_ports: Vec<u16>,
    pub metrics_ports: Vec<u16>,
    agents: Vec<Option<Child>>,
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Cluster {
    pub fn start(world: usize, k: usize, m: usize, durable_every: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let ports = free_ports(2 * world);
        let mut cluster = Cluster {
            dir,
            world,
            k,
            m,
            durable_every,
            peer_ports: ports[..world].to_vec(),
            metrics_ports: ports[world..].to_vec(),
            agents: (0..world).map(|_| None).collect(),
        };
        for rank in 0..world {
            cluster.spawn_agent(rank);
        }
        for rank in 0..world {
            cluster.wait_ready(rank);
        }
        cluster
    }

    pub fn socket(&self, rank: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{rank}.sock"))
    }

    pub fn durable_dir(&self) -> PathBuf {
        self.dir.path().join("durable")
    }

    pub fn peers(&self) -> String {
        self.peer_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn spawn_agent(&mut self, rank: usize) {
        let _ = std::fs::remove_file(self.socket(rank));
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{rank}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_petl-snapshot-agent"))
            .args(["--rank", &rank.to_string()])
            .args(["--world-size", &self.world.to_string()])
            .args(["--peers", &self.peers()])
            .args(["--data-shards", &self.k.to_string()])
            .args(["--parity-shards", &self.m.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.peer_ports[rank])])
            .arg("--local-socket")
            .arg(self.socket(rank))
            .args(["--job", JOB])
            .arg("--secret-file")
            .arg(self.dir.path().join("secret"))
            .arg("--durable-dir")
            .arg(self.durable_dir())
            .args(["--durable-every", &self.durable_every.to_string()])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", self.metrics_ports[rank]),
            ])
            .args(["--stripe-bytes", "16384"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning the agent");
        self.agents[rank] = Some(child);
    }

    /// SIGKILL: the agent's memory is gone, as when its pod is deleted.
    pub fn kill_agent(&mut self, rank: usize) {
        if let Some(mut child) = self.agents[rank].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the agent to exit and returns its status.
    pub fn terminate_agent(&mut self, rank: usize) -> std::process::ExitStatus {
        let mut child = self.agents[rank].take().expect("agent running");
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("sending SIGTERM");
        child.wait().expect("waiting for the agent")
    }

    /// A replacement pod: a fresh agent with the same rank identity and empty memory.
    pub fn replace_agent(&mut self, rank: usize) {
        self.kill_agent(rank);
        self.spawn_agent(rank);
        self.wait_ready(rank);
    }

    pub fn agent_alive(&mut self, rank: usize) -> bool {
        match self.agents[rank].as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn wait_ready(&mut self, rank: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket(rank)).is_ok() {
                return;
            }
            assert!(
                self.agent_alive(rank),
                "agent {rank} exited: {}",
                self.log(rank)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent {rank} not ready: {}", self.log(rank));
    }

    pub fn log(&self, rank: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("agent-{rank}.log")))
            .unwrap_or_default()
    }

    pub fn client(&self, rank: usize) -> SnapshotClient {
        SnapshotClient::new(self.socket(rank))
    }

    pub fn durable(&self) -> DirStore {
        DirStore::new(&self.durable_dir(), JOB).unwrap()
    }

    /// Waits until every rank has a durable checkpoint of `at_least` or newer.
    pub fn wait_durable(&self, at_least: u64) {
        let store = self.durable();
        let deadline = Instant::now() + Duration::from_secs(15);
        while (0..self.world as u32)
            .any(|r| store.list(r).unwrap().last().is_none_or(|&g| g < at_least))
        {
            assert!(Instant::now() < deadline, "durable checkpoints not written");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the agent's metrics port.
    pub fn http_get(&self, rank: usize, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_ports[rank])).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for rank in 0..self.world {
            self.kill_agent(rank);
        }
    }
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The state of `rank` at `generation`: parameters and two Adam moments of `bytes` in total,
/// plus RNG state and data cursor; a pure function of its inputs.
pub fn state(rank: usize, generation: u64, bytes: usize) -> Snapshot {
    let elements = (bytes / 3 / 4).max(1);
    let seed = (rank as u64) << 32 | generation;
    let tensor = |name: &str, salt: u64| NamedTensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: vec![elements / 16, 16],
        data: fill(seed ^ salt, elements / 16 * 16 * 4),
    };
    Snapshot {
        generation,
        step: generation * 10,
        tensors: vec![
            tensor("side.ladder.0.weight", 1),
            tensor("adam.m.side.ladder.0.weight", 2),
            tensor("adam.v.side.ladder.0.weight", 3),
        ],
        rng_state: fill(seed ^ 4, 64),
        data_cursor: format!("rank={rank};epoch=0;offset={}", generation * 80).into_bytes(),
    }
}

/// Puts generations `from..=to` on every rank, with a random pause between them.
pub fn write_generations(clients: &[SnapshotClient], from: u64, to: u64, rng: &mut StdRng) {
    for generation in from..=to {
        for (rank, client) in clients.iter().enumerate() {
            client.put(state(rank, generation, SIZE));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
    }
}

/// Every rank restores concurrently, as restarted trainers do.
pub fn try_restore_all(cluster: &Cluster) -> Vec<petl_snapshot::Result<(Snapshot, Tier)>> {
    let sockets: Vec<_> = (0..cluster.world).map(|r| cluster.socket(r)).collect();
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || {
                SnapshotClient::new(socket).restore(TIMEOUT).and_then(|r| {
                    r.ok_or_else(|| petl_snapshot::Error::Recovery("nothing to restore".into()))
                })
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

pub fn restore_all(cluster: &Cluster) -> Vec<(Snapshot, Tier)> {
    try_restore_all(cluster)
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}\n{}", cluster.log(rank))))
        .collect()
}
