//! The TCP collective with real sockets on loopback: ranks are threads of this process, each
//! with its own listener on a port the system picked.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use petl_snapshot::auth::Secret;
use petl_trainer::collective::{Collective, CollectiveError, TcpCollective, TcpConfig};

const SECRET: &[u8] = b"collective-test-secret-0123456789";

fn secret(bytes: &[u8]) -> Secret {
    Secret::new(bytes.to_vec()).unwrap()
}

/// Listeners on free loopback ports and the peer list that names them.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpCollective::listen(SocketAddr::from(([127, 0, 0, 1], 0)), None).unwrap())
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, peers)
}

fn config(rank: usize, peers: &[String], job: &str, secret_bytes: &[u8]) -> TcpConfig {
    let mut config = TcpConfig::new(rank, peers.to_vec(), job, secret(secret_bytes)).unwrap();
    config.connect_deadline = Duration::from_secs(20);
    config.op_timeout = Duration::from_secs(60);
    config
}

/// Runs `work` on every rank of a group formed on `listeners`, each rank on its own thread.
fn run_group<T: Send>(
    listeners: Vec<TcpListener>,
    configs: Vec<TcpConfig>,
    work: impl Fn(usize, Result<TcpCollective, CollectiveError>) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = listeners
            .into_iter()
            .zip(configs)
            .enumerate()
            .map(|(rank, (listener, config))| {
                scope.spawn(move || work(rank, TcpCollective::connect_on(listener, config)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A rank's input: values of mixed magnitude and sign, so that a change of the summation order
/// would change the bits.
fn input(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as u64 * 2654435761 + rank as u64 * 40503 + seed * 97) % 1_000_003;
            let scale = [1e-3f32, 1.0, 1e3][i % 3];
            (x as f32 / 1_000_003.0 - 0.5) * scale
        })
        .collect()
}

/// The sum of chunk `c` in the order the ring forms it: ((x[c+1] + x[c+2]) + …) + x[c].
fn ring_sum(inputs: &[Vec<f32>], c: usize, n: usize) -> Vec<f32> {
    let size = inputs.len();
    let mut sum = inputs[(c + 1) % size][c * n..(c + 1) * n].to_vec();
    for hop in 2..=size {
        let r = (c + hop) % size;
        for (s, x) in sum.iter_mut().zip(&inputs[r][c * n..(c + 1) * n]) {
            *s += *x;
        }
    }
    sum
}

/// Reduce-scatter then all-gather of `n` elements a chunk on `size` ranks; returns each rank's
/// reduced chunk and gathered vector.
fn reduce_then_gather(size: usize, n: usize, seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let (listeners, peers) = listeners(size);
    let configs = (0..size)
        .map(|r| config(r, &peers, "job-a", SECRET))
        .collect();
    run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        assert_eq!((group.rank(), group.world_size()), (rank, size));
        let x = Tensor::new(input(rank, size * n, seed), &Device::Cpu).unwrap();
        let mine = group.reduce_scatter_sum(&x).unwrap();
        assert_eq!(mine.dims(), &[n]);
        let all = group.all_gather(&mine).unwrap();
        (mine.to_vec1().unwrap(), all.to_vec1().unwrap())
    })
}

#[test]
fn reduce_scatter_and_all_gather_give_the_ring_order_sums_on_2_3_and_4_ranks() {
    // 1237: a chunk size that is a multiple of nothing convenient; 65536 + 13: chunks that
    // straddle the links' 256 KiB segments.
    for (size, n) in [(2, 1237), (3, 1237), (4, 1237), (3, 65536 + 13), (2, 1)] {
        let inputs: Vec<Vec<f32>> = (0..size).map(|r| input(r, size * n, 7)).collect();
        let results = reduce_then_gather(size, n, 7);
        let expected: Vec<f32> = (0..size).flat_map(|c| ring_sum(&inputs, c, n)).collect();
        for (rank, (mine, all)) in results.iter().enumerate() {
            assert_eq!(
                mine[..],
                expected[rank * n..(rank + 1) * n],
                "rank {rank} of {size}"
            );
            assert_eq!(all, &expected, "all-gather on rank {rank} of {size}");
        }
        // Against an exact sum: only rounding separates them.
        for (i, got) in expected.iter().enumerate() {
            let exact: f64 = inputs.iter().map(|x| x[i] as f64).sum();
            assert!((*got as f64 - exact).abs() <= 1e-3 * exact.abs().max(1.0));
        }
    }
}

