//! Measures petl-snapshot against its peers on this machine and prints ratios: the codec
//! against memcpy and reed-solomon-erasure, the handoff and commit against an fsync'd file,
//! and recovery times of tiers 1 and 2, with real agent processes on loopback.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use petl_snapshot::codec::{self, DEFAULT_STRIPE, Layout};
use petl_snapshot::{Dtype, DurableStore, NamedTensor, Snapshot, SnapshotClient, Tier};
use reed_solomon_erasure::galois_8::ReedSolomon;

#[derive(Parser)]
#[command(about = "petl snapshot benchmarks")]
struct Args {
    /// Skip the 256 MiB codec sizes (they need ~1 GiB and time).
    #[arg(long)]
    quick: bool,
    /// Only the codec section.
    #[arg(long)]
    codec_only: bool,
    /// Only the end-to-end section (agents, handoff, commit, recovery).
    #[arg(long, conflicts_with = "codec_only")]
    end_to_end_only: bool,
    /// The agent binary (default: next to this executable).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// State size of the end-to-end section, MiB.
    #[arg(long, default_value_t = 50)]
    state_mib: usize,
    /// Bytes per shard encoded at once.
    #[arg(long, default_value_t = DEFAULT_STRIPE)]
    stripe: usize,
    /// Back-to-back puts timed for the stall distribution.
    #[arg(long, default_value_t = 100)]
    puts: usize,
    /// Only the commit-against-its-floor section.
    #[arg(long, conflicts_with_all = ["codec_only", "end_to_end_only"])]
    commit_only: bool,
    /// Layouts of the commit section, k+m, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2+1,3+1", value_parser = parse_layout)]
    layouts: Vec<(usize, usize)>,
    /// State sizes of the commit section, MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,50")]
    commit_sizes_mib: Vec<usize>,
    /// Timed commits per case of the commit section (each of one rank alone and of all ranks).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Pause before each timed commit and each timed floor of the commit section, ms (the
    /// training step between two snapshots).
    #[arg(long, default_value_t = 100)]
    settle_ms: u64,
    /// Agent processes of the end-to-end and commit sections.
    #[arg(long, default_value_t = 4)]
    world: usize,
}

fn parse_layout(s: &str) -> Result<(usize, usize), String> {
    let (k, m) = s
        .split_once('+')
        .ok_or_else(|| format!("layout {s:?}: write k+m, e.g. 2+1"))?;
    let parse = |n: &str| {
        n.trim()
            .parse::<usize>()
            .map_err(|e| format!("layout {s:?}: {e}"))
    };
    Ok((parse(k)?, parse(m)?))
}

