//! Measures the TCP collective on this machine: one data-parallel step's traffic (a
//! reduce-scatter of the bucket, then the all-gather of the reduced chunks) for N ranks
//! (threads of this process, real loopback sockets), against its floor: the same bytes through
//! raw loopback TCP with the same concurrency (N streams at once, each carrying what one rank
//! sends in the step, 2(N−1)/N of the bucket), with no framing, MAC or arithmetic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::Parser;
use petl_snapshot::auth::Secret;
use petl_trainer::collective::{Collective, TcpCollective, TcpConfig};

#[derive(Parser)]
#[command(about = "petl collective benchmarks")]
struct Args {
    /// Group sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    ranks: Vec<usize>,
    /// Bucket sizes in MiB (the whole reduce-scatter input, f32).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    mib: Vec<usize>,
    /// Bytes of data moved per measured size, at least: sets the repetitions.
    #[arg(long, default_value_t = 512)]
    budget_mib: usize,
    /// SO_SNDBUF/SO_RCVBUF of the links in bytes; 0 leaves the kernel's autotuning.
    #[arg(long, default_value_t = TcpConfig::DEFAULT_SOCKET_BUFFER)]
    socket_buffer: usize,
}

const MIB: usize = 1 << 20;

fn main() {
    let args = Args::parse();
    println!(
        "# petl collective bench; load average before: {}",
        loadavg()
    );
    println!(
        "# {} CPUs; ranks are threads of this process, each with its own sockets",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let buffer = (args.socket_buffer > 0).then_some(args.socket_buffer);
    println!(
        "# keyed BLAKE3 on one thread (the MAC each side pays per byte): {:.2} GB/s",
        blake3_rate(8 * MIB) / 1e9
    );
    println!("\n## reduce-scatter + all-gather vs the same bytes through raw loopback TCP");
    println!(
        "{:>5} {:>8} {:>11} {:>11} {:>11} {:>11} {:>8}",
        "ranks", "bucket", "step", "floor", "busbw GB/s", "floor GB/s", "ratio"
    );
    for &ranks in &args.ranks {
        for &mib in &args.mib {
            let bytes = mib * MIB;
            let reps = reps(bytes, args.budget_mib);
            let step = ring_step(ranks, bytes, reps, buffer);
            // What each rank sends (and receives) in the step: N−1 chunks of B/N, twice.
            let per_rank = bytes / ranks * 2 * (ranks - 1);
            let floor = loopback_floor(ranks, per_rank, reps, buffer);
            println!(
                "{:>5} {:>4} MiB {:>8.2} ms {:>8.2} ms {:>11.2} {:>11.2} {:>7.2}x",
                ranks,
                mib,
                step * 1e3,
                floor * 1e3,
                per_rank as f64 / step / 1e9,
                per_rank as f64 / floor / 1e9,
                step / floor
            );
        }
    }
    println!("\n# load average after: {}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Repetitions that move about `budget_mib` MiB, at least 3.
fn reps(bytes: usize, budget_mib: usize) -> usize {
    (budget_mib * MIB / bytes).max(3)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median seconds to push `bytes` through each of `streams` loopback TCP connections at once
/// (TCP_NODELAY, the links' socket buffers), from touched buffers into touched buffers, one
/// sending and one receiving thread per stream; each receiver acks its last byte.
fn loopback_floor(streams: usize, bytes: usize, reps: usize, buffer: Option<usize>) -> f64 {
    let mut sinks = Vec::new();
    let mut links = Vec::new();
    for _ in 0..streams {
        let listener =
            TcpCollective::listen(SocketAddr::from(([127, 0, 0, 1], 0)), buffer).unwrap();
        let address = listener.local_addr().unwrap();
        sinks.push(std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = vec![1u8; bytes];
            while s.read_exact(&mut buf).is_ok() {
                s.write_all(&[1]).unwrap();
            }
        }));
        let link = TcpStream::connect(address).unwrap();
        link.set_nodelay(true).unwrap();
        links.push(link);
    }
    let payload = vec![7u8; bytes];
    let mut once = || {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for link in links.iter_mut() {
                let payload = &payload;
                scope.spawn(move || {
                    link.write_all(payload).unwrap();
                    let mut ack = [0u8; 1];
                    link.read_exact(&mut ack).unwrap();
                });
            }
        });
        t.elapsed().as_secs_f64()
    };
    once(); // warm-up: windows, buffers
    let took = median((0..reps).map(|_| once()).collect());
    drop(links);
    for sink in sinks {
        sink.join().unwrap();
    }
    took
}

/// Bytes per second of keyed BLAKE3 on one thread: the MAC cost each side pays per byte.
fn blake3_rate(bytes: usize) -> f64 {
    let data = vec![3u8; bytes];
    let key = [9u8; 32];
    let once = || {
        let t = Instant::now();
        std::hint::black_box(blake3::keyed_hash(&key, &data));
        t.elapsed().as_secs_f64()
    };
    once();
    bytes as f64 / median((0..5).map(|_| once()).collect())
}

/// Median seconds of one reduce-scatter of `bytes` plus the all-gather of the result, over
/// `reps` repetitions, as the slowest rank sees them.
fn ring_step(ranks: usize, bytes: usize, reps: usize, buffer: Option<usize>) -> f64 {
    let listeners: Vec<TcpListener> = (0..ranks)
        .map(|_| TcpCollective::listen(SocketAddr::from(([127, 0, 0, 1], 0)), buffer).unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let secret = Secret::new(b"bench-collective-secret-0123456789".to_vec()).unwrap();
    let per_rank: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let mut config =
                    TcpConfig::new(rank, peers.clone(), "bench", secret.clone()).unwrap();
                config.socket_buffer = buffer;
                scope.spawn(move || {
                    let mut group = TcpCollective::connect_on(listener, config).unwrap();
                    let elements = bytes / 4 / ranks * ranks;
                    let values: Vec<f32> = (0..elements).map(|i| (i % 1000) as f32).collect();
                    let input = Tensor::from_vec(values, elements, &Device::Cpu).unwrap();
                    let mut step = || {
                        // Start together, so a rank's time is the step's, not its wait.
                        group.all_gather_bytes(&[]).unwrap();
                        let t = Instant::now();
                        let mine = group.reduce_scatter_sum(&input).unwrap();
                        let all = group.all_gather(&mine).unwrap();
                        let took = t.elapsed().as_secs_f64();
                        std::hint::black_box(all);
                        took
                    };
                    step(); // warm-up: windows, buffers, page faults of the spare chunks
                    (0..reps).map(|_| step()).collect::<Vec<f64>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let slowest: Vec<f64> = (0..reps)
        .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
        .collect();
    median(slowest)
}