#[test]
fn the_same_inputs_give_the_same_bits_on_every_run() {
    let bits = |results: Vec<(Vec<f32>, Vec<f32>)>| -> Vec<Vec<u32>> {
        results
            .into_iter()
            .map(|(m, a)| m.iter().chain(&a).map(|v| v.to_bits()).collect())
            .collect()
    };
    let first = bits(reduce_then_gather(4, 3001, 11));
    let second = bits(reduce_then_gather(4, 3001, 11));
    assert_eq!(first, second);
}

#[test]
fn small_exchanges_arrive_in_rank_order() {
    let (listeners, peers) = listeners(3);
    let configs = (0..3).map(|r| config(r, &peers, "job-a", SECRET)).collect();
    let results = run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        let mine = vec![rank as u8; rank * 5];
        let all = group.all_gather_bytes(&mine).unwrap();
        let sums = group.all_reduce_sum_f64(&[rank as f64, 0.5]).unwrap();
        (all, sums)
    });
    for (all, sums) in results {
        assert_eq!(all, vec![vec![], vec![1u8; 5], vec![2u8; 10]]);
        assert_eq!(sums, vec![3.0, 1.5]);
    }
}

#[test]
fn calls_with_sizes_the_ranks_disagree_on_fail_on_every_rank() {
    let (listeners, peers) = listeners(2);
    let configs = (0..2).map(|r| config(r, &peers, "job-a", SECRET)).collect();
    let results = run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        let x = Tensor::zeros(10 + 2 * rank, candle_core::DType::F32, &Device::Cpu).unwrap();
        let first = group.all_gather(&x).map(|_| ());
        let later = group.all_gather(&x).map(|_| ());
        (first, later)
    });
    for (first, later) in results {
        assert!(first.is_err());
        // Poisoned: the later call fails at once, with the same kind of error.
        let (first, later) = (first.unwrap_err(), later.unwrap_err());
        assert_eq!(
            std::mem::discriminant(&first),
            std::mem::discriminant(&later)
        );
    }
}

fn formation_errors(secrets: [&[u8]; 2], jobs: [&str; 2]) -> Vec<CollectiveError> {
    let (listeners, peers) = listeners(2);
    // The rank that detects the mismatch fails at once; the other one, which may only have
    // been refused, waits out its deadline (a stranger must not end its formation).
    let configs = (0..2)
        .map(|r| {
            let mut c = config(r, &peers, jobs[r], secrets[r]);
            c.connect_deadline = Duration::from_secs(3);
            c
        })
        .collect();
    run_group(listeners, configs, |_, group| group.unwrap_err())
}

#[test]
fn a_wrong_secret_is_refused_on_both_ends() {
    let errors = formation_errors([SECRET, b"another-secret-entirely-0123"], ["job-a"; 2]);
    for (rank, error) in errors.iter().enumerate() {
        assert!(
            matches!(error, CollectiveError::Auth { rank: peer, .. } if *peer == 1 - rank),
            "rank {rank}: {error}"
        );
    }
}

#[test]
fn another_job_is_refused_on_both_ends() {
    let errors = formation_errors([SECRET; 2], ["job-a", "job-b"]);
    for (rank, error) in errors.iter().enumerate() {
        assert!(
            matches!(error, CollectiveError::Auth { rank: peer, .. } if *peer == 1 - rank),
            "rank {rank}: {error}"
        );
        assert!(!error.is_transient());
    }
}

