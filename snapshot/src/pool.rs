//! Recycles the large buffers that shards are received and computed into, so their pages are
//! faulted in once: touching fresh memory costs several times a copy into memory already mapped.
//!
//! A buffer goes back to the pool when the last `Bytes` sharing it drops (the store pruned its
//! generation), and the pool keeps only a few, so it bounds extra memory to a few shards.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

/// Buffers smaller than this are cheap to fault in and are not kept.
pub const MIN_POOLED: usize = 1 << 20;

/// Free buffers waiting for reuse.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_free: usize,
}

impl BufferPool {
    /// A pool keeping at most `max_free` idle buffers.
    pub fn new(max_free: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            max_free,
        })
    }

    /// A buffer of exactly `len` bytes with unspecified contents (old bytes or zeros): a free
    /// one large enough if there is one, else a fresh one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().expect("pool lock");
            // Prefer the smallest buffer that fits, so large ones stay for large requests.
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut buf) => {
                // Only bytes past the old length are written; the rest is left as it was.
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// Shares `buf` as `Bytes`; when the last clone drops, the buffer returns to this pool.
    pub fn share(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < MIN_POOLED {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: Arc::downgrade(self),
        })
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        self.free.lock().expect("pool lock").len()
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().expect("pool lock");
        if free.len() < self.max_free {
            free.push(buf);
            return;
        }
        // Full: keep the larger buffers, they are the costly ones to fault in again.
        if let Some((i, _)) = free
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.capacity())
            .filter(|(_, b)| b.capacity() < buf.capacity())
        {
            let smaller = std::mem::replace(&mut free[i], buf);
            drop(free);
            drop(smaller);
        }
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Weak<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_handed_out_again_without_a_new_allocation() {
        let pool = BufferPool::new(2);
        let mut buf = pool.take(MIN_POOLED);
        buf[0] = 7;
        let ptr = buf.as_ptr();
        let shared = pool.share(buf);
        let slice = shared.slice(10..20);
        drop(shared);
        assert_eq!(pool.idle(), 0, "a slice still shares the buffer");
        drop(slice);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(MIN_POOLED - 64);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), MIN_POOLED - 64);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn keeps_at_most_its_limit_and_prefers_large_buffers() {
        let pool = BufferPool::new(1);
        let small = pool.share(pool.take(MIN_POOLED));
        let large = pool.share(pool.take(2 * MIN_POOLED));
        drop(small);
        drop(large);
        assert_eq!(pool.idle(), 1);
        assert!(pool.take(2 * MIN_POOLED).capacity() >= 2 * MIN_POOLED);
        let tiny = pool.share(vec![1; 10]);
        drop(tiny);
        assert_eq!(pool.idle(), 0, "small buffers are not pooled");
    }
}