fn main() {
    let args = Args::parse();
    // The client's phases (handoff sealed, acknowledged) on stderr, as the agents log theirs
    // with PETL_BENCH_AGENT_LOG: e.g. PETL_BENCH_LOG=petl_snapshot=debug.
    if let Ok(filter) = std::env::var("PETL_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    println!("# petl snapshot bench — load average before: {}", loadavg());
    if args.commit_only {
        commit_section(&args);
    } else {
        if !args.end_to_end_only {
            codec_section(&args);
        }
        if !args.codec_only {
            end_to_end_section(&args);
            commit_section(&args);
        }
    }
    println!("\n# load average after: {}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Median seconds of `f` over repetitions lasting at least ~0.4 s (3 to 50 runs).
fn time_median(mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, tables
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed() < Duration::from_millis(400) && samples.len() < 50)
    {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

// ---- codec ----

fn codec_section(args: &Args) {
    println!(
        "\n## Codec, one thread, GB/s of original data (median); ratio = codec / memcpy of the same bytes"
    );
    println!(
        "{:<6} {:>8} {:>9} {:>12} {:>7} {:>13} {:>12} {:>7} {:>12} {:>12}",
        "layout",
        "size",
        "memcpy",
        "simd-stripe",
        "ratio",
        "simd-1shot",
        "rse-stripe",
        "ratio",
        "simd-decode",
        "rse-decode"
    );
    let mut sizes = vec![1usize << 20, 16 << 20];
    if !args.quick {
        sizes.push(256 << 20);
    }
    for (k, m) in [(2, 1), (4, 2), (8, 2)] {
        for &size in &sizes {
            codec_row(k, m, size, args.stripe);
        }
    }
    println!(
        "(decode columns: the first m data shards are lost and rebuilt, worst case; rse = reed-solomon-erasure 6 with simd-accel)"
    );
}

fn codec_row(k: usize, m: usize, size: usize, stripe: usize) {
    let layout = Layout::new(k, m).unwrap();
    let shard_len = layout.shard_len(size);
    let mut padded = random_bytes(size);
    padded.resize(k * shard_len, 0);
    let mut dst = vec![0u8; size];
    let t_memcpy = time_median(|| {
        dst.copy_from_slice(&padded[..size]);
        std::hint::black_box(&dst);
    });
    let t_simd = time_median(|| {
        std::hint::black_box(codec::encode_parity(layout, &padded, shard_len, stripe).unwrap());
    });
    let t_oneshot = if size <= 16 << 20 {
        let originals: Vec<&[u8]> = padded.chunks(shard_len).collect();
        Some(time_median(|| {
            std::hint::black_box(reed_solomon_simd::encode(k, m, &originals).unwrap());
        }))
    } else {
        None
    };
    let rse = ReedSolomon::new(k, m).unwrap();
    let mut parity = vec![vec![0u8; shard_len]; m];
    let t_rse = time_median(|| {
        let mut off = 0;
        while off < shard_len {
            let len = stripe.min(shard_len - off);
            let data: Vec<&[u8]> = (0..k)
                .map(|i| &padded[i * shard_len + off..i * shard_len + off + len])
                .collect();
            let mut out: Vec<&mut [u8]> =
                parity.iter_mut().map(|p| &mut p[off..off + len]).collect();
            rse.encode_sep(&data, &mut out).unwrap();
            off += len;
        }
        std::hint::black_box(&parity);
    });
    // Decode with the first m data shards lost.
    let shards = codec::encode(layout, Bytes::from(padded[..size].to_vec()), stripe).unwrap();
    let kept: Vec<_> = shards[m..].to_vec();
    let t_decode = time_median(|| {
        std::hint::black_box(codec::decode(layout, size, &kept, stripe).unwrap());
    });
    let all: Vec<Vec<u8>> = shards.iter().map(|s| s.data.to_vec()).collect();
    let rse_parity_ok = {
        // The two engines' parity differs by design; rse needs its own parity to decode.
        let mut own: Vec<Vec<u8>> = all[..k].to_vec();
        own.extend((0..m).map(|_| vec![0u8; shard_len]));
        rse.encode(&mut own).unwrap();
        own
    };
    let t_rse_decode = time_median(|| {
        let mut slots: Vec<Option<Vec<u8>>> = rse_parity_ok.iter().cloned().map(Some).collect();
        for slot in slots.iter_mut().take(m) {
            *slot = None;
        }
        rse.reconstruct_data(&mut slots).unwrap();
        std::hint::black_box(&slots);
    });
    let mc = gbs(size, t_memcpy);
    println!(
        "{:<6} {:>8} {:>9.2} {:>12.2} {:>7.2} {:>13} {:>12.2} {:>7.2} {:>12.2} {:>12}",
        format!("{k}+{m}"),
        format!("{} MiB", size >> 20),
        mc,
        gbs(size, t_simd),
        gbs(size, t_simd) / mc,
        t_oneshot.map_or("-".into(), |t| format!("{:.2}", gbs(size, t))),
        gbs(size, t_rse),
        gbs(size, t_rse) / mc,
        gbs(size, t_decode),
        format!("{:.2}*", gbs(size, t_rse_decode)),
    );
}

// ---- end to end with agent processes ----

struct Agents {
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    bin: PathBuf,
}

impl Agents {
    fn start(bin: &Path, world: usize, k: usize, m: usize) -> Agents {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "bench-secret-0123456789").unwrap();
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        drop(listeners);
        let args = (0..world)
            .map(|rank| {
                vec![
                    format!("--rank={rank}"),
                    format!("--world-size={world}"),
                    format!("--peers={}", peers.join(",")),
                    format!("--data-shards={k}"),
                    format!("--parity-shards={m}"),
                    format!("--listen={}", peers[rank]),
                    format!(
                        "--local-socket={}",
                        dir.path().join(format!("{rank}.sock")).display()
                    ),
                    "--job=bench".into(),
                    format!("--secret-file={}", dir.path().join("secret").display()),
                ]
            })
            .collect();
        let mut agents = Agents {
            dir,
            children: (0..world).map(|_| None).collect(),
            args,
            bin: bin.to_path_buf(),
        };
        for rank in 0..world {
            agents.spawn(rank);
        }
        agents
    }

    fn socket(&self, rank: usize) -> PathBuf {
        self.dir.path().join(format!("{rank}.sock"))
    }

    fn spawn(&mut self, rank: usize) {
        let _ = std::fs::remove_file(self.socket(rank));
        let child = Command::new(&self.bin)
            .args(&self.args[rank])
            .env(
                "RUST_LOG",
                std::env::var("PETL_BENCH_AGENT_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning petl-snapshot-agent; build it with cargo build --release -p petl-snapshot");
        self.children[rank] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket(rank)).is_err() {
            assert!(Instant::now() < deadline, "agent {rank} did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self, rank: usize) {
        if let Some(mut c) = self.children[rank].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for rank in 0..self.children.len() {
            self.kill(rank);
        }
    }
}

fn state(generation: u64, bytes: usize, rank: usize) -> Snapshot {
    let per = bytes / 3 / 4 * 4;
    let data = random_bytes(per);
    let tensor = |name: &str| NamedTensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: vec![per / 4],
        data: data.clone(),
    };
    Snapshot {
        generation,
        step: generation,
        tensors: vec![tensor("w"), tensor("adam.m.w"), tensor("adam.v.w")],
        rng_state: vec![rank as u8; 32],
        data_cursor: b"offset=0".to_vec(),
    }
}

/// Seconds to push `streams` × `len` bytes through loopback TCP at once, one sender and one
/// receiver thread per stream, into buffers already touched: the floor for moving shards.
fn loopback_tcp(len: usize, streams: usize) -> f64 {
    let mut links = RawLinks::new(len, streams);
    links.once(); // warm-up: buffers, TCP windows
    median((0..5).map(|_| links.once()).collect())
}

/// `streams` loopback TCP connections, each with a receiver thread reading `len` bytes into a
/// buffer already touched and answering one byte, kept open so that the floor can be timed
/// between commits, under the same load.
struct RawLinks {
    payload: std::sync::Arc<Vec<u8>>,
    links: Vec<std::net::TcpStream>,
    sinks: Vec<std::thread::JoinHandle<()>>,
}

impl RawLinks {
    fn new(len: usize, streams: usize) -> RawLinks {
        use std::io::Read;
        let mut sinks = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..streams {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(listener.local_addr().unwrap());
            sinks.push(std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = vec![1u8; len];
                while s.read_exact(&mut buf).is_ok() {
                    s.write_all(&[1]).unwrap();
                }
            }));
        }
        let links = addrs
            .iter()
            .map(|a| {
                let s = std::net::TcpStream::connect(a).unwrap();
                s.set_nodelay(true).unwrap();
                s
            })
            .collect();
        RawLinks {
            payload: std::sync::Arc::new(random_bytes(len)),
            links,
            sinks,
        }
    }

    /// Seconds to send the payload on every link at once and have each acknowledged.
    fn once(&mut self) -> f64 {
        use std::io::Read;
        let t = Instant::now();
        std::thread::scope(|scope| {
            for link in self.links.iter_mut() {
                let payload = self.payload.clone();
                scope.spawn(move || {
                    link.write_all(&payload).unwrap();
                    let mut ack = [0u8; 1];
                    link.read_exact(&mut ack).unwrap();
                });
            }
        });
        t.elapsed().as_secs_f64()
    }
}

impl Drop for RawLinks {
    fn drop(&mut self) {
        self.links.clear();
        for sink in self.sinks.drain(..) {
            let _ = sink.join();
        }
    }
}

/// Filesystem type and source of the mount holding `path`, from /proc/self/mountinfo.
fn filesystem_of(path: &Path) -> (String, String) {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(mount), Some(fs), Some(source)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 2))
        else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|b| mount.len() >= b.0) {
            best = Some((mount.len(), fs.to_string(), source.to_string()));
        }
    }
    best.map(|(_, fs, source)| (fs, source))
        .unwrap_or_else(|| ("?".into(), "?".into()))
}

