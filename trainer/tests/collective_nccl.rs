//! The NCCL collective on real GPUs (built with `--features cuda`). Every test needs a CUDA
//! device, so they are ignored by default: `bench/gpu/run.sh` runs this test binary with
//! `--ignored --nocapture` on a GPU machine. Ranks are threads of this process, one GPU each,
//! joined first by a TCP group on loopback (which carries NCCL's id) and then by NCCL.
#![cfg(feature = "cuda")]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use candle_core::cuda::cudarc::driver::CudaContext;
use candle_core::{DType, Device, Tensor};
use petl_snapshot::auth::Secret;
use petl_trainer::collective::{
    Collective, CollectiveError, NcclCollective, TcpCollective, TcpConfig,
};

const SECRET: &[u8] = b"collective-test-secret-0123456789";

fn gpus() -> usize {
    CudaContext::device_count().map_or(0, |n| n as usize)
}

/// NCCL groups of `size` ranks on GPUs `0..size`, each rank's `work` on its own thread.
fn run_group<T: Send>(size: usize, work: impl Fn(usize, NcclCollective) -> T + Sync) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..size)
        .map(|_| TcpCollective::listen(SocketAddr::from(([127, 0, 0, 1], 0)), None).unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    std::thread::scope(|scope| {
        let work = &work;
        let peers = &peers;
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                scope.spawn(move || {
                    let secret = Secret::new(SECRET.to_vec()).unwrap();
                    let mut config =
                        TcpConfig::new(rank, peers.clone(), "nccl-test", secret).unwrap();
                    config.connect_deadline = Duration::from_secs(20);
                    let tcp = TcpCollective::connect_on(listener, config).unwrap();
                    let device = Device::new_cuda(rank).unwrap();
                    let started = Instant::now();
                    let group = NcclCollective::new(tcp, &device).unwrap();
                    eprintln!(
                        "rank {rank}/{size}: NCCL communicator formed in {:.3} s",
                        started.elapsed().as_secs_f64()
                    );
                    work(rank, group)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A rank's input: values of mixed magnitude and sign.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as u64 * 2654435761 + rank as u64 * 40503) % 1_000_003;
            let scale = [1e-3f32, 1.0, 1e3][i % 3];
            (x as f32 / 1_000_003.0 - 0.5) * scale
        })
        .collect()
}

/// Times `rounds` reduce-scatters and all-gathers of `n` elements a chunk (the device is
/// synchronised by reading one value back after each round).
fn time_rounds(group: &mut NcclCollective, n: usize, rounds: usize) -> f64 {
    let size = group.world_size();
    let device = Device::new_cuda(group.rank()).unwrap();
    let x = Tensor::ones(size * n, DType::F32, &device).unwrap();
    let started = Instant::now();
    for _ in 0..rounds {
        let mine = group.reduce_scatter_sum(&x).unwrap();
        let all = group.all_gather(&mine).unwrap();
        assert_eq!(all.get(0).unwrap().to_scalar::<f32>().unwrap(), size as f32);
    }
    started.elapsed().as_secs_f64() / rounds as f64
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_group_of_one_gpu_returns_its_input_bit_for_bit() {
    assert!(gpus() >= 1, "no CUDA device answers");
    run_group(1, |_, mut group| {
        let device = Device::new_cuda(0).unwrap();
        let values = input(0, 10_007);
        let x = Tensor::new(values.as_slice(), &device).unwrap();
        let mine = group.reduce_scatter_sum(&x).unwrap();
        assert!(mine.device().is_cuda());
        assert_eq!(mine.to_vec1::<f32>().unwrap(), values);
        let all = group.all_gather(&mine).unwrap();
        assert_eq!(all.to_vec1::<f32>().unwrap(), values);
        // A strided view is made contiguous first.
        let strided = Tensor::new(values.as_slice(), &device)
            .unwrap()
            .reshape((10_007, 1))
            .unwrap()
            .t()
            .unwrap()
            .squeeze(0)
            .unwrap();
        let mine = group.reduce_scatter_sum(&strided).unwrap();
        assert_eq!(mine.to_vec1::<f32>().unwrap(), values);
        assert_eq!(
            group.all_gather_bytes(b"digest").unwrap(),
            vec![b"digest".to_vec()]
        );
        assert_eq!(group.all_reduce_sum_f64(&[1.5, -2.0]).unwrap(), [1.5, -2.0]);
        // 4 Mi elements (16 MiB): about the trainer's default bucket.
        let seconds = time_rounds(&mut group, 4 << 20, 20);
        eprintln!(
            "1 rank: reduce-scatter + all-gather of 16 MiB: {:.3} ms a round",
            seconds * 1e3
        );
    });
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_host_tensor_is_a_usage_error_and_poisons_the_group() {
    assert!(gpus() >= 1, "no CUDA device answers");
    run_group(1, |_, mut group| {
        let host = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let err = group.reduce_scatter_sum(&host).unwrap_err();
        assert!(matches!(err, CollectiveError::Usage(_)), "{err:?}");
        // A failed call poisons the group: later calls, even valid ones, fail at once with the
        // first error.
        let device = Device::new_cuda(0).unwrap();
        let valid = Tensor::new(&[1f32, 2.0], &device).unwrap();
        let again = group.all_gather(&valid).unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
    });
}

#[test]
#[ignore = "needs two CUDA GPUs"]
fn two_gpus_sum_their_chunks_and_gather_them_in_rank_order() {
    let size = 2;
    if gpus() < size {
        eprintln!("skipped: {} CUDA device(s), the test needs {size}", gpus());
        return;
    }
    let n = 65_536 + 13;
    let inputs: Vec<Vec<f32>> = (0..size).map(|r| input(r, size * n)).collect();
    // With two ranks every element is one addition, which is commutative in IEEE arithmetic:
    // NCCL's sum has the same bits as any other order.
    let sum: Vec<f32> = (0..size * n).map(|i| inputs[0][i] + inputs[1][i]).collect();
    let results = run_group(size, |rank, mut group| {
        let device = Device::new_cuda(rank).unwrap();
        let x = Tensor::new(inputs[rank].as_slice(), &device).unwrap();
        let mine = group.reduce_scatter_sum(&x).unwrap();
        let all = group.all_gather(&mine).unwrap();
        let seconds = time_rounds(&mut group, 4 << 20, 20);
        eprintln!(
            "rank {rank}/{size}: reduce-scatter + all-gather of 16 MiB chunks: {:.3} ms a round",
            seconds * 1e3
        );
        (
            mine.to_vec1::<f32>().unwrap(),
            all.to_vec1::<f32>().unwrap(),
        )
    });
    for (rank, (mine, all)) in results.iter().enumerate() {
        assert_eq!(mine[..], sum[rank * n..(rank + 1) * n], "rank {rank}");
        assert_eq!(all, &sum, "all-gather on rank {rank}");
    }
}