#[test]
fn a_stranger_dialling_first_is_refused_and_the_group_still_forms() {
    let (listeners, peers) = listeners(2);
    // A rank of another job whose peer list names rank 1's address as its next rank: its
    // connection waits in rank 1's backlog before rank 0's does.
    let (mut stranger_listener, mut stranger_peers) = self::listeners(1);
    stranger_peers.push(peers[1].clone());
    let stranger_config = config(0, &stranger_peers, "job-b", SECRET);
    let stranger = std::thread::spawn(move || {
        TcpCollective::connect_on(stranger_listener.pop().unwrap(), stranger_config).map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(300));
    let configs = (0..2).map(|r| config(r, &peers, "job-a", SECRET)).collect();
    let sums = run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        group.all_reduce_sum_f64(&[1.0 + rank as f64]).unwrap()
    });
    assert_eq!(sums, vec![vec![3.0], vec![3.0]]);
    match stranger.join().unwrap() {
        Err(CollectiveError::Auth { rank: 1, .. }) => {}
        other => panic!("the stranger was not refused: {other:?}"),
    }
}

#[test]
fn a_rank_that_never_starts_is_named_by_every_rank_within_the_deadline() {
    let (mut listeners, peers) = listeners(4);
    // Rank 3 never starts: nothing listens at its address.
    drop(listeners.pop());
    let deadline = Duration::from_millis(1500);
    let configs = (0..3)
        .map(|r| {
            let mut c = config(r, &peers, "job-a", SECRET);
            c.connect_deadline = deadline;
            c
        })
        .collect();
    let start = Instant::now();
    let errors = run_group(listeners, configs, |_, group| {
        (group.unwrap_err(), start.elapsed())
    });
    for (rank, (error, took)) in errors.iter().enumerate() {
        match error {
            CollectiveError::PeerUnreachable {
                rank: 3, address, ..
            } => {
                assert_eq!(address, &peers[3])
            }
            other => panic!("rank {rank}: {other}"),
        }
        assert!(error.is_transient());
        assert!(
            *took < deadline + Duration::from_secs(2),
            "rank {rank} took {took:?}"
        );
    }
}

/// Every rank runs reduce-scatters until it fails; rank `victim` drops its group after
/// `survive` calls. Returns each other rank's error and how long after the drop it came.
fn drop_mid_run(size: usize, victim: usize, listeners: Vec<TcpListener>, peers: &[String]) {
    let survive = 5;
    let configs = (0..size)
        .map(|r| config(r, peers, "job-a", SECRET))
        .collect();
    let dropped_at = std::sync::OnceLock::new();
    let results = run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        let x = Tensor::new(input(rank, size * 50_000, 3), &Device::Cpu).unwrap();
        for call in 0.. {
            if rank == victim && call == survive {
                drop(group);
                dropped_at.set(Instant::now()).unwrap();
                return None;
            }
            if let Err(error) = group.reduce_scatter_sum(&x) {
                let failed_at = Instant::now();
                let again = group.reduce_scatter_sum(&x).unwrap_err();
                return Some((error, again, failed_at));
            }
        }
        unreachable!()
    });
    let dropped_at = *dropped_at.get().unwrap();
    for (rank, result) in results.into_iter().enumerate() {
        let Some((error, again, failed_at)) = result else {
            assert_eq!(rank, victim);
            continue;
        };
        assert!(error.is_transient(), "rank {rank}: {error}");
        assert!(
            matches!(error, CollectiveError::PeerLost { .. }),
            "rank {rank}: {error}"
        );
        assert_eq!(
            std::mem::discriminant(&error),
            std::mem::discriminant(&again)
        );
        // Far below the 60 s operation timeout: the failure travelled around the ring.
        let after = failed_at.saturating_duration_since(dropped_at);
        assert!(
            after < Duration::from_secs(5),
            "rank {rank} failed {after:?} after the drop"
        );
    }
}