fn ms(d: f64) -> String {
    format!("{:.2} ms", d * 1e3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn agent_bin(args: &Args) -> PathBuf {
    args.agent_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .with_file_name("petl-snapshot-agent")
    })
}

fn end_to_end_section(args: &Args) {
    let bin = agent_bin(args);
    let bytes = args.state_mib << 20;
    let world = args.world;
    let (k, m) = (2, 1);
    println!(
        "\n## End to end: {world} agent processes on loopback, layout {k}+{m}, {} MiB of state per rank",
        args.state_mib
    );
    let mut agents = Agents::start(&bin, world, k, m);
    let clients: Vec<SnapshotClient> = (0..world)
        .map(|r| SnapshotClient::new(agents.socket(r)))
        .collect();
    let template: Vec<Snapshot> = (0..world).map(|r| state(0, bytes, r)).collect();
    let encoded_len = template[0].encode().unwrap().len();

    // What the trainer does on its own thread per snapshot: build the owned state, then put.
    let mut build = Vec::new();
    let mut stall = Vec::new();
    let mut commit_one = Vec::new();
    let mut commit_all = Vec::new();
    let mut generation = 0;
    for round in 0..8 {
        // Rounds alternate: rank 0 alone, then all ranks at once.
        let ranks: Vec<usize> = if round % 2 == 0 {
            vec![0]
        } else {
            (0..world).collect()
        };
        generation += 1;
        // The trainer builds its owned state on its own time; the commit clock starts at put.
        let states: Vec<Snapshot> = ranks
            .iter()
            .map(|&r| {
                let t = Instant::now();
                let mut s = template[r].clone();
                s.generation = generation;
                build.push(t.elapsed().as_secs_f64());
                s
            })
            .collect();
        let started = Instant::now();
        for (&r, s) in ranks.iter().zip(states) {
            let t = Instant::now();
            clients[r].put(s);
            stall.push(t.elapsed().as_secs_f64());
        }
        for &r in &ranks {
            let newest = clients[r]
                .wait_committed(generation, Duration::from_secs(60))
                .unwrap();
            assert!(newest >= Some(generation));
        }
        let took = started.elapsed().as_secs_f64();
        if ranks.len() == 1 {
            commit_one.push(took)
        } else {
            commit_all.push(took)
        }
        // Ranks that skipped this generation catch up so every rank's newest is the same.
        for (r, c) in clients.iter().enumerate() {
            if !ranks.contains(&r) {
                let mut s = template[r].clone();
                s.generation = generation;
                c.put(s);
                c.wait_committed(generation, Duration::from_secs(60))
                    .unwrap();
            }
        }
    }
    let max_stall = stall.iter().cloned().fold(0.0, f64::max);

    // The stall over many puts, as a trainer snapshotting every step sees it: build the state,
    // put, build the next; the agents commit (and supersede) in the background meanwhile.
    // The control times an empty step in the same loop: what the machine's scheduler alone
    // adds to any few-microsecond call at this load.
    let mut many = Vec::with_capacity(args.puts);
    let mut control = Vec::with_capacity(args.puts);
    for _ in 0..args.puts {
        generation += 1;
        let mut s = template[0].clone();
        s.generation = generation;
        let t = Instant::now();
        std::hint::black_box(&mut s);
        control.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        clients[0].put(s);
        many.push(t.elapsed().as_secs_f64());
    }
    control.sort_by(f64::total_cmp);
    for (r, c) in clients.iter().enumerate() {
        let mut s = template[r].clone();
        s.generation = generation;
        c.put(s);
        c.wait_committed(generation, Duration::from_secs(60))
            .unwrap();
    }
    let superseded = clients[0].superseded();
    many.sort_by(f64::total_cmp);

    // The peer: a durable checkpoint of the same state, written exactly as the durable tier
    // writes it (temp file, fsync, rename, directory fsync), on a persistent disk. The commit
    // timing starts at put(), so the serialisation (manifest + checksums) is counted on both
    // sides; and 4 ranks write their files at once, as 4 trainers on one node would.
    let encoded = template[0].encode().unwrap();
    let disk_root = std::env::var("PETL_BENCH_DISK_DIR").unwrap_or_else(|_| ".".into());
    let file_dir = tempfile::tempdir_in(&disk_root).unwrap();
    let (fs_type, fs_source) = filesystem_of(file_dir.path());
    let disk = petl_snapshot::DirStore::new(file_dir.path(), "bench").unwrap();
    let all_encoded: Vec<Vec<u8>> = template.iter().map(|s| s.encode().unwrap()).collect();
    let mut file_gen = 0u64;
    let mut t_file_one = Vec::new();
    let mut t_file_all = Vec::new();
    for _ in 0..5 {
        file_gen += 1;
        let t = Instant::now();
        disk.put(0, file_gen, &encoded).unwrap();
        t_file_one.push(t.elapsed().as_secs_f64());
        disk.remove(0, file_gen).unwrap();
        let t = Instant::now();
        std::thread::scope(|scope| {
            for (rank, bytes) in all_encoded.iter().enumerate() {
                let disk = &disk;
                scope.spawn(move || disk.put(rank as u32, file_gen, bytes).unwrap());
            }
        });
        t_file_all.push(t.elapsed().as_secs_f64());
        for rank in 0..world {
            disk.remove(rank as u32, file_gen).unwrap();
        }
    }
    let t_file_raw = median(t_file_one);
    let t_file_all_raw = median(t_file_all);
    let t_encode = time_median(|| {
        std::hint::black_box(template[0].encode_parts().unwrap());
    });
    let shm = Path::new("/dev/shm").join(format!("petl-bench-{}", std::process::id()));
    let t_shm = time_median(|| {
        std::fs::write(&shm, &encoded).unwrap();
        std::hint::black_box(std::fs::read(&shm).unwrap());
    });
    let _ = std::fs::remove_file(&shm);
    let t_uds = {
        // put → acknowledged by the agent: serialisation + Unix socket transfer + agent's check.
        let mut v = Vec::new();
        for _ in 0..5 {
            generation += 1;
            let mut s = template[0].clone();
            s.generation = generation;
            let t = Instant::now();
            clients[0].put(s);
            clients[0].flush(Duration::from_secs(60)).unwrap();
            v.push(t.elapsed().as_secs_f64());
        }
        for (r, c) in clients.iter().enumerate() {
            let mut s = template[r].clone();
            s.generation = generation;
            c.put(s);
            c.wait_committed(generation, Duration::from_secs(60))
                .unwrap();
        }
        median(v)
    };

    println!(
        "encoded snapshot: {:.1} MiB",
        encoded_len as f64 / (1 << 20) as f64
    );
    println!(
        "{:<58} {:>12}",
        "trainer-visible stall of put() (median)",
        ms(median(stall.clone()))
    );
    println!(
        "{:<58} {:>12}",
        "trainer-visible stall of put() (max)",
        ms(max_stall)
    );
    println!(
        "{:<58} {:>12}",
        format!(
            "stall of put() over {} back-to-back puts: median",
            many.len()
        ),
        ms(many[many.len() / 2])
    );
    println!(
        "{:<58} {:>12}",
        "  p99",
        ms(many[(many.len() * 99 / 100).min(many.len() - 1)])
    );
    println!("{:<58} {:>12}", "  max", ms(many[many.len() - 1]));
    println!(
        "{:<58} {:>12}",
        "  control: an empty step timed the same way, max",
        ms(control[control.len() - 1])
    );
    println!(
        "{:<58} {:>12}",
        "  handoffs superseded in the mailbox (never sent)", superseded
    );
    println!(
        "{:<58} {:>12}",
        "  (building the owned state by copying tensors, median)",
        ms(median(build))
    );
    println!(
        "{:<58} {:>12}",
        "background: manifest + BLAKE3 checksums (encode_parts)",
        ms(t_encode)
    );
    println!(
        "{:<58} {:>12}",
        "background: put → agent ack over the Unix socket",
        ms(t_uds)
    );
    println!(
        "{:<58} {:>12}",
        "alternative: write + read the bytes via /dev/shm (tmpfs)",
        ms(t_shm)
    );
    let c1 = median(commit_one);
    let c4 = median(commit_all);
    println!(
        "{:<58} {:>12}",
        "put → committed, rank 0 alone (median)",
        ms(c1)
    );
    println!(
        "{:<58} {:>12}",
        "put → committed on all 4 ranks at once (median)",
        ms(c4)
    );
    println!(
        "{:<58} {:>12}",
        format!("peer disk: {fs_type} on {fs_source} (PETL_BENCH_DISK_DIR)"),
        if matches!(fs_type.as_str(), "tmpfs" | "ramfs" | "overlay") {
            "NOT PERSISTENT"
        } else {
            "persistent"
        }
    );
    let t_file = t_encode + t_file_raw;
    let t_file_all = t_encode + t_file_all_raw;
    println!(
        "{:<58} {:>12}",
        "peer: durable write (temp, write, fsync, rename, dir fsync)",
        ms(t_file_raw)
    );
    println!(
        "{:<58} {:>12}",
        "peer: serialise + durable write, one rank (median)",
        ms(t_file)
    );
    println!(
        "{:<58} {:>12}",
        "peer: serialise + durable write, 4 ranks at once (median)",
        ms(t_file_all)
    );
    println!(
        "{:<58} {:>12.2}x",
        "ratio durable file / commit, rank alone (target >= 20)",
        t_file / c1
    );
    println!(
        "{:<58} {:>12.2}x",
        "ratio durable files / commit, 4 ranks at once (target >= 20)",
        t_file_all / c4
    );
    // The floor under any commit: the shards themselves through loopback TCP, nothing else.
    let shard_len = petl_snapshot::Layout::new(k, m)
        .unwrap()
        .shard_len(encoded_len);
    let holders = k + m;
    let t_wire = loopback_tcp(shard_len, holders);
    println!(
        "{:<58} {:>12}",
        format!(
            "floor: {holders} × {:.1} MiB raw over loopback TCP at once",
            shard_len as f64 / (1 << 20) as f64
        ),
        ms(t_wire)
    );
    println!(
        "{:<58} {:>9.2} GB/s",
        "  loopback bandwidth, all streams together",
        gbs(holders * shard_len, t_wire)
    );
    println!(
        "{:<58} {:>12}",
        "floor of a commit: serialise + that raw transfer",
        ms(t_encode + t_wire)
    );
    println!(
        "{:<58} {:>12.2}x",
        "  best ratio any commit can reach: durable file / floor",
        t_file / (t_encode + t_wire)
    );

    // Recovery: tier 1 (trainer restart), tier 2 (pod replaced).
    drop(clients);
    let client = SnapshotClient::new(agents.socket(1));
    let t = Instant::now();
    let (s, tier) = client.restore(Duration::from_secs(60)).unwrap().unwrap();
    let t1 = t.elapsed().as_secs_f64();
    assert_eq!((s.generation, tier), (generation, Tier::Local));
    drop(client);
    agents.kill(1);
    agents.spawn(1);
    let client = SnapshotClient::new(agents.socket(1));
    let t = Instant::now();
    let agreement = client
        .agree_generation(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    let t_agree = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (s, tier) = client
        .restore_generation(agreement.generation, Duration::from_secs(60))
        .unwrap();
    let t2 = t.elapsed().as_secs_f64();
    assert_eq!((s.generation, tier), (generation, Tier::Peers));
    assert!(s.tensors[0].data == template[1].tensors[0].data);
    println!(
        "{:<58} {:>12}",
        "tier 1 restore (agree + local copy + verify)",
        ms(t1)
    );
    println!(
        "{:<58} {:>12}",
        "tier 2: agreement after the pod was replaced",
        ms(t_agree)
    );
    println!(
        "{:<58} {:>12}",
        "tier 2: gather k shards + decode + verify",
        ms(t2)
    );
    println!("{:<58} {:>12}", "tier 2 total", ms(t_agree + t2));
}

// ---- the commit against its floor ----

/// The commit of one generation (put → committed on every holder) against what any commit must
/// do at least on the same machine: serialise the state, then move the shards that leave the
/// agent through loopback TCP, raw, at once. For one rank alone and for every rank at once.
fn commit_section(args: &Args) {
    let bin = agent_bin(args);
    let world = args.world;
    println!(
        "\n## Commit against its floor: {world} agent processes on loopback, median of {} commits each",
        args.rounds
    );
    println!(
        "(floor = serialise (manifest + BLAKE3 per part) + the shards leaving the agent, raw over loopback TCP at once, timed alternately with the commits after the same {} ms pause; target commit <= 1.5x floor)",
        args.settle_ms
    );
    println!(
        "{:<6} {:>8} {:>7} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "layout",
        "state",
        "shards",
        "commit 1",
        "floor 1",
        "ratio",
        "commit all",
        "floor all",
        "ratio"
    );
    for &(k, m) in &args.layouts {
        if k + m > world {
            println!(
                "{k}+{m}: needs {} ranks, --world is {world}; skipped",
                k + m
            );
            continue;
        }
        for &mib in &args.commit_sizes_mib {
            commit_row(&bin, world, k, m, mib << 20, args);
        }
    }
}

fn commit_row(bin: &Path, world: usize, k: usize, m: usize, bytes: usize, args: &Args) {
    let (rounds, settle_ms) = (args.rounds, args.settle_ms);
    let agents = Agents::start(bin, world, k, m);
    let clients: Vec<SnapshotClient> = (0..world)
        .map(|r| SnapshotClient::new(agents.socket(r)))
        .collect();
    let template: Vec<Snapshot> = (0..world).map(|r| state(0, bytes, r)).collect();
    let encoded_len = template[0].encode().unwrap().len();
    let mut generation = 0;
    let mut commit = |ranks: &[usize]| {
        generation += 1;
        let states: Vec<Snapshot> = ranks
            .iter()
            .map(|&r| {
                let mut s = template[r].clone();
                s.generation = generation;
                s
            })
            .collect();
        let started = Instant::now();
        for (&r, s) in ranks.iter().zip(states) {
            clients[r].put(s);
        }
        for &r in ranks {
            let newest = clients[r]
                .wait_committed(generation, Duration::from_secs(120))
                .unwrap();
            assert!(
                newest >= Some(generation),
                "generation {generation} not committed"
            );
        }
        started.elapsed().as_secs_f64()
    };
    let placement = petl_snapshot::Placement::new(world, Layout::new(k, m).unwrap()).unwrap();
    let leaving = (0..k + m).filter(|&i| placement.holder(0, i) != 0).count();
    let shard_len = Layout::new(k, m).unwrap().shard_len(encoded_len);
    // The floor's two parts, timed one after the other: serialising (for every rank: each on
    // a thread of its own, at once), then the raw transfer of the shards that leave.
    let serialise = |ranks: usize| {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for s in &template[..ranks] {
                scope.spawn(move || std::hint::black_box(s.encode_parts().unwrap()));
            }
        });
        t.elapsed().as_secs_f64()
    };
    let mut raw_one = RawLinks::new(shard_len, leaving);
    let mut raw_all = RawLinks::new(shard_len, world * leaving);
    let all: Vec<usize> = (0..world).collect();
    // Warm-up: links dialled, buffers and pools faulted in.
    commit(&all);
    commit(&all);
    raw_one.once();
    raw_all.once();
    // Each commit and each floor is timed after the same pause (the training step between two
    // snapshots: the client prepares its next memfd, the agents free what they pruned), and
    // they alternate, so a load that shifts during the run weighs on both alike.
    let settle = || std::thread::sleep(Duration::from_millis(settle_ms));
    let (mut one, mut every, mut floor_one, mut floor_all) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        settle();
        one.push(commit(&[0]));
        settle();
        floor_one.push(serialise(1) + raw_one.once());
        settle();
        every.push(commit(&all));
        settle();
        floor_all.push(serialise(world) + raw_all.once());
    }
    drop((raw_one, raw_all));
    drop(clients);
    drop(agents);
    let t_serialise = time_median(|| {
        std::hint::black_box(template[0].encode_parts().unwrap());
    });
    // Where a lone rank's commit spends what the floor does not: the handoff into a sealed memfd
    // (serialise + copy; into new pages, or into pages the sender allocated while idle), the
    // agent mapping it, and the BLAKE3 of a shard (done by the owner for every shard and by
    // every holder on receipt).
    let t_memfd = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let (fd, len) = petl_snapshot::handoff::write_sealed(&template[0]).unwrap();
                let took = t.elapsed().as_secs_f64();
                drop((fd, len));
                took
            })
            .collect(),
    );
    let t_prepared = median(
        (0..5)
            .map(|_| {
                let file = petl_snapshot::handoff::HandoffFile::prepare(encoded_len).unwrap();
                let t = Instant::now();
                let sealed = file.seal(&template[0]).unwrap();
                let took = t.elapsed().as_secs_f64();
                drop(sealed);
                took
            })
            .collect(),
    );
    let t_map = median(
        (0..5)
            .map(|_| {
                let (fd, len) = petl_snapshot::handoff::write_sealed(&template[0]).unwrap();
                let t = Instant::now();
                let mapped = petl_snapshot::handoff::map_padded(fd, len, k * shard_len).unwrap();
                let took = t.elapsed().as_secs_f64();
                drop(mapped);
                took
            })
            .collect(),
    );
    let shard = random_bytes(shard_len);
    let t_shard_hash = time_median(|| {
        std::hint::black_box(codec::shard_checksum(&shard));
    });
    let (floor_one, floor_all) = (median(floor_one), median(floor_all));
    let (c1, call) = (median(one), median(every));
    println!(
        "{:<6} {:>8} {:>7} {:>12} {:>12} {:>6.2}x {:>12} {:>12} {:>6.2}x",
        format!("{k}+{m}"),
        format!("{} MiB", bytes >> 20),
        format!("{leaving}x{:.1}M", shard_len as f64 / (1 << 20) as f64),
        ms(c1),
        ms(floor_one),
        c1 / floor_one,
        ms(call),
        ms(floor_all),
        call / floor_all
    );
    println!(
        "{:<23} serialise {}, into a fresh sealed memfd {} (a prepared one {}), agent maps it {}, BLAKE3 of a shard {}",
        "",
        ms(t_serialise),
        ms(t_memfd),
        ms(t_prepared),
        ms(t_map),
        ms(t_shard_hash)
    );
}
