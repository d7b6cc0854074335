//! A group of ranks as threads of one test process, for unit tests of the sharding math: every
//! operation is an exchange through shared slots between two barriers. Not a transport.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

use crate::collective::{Collective, Result};

/// One member of an in-process group.
pub struct ThreadGroup {
    rank: usize,
    world: usize,
    slots: Arc<Mutex<Vec<Vec<u8>>>>,
    barrier: Arc<Barrier>,
}

impl ThreadGroup {
    /// Runs `f(rank, group)` on `world` threads joined in one group; returns the results in
    /// rank order.
    pub fn run<R: Send>(
        world: usize,
        f: impl Fn(usize, &mut dyn Collective) -> R + Sync,
    ) -> Vec<R> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let mut member = ThreadGroup {
                        rank,
                        world,
                        slots: slots.clone(),
                        barrier: barrier.clone(),
                    };
                    let f = &f;
                    s.spawn(move || f(rank, &mut member))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank thread panicked"))
                .collect()
        })
    }

    fn exchange(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        self.slots.lock().expect("slots")[self.rank] = mine.to_vec();
        self.barrier.wait();
        let all = self.slots.lock().expect("slots").clone();
        // Nobody writes the next exchange before everyone has read this one.
        self.barrier.wait();
        all
    }
}

fn floats(t: &Tensor) -> Vec<u8> {
    t.to_vec1::<f32>()
        .expect("a 1-D f32 tensor")
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn tensor(bytes: &[u8], like: &Tensor) -> Tensor {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    let n = values.len();
    Tensor::from_vec(values, n, like.device()).expect("a tensor")
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        let all = self.exchange(&floats(input));
        let n = input.elem_count() / self.world;
        let mut sum = vec![0f32; n];
        // In rank order, as the trait requires.
        for bytes in &all {
            let chunk = &bytes[self.rank * n * 4..(self.rank + 1) * n * 4];
            for (s, b) in sum.iter_mut().zip(chunk.chunks_exact(4)) {
                *s += f32::from_le_bytes(b.try_into().expect("4"));
            }
        }
        Ok(Tensor::from_vec(sum, n, input.device())?)
    }

    fn all_gather(&mut self, chunk: &Tensor) -> Result<Tensor> {
        let all = self.exchange(&floats(chunk));
        Ok(tensor(&all.concat(), chunk))
    }

    fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange(mine))
    }
}