#[test]
fn a_rank_dropped_mid_run_fails_every_other_rank_and_the_group_forms_again() {
    let size = 4;
    let (listeners, peers) = listeners(size);
    let addresses: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    drop_mid_run(size, 1, listeners, &peers);
    // The same ports at once (the trainer rebuilds its group in the same process), and the
    // new group computes the same sums as a fresh one.
    let listeners = addresses
        .iter()
        .map(|a| TcpCollective::listen(*a, None).unwrap())
        .collect();
    let configs = (0..size)
        .map(|r| config(r, &peers, "job-a", SECRET))
        .collect();
    let n = 999;
    let inputs: Vec<Vec<f32>> = (0..size).map(|r| input(r, size * n, 5)).collect();
    let results = run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        let x = Tensor::new(inputs[rank].clone(), &Device::Cpu).unwrap();
        group
            .reduce_scatter_sum(&x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    for (rank, mine) in results.iter().enumerate() {
        assert_eq!(mine, &ring_sum(&inputs, rank, n));
    }
}

/// What a man-in-the-middle does to the bytes rank 0 sends to rank 1.
#[derive(Clone, Copy)]
enum Fault {
    /// Flips the lowest bit of the byte at this offset of the stream.
    Flip(usize),
    /// Forwards this many bytes, then closes both connections (the link dies mid-frame).
    Cut(usize),
}

/// A TCP relay to `target` that applies `fault` to the bytes flowing towards `target`; the
/// other direction passes untouched. Returns the relay's address.
fn relay(target: SocketAddr, fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(target).unwrap();
            let (mut back_from, mut back_to) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
                let _ = back_to.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || forward(client, server, fault));
        }
    });
    address
}

fn forward(mut from: TcpStream, mut to: TcpStream, fault: Fault) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passed = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match fault {
            Fault::Flip(at) if (passed..passed + n).contains(&at) => chunk[at - passed] ^= 1,
            Fault::Cut(at) if passed + n >= at => {
                let _ = to.write_all(&chunk[..at - passed]);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        passed += n;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Two ranks whose link from rank 0 to rank 1 runs through a faulty relay; each rank runs
/// reduce-scatters of `n` elements a chunk until one fails, and returns that error and how
/// long the whole run took.
fn through_relay(fault: Fault, n: usize) -> Vec<(CollectiveError, Duration)> {
    let (listeners, peers) = listeners(2);
    let relayed = relay(peers[1].parse().unwrap(), fault);
    // Rank 0 dials rank 1 through the relay; rank 1 dials rank 0 directly.
    let mut configs = vec![
        config(0, &[peers[0].clone(), relayed.to_string()], "job-a", SECRET),
        config(1, &peers, "job-a", SECRET),
    ];
    for c in &mut configs {
        c.op_timeout = Duration::from_secs(30);
    }
    let start = Instant::now();
    run_group(listeners, configs, |rank, group| {
        let mut group = group.unwrap();
        let x = Tensor::new(input(rank, 2 * n, 1), &Device::Cpu).unwrap();
        for _ in 0..1000 {
            if let Err(error) = group.reduce_scatter_sum(&x) {
                return (error, start.elapsed());
            }
        }
        panic!("rank {rank}: a thousand reduce-scatters passed the faulty relay");
    })
}

#[test]
fn a_tampered_frame_is_detected_by_its_receiver() {
    // One flipped bit inside the first chunk's body (the handshake and the check round take
    // a few hundred bytes; a chunk of 100,000 elements is 400,000 bytes).
    let errors = through_relay(Fault::Flip(100_000), 100_000);
    match &errors[1].0 {
        CollectiveError::Protocol { rank: 0, .. } => {}
        other => panic!("rank 1 accepted a tampered frame or failed otherwise: {other}"),
    }
    assert!(!errors[1].0.is_transient());
    // Rank 1 shut its links, so rank 0 fails too, as a lost peer, without waiting its timeout.
    assert!(
        matches!(errors[0].0, CollectiveError::PeerLost { rank: 1, .. }),
        "rank 0: {}",
        errors[0].0
    );
    for (rank, (_, took)) in errors.iter().enumerate() {
        assert!(*took < Duration::from_secs(10), "rank {rank} took {took:?}");
    }
}

#[test]
fn a_link_that_dies_mid_frame_is_a_lost_peer_on_both_ends() {
    let errors = through_relay(Fault::Cut(200_000), 100_000);
    for (rank, (error, took)) in errors.iter().enumerate() {
        assert!(
            matches!(error, CollectiveError::PeerLost { rank: peer, .. } if *peer == 1 - rank),
            "rank {rank}: {error}"
        );
        assert!(error.is_transient());
        assert!(*took < Duration::from_secs(10), "rank {rank} took {took:?}");
    }
}
