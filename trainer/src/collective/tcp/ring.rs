//! The ring algorithms over one rank's two links: reduce-scatter and all-gather in N−1 steps,
//! each rank sending (N−1)/N of the data, sending and receiving at once on every step.
//!
//! Chunk c's sum starts at rank c+1 and gains one rank's addend per hop, ending at rank c:
//! ((x[c+1] + x[c+2]) + …) + x[c], an order fixed by the world size alone.

use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::link::{Expect, Kind, Receiver, SEGMENT, Sender};
use crate::collective::{CollectiveError, Result};

/// The most bytes one rank may contribute to `all_gather_bytes` (it is for small messages).
pub const MAX_BYTES_MESSAGE: usize = 64 << 20;
/// Buffers of one chunk a reduce-scatter keeps in flight: one being sent, one being filled,
/// one spare so that receiving never waits on the sender's previous step.
const IN_FLIGHT: usize = 3;

/// This rank's place on the ring: the link to the next rank and the one from the previous.
#[derive(Debug)]
pub(crate) struct Ring {
    pub next: Sender,
    pub prev: Receiver,
    /// Second handles on both sockets, so that either direction can shut both down while the
    /// other is blocked in a read or write.
    handles: [TcpStream; 2],
    pub rank: usize,
    pub size: usize,
}

impl Ring {
    pub(crate) fn new(next: Sender, prev: Receiver, rank: usize, size: usize) -> Result<Ring> {
        let clone = |s: &TcpStream, peer: usize| {
            s.try_clone()
                .map_err(|source| CollectiveError::PeerLost { rank: peer, source })
        };
        let handles = [
            clone(next.stream(), next.peer())?,
            clone(prev.stream(), prev.peer())?,
        ];
        Ok(Ring {
            next,
            prev,
            handles,
            rank,
            size,
        })
    }

    /// Ends both links at once: a blocked read or write on this rank returns, and the
    /// neighbours see the links close, which spreads a failure around the whole ring.
    pub(crate) fn shutdown(&self) {
        for handle in &self.handles {
            let _ = handle.shutdown(Shutdown::Both);
        }
    }

    /// Returns this rank's chunk of `input` (N chunks of `input.len() / N`) summed over ranks.
    /// `spare` holds chunk buffers kept from earlier calls, and receives the unused ones back.
    pub(crate) fn reduce_scatter(
        &mut self,
        input: &[f32],
        spare: &mut Vec<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let (r, size) = (self.rank, self.size);
        let n = input.len() / size;
        let chunk = |c: usize| &input[c * n..(c + 1) * n];
        let (to_send, sending) = mpsc::channel::<Vec<f32>>();
        let (give_back, returned) = mpsc::channel::<Vec<f32>>();
        let result = duplex(
            self,
            move |next| {
                next.send(Kind::ReduceScatter, &[bytes(chunk((r + size - 1) % size))])?;
                for _ in 1..size - 1 {
                    let Ok(partial) = sending.recv() else {
                        return Ok(());
                    };
                    next.send(Kind::ReduceScatter, &[bytes(&partial)])?;
                    let _ = give_back.send(partial);
                }
                Ok(())
            },
            |prev| {
                // Owned here, so that the sender's queue closes when this side stops, even on
                // an error: the sending thread then ends instead of waiting for more partials.
                let to_send = to_send;
                let mut live = 0;
                for step in 0..size - 1 {
                    // The chunk whose partial sum arrives now: it started at rank c + 1 and
                    // this rank adds its own part before passing it on.
                    let c = (r + 2 * size - step - 2) % size;
                    let mut out = match returned.try_recv().ok().or_else(|| spare.pop()) {
                        Some(buffer) => buffer,
                        None if live < IN_FLIGHT => {
                            live += 1;
                            Vec::new()
                        }
                        None => returned.recv().map_err(|_| cancelled())?,
                    };
                    out.resize(n, 0.0);
                    let mut frame = prev.begin(Kind::ReduceScatter, Expect::Exactly(n * 4))?;
                    for (partial, own) in out
                        .chunks_mut(SEGMENT / 4)
                        .zip(chunk(c).chunks(SEGMENT / 4))
                    {
                        frame.read(bytemuck::cast_slice_mut(partial))?;
                        for (p, x) in partial.iter_mut().zip(own) {
                            *p += *x;
                        }
                    }
                    frame.finish()?;
                    if step + 2 < size {
                        to_send.send(out).map_err(|_| cancelled())?;
                    } else {
                        return Ok(out);
                    }
                }
                unreachable!("a ring of {size} ranks ends on its last step")
            },
        );
        spare.extend(returned.try_iter().take(IN_FLIGHT));
        result
    }

    /// Returns every rank's `chunk`, rank r's at `[r·n, (r+1)·n)`.
    pub(crate) fn all_gather(&mut self, chunk: &[f32]) -> Result<Vec<f32>> {
        let (r, size, n) = (self.rank, self.size, chunk.len());
        let mut out = vec![0f32; size * n];
        let mut slots: Vec<Option<&mut [f32]>> = if n == 0 {
            (0..size).map(|_| Some(Default::default())).collect()
        } else {
            out.chunks_mut(n).map(Some).collect()
        };
        let own = slots[r].take().expect("own slot");
        own.copy_from_slice(chunk);
        let (to_send, sending) = mpsc::channel::<&[f32]>();
        to_send.send(own).expect("the receiver is alive");
        duplex(
            self,
            move |next| {
                for _ in 0..size - 1 {
                    let Ok(slot) = sending.recv() else {
                        return Ok(());
                    };
                    next.send(Kind::AllGather, &[bytes(slot)])?;
                }
                Ok(())
            },
            move |prev| {
                for step in 0..size - 1 {
                    let c = (r + size - step - 1) % size;
                    let slot = slots[c].take().expect("each slot arrives once");
                    let mut frame = prev.begin(Kind::AllGather, Expect::Exactly(n * 4))?;
                    frame.read(bytemuck::cast_slice_mut(&mut *slot))?;
                    frame.finish()?;
                    if step + 2 < size {
                        to_send.send(slot).map_err(|_| cancelled())?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Returns every rank's bytes in rank order.
    pub(crate) fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (r, size) = (self.rank, self.size);
        if mine.len() > MAX_BYTES_MESSAGE {
            return Err(CollectiveError::Usage(format!(
                "all_gather_bytes carries small messages (at most {MAX_BYTES_MESSAGE} bytes), got {}; use all_gather for tensors",
                mine.len()
            )));
        }
        let mut got: Vec<Option<Arc<Vec<u8>>>> = vec![None; size];
        let own = Arc::new(mine.to_vec());
        got[r] = Some(own.clone());
        let (to_send, sending) = mpsc::channel::<Arc<Vec<u8>>>();
        to_send.send(own).expect("the receiver is alive");
        duplex(
            self,
            move |next| {
                for step in 0..size - 1 {
                    let Ok(message) = sending.recv() else {
                        return Ok(());
                    };
                    let origin = ((r + size - step) % size) as u32;
                    next.send(Kind::Bytes, &[&origin.to_le_bytes(), &message])?;
                }
                Ok(())
            },
            |prev| {
                // Owned here, so that the sender's queue closes when this side stops.
                let to_send = to_send;
                for step in 0..size - 1 {
                    let origin = (r + size - step - 1) % size;
                    let peer = prev.peer();
                    let mut frame =
                        prev.begin(Kind::Bytes, Expect::AtMost(4 + MAX_BYTES_MESSAGE))?;
                    let len = frame
                        .len()
                        .checked_sub(4)
                        .ok_or(CollectiveError::Protocol {
                            rank: peer,
                            reason: "a bytes frame without its origin".into(),
                        })?;
                    let mut from = [0u8; 4];
                    frame.read(&mut from)?;
                    let mut message = vec![0u8; len];
                    frame.read(&mut message)?;
                    frame.finish()?;
                    if u32::from_le_bytes(from) as usize != origin {
                        return Err(CollectiveError::Protocol {
                            rank: peer,
                            reason: format!(
                                "forwarded the message of rank {}, expected rank {origin}'s",
                                u32::from_le_bytes(from)
                            ),
                        });
                    }
                    let message = Arc::new(message);
                    got[origin] = Some(message.clone());
                    if step + 2 < size {
                        to_send.send(message).map_err(|_| cancelled())?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(got
            .into_iter()
            .map(|m| {
                let m = m.expect("every rank's message arrived");
                Arc::try_unwrap(m).unwrap_or_else(|shared| (*shared).clone())
            })
            .collect())
    }
}

fn bytes(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Stands for "the other direction already failed"; the first error recorded wins, so this
/// one is never returned.
fn cancelled() -> CollectiveError {
    CollectiveError::Usage("cancelled after the other direction failed".into())
}

/// Runs `send` on a helper thread and `receive` on this one, so that a large chunk can neither
/// block on a full socket buffer nor wait for the other direction. The first error of either
/// side is the result; it shuts both links down so the other side stops at once.
fn duplex<T>(
    ring: &mut Ring,
    send: impl FnOnce(&mut Sender) -> Result<()> + Send,
    receive: impl FnOnce(&mut Receiver) -> Result<T>,
) -> Result<T> {
    let Ring {
        next,
        prev,
        handles,
        ..
    } = ring;
    let first: Mutex<Option<CollectiveError>> = Mutex::new(None);
    let fail = |error: CollectiveError| {
        let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(error);
            for handle in handles.iter() {
                let _ = handle.shutdown(Shutdown::Both);
            }
        }
    };
    let received = std::thread::scope(|scope| {
        let sender = std::thread::Builder::new()
            .name("petl-ring-send".into())
            .spawn_scoped(scope, || {
                if let Err(e) = send(next) {
                    fail(e);
                }
            });
        let sender = match sender {
            Ok(handle) => handle,
            Err(e) => {
                fail(CollectiveError::Usage(format!(
                    "cannot start the sending thread: {e}"
                )));
                return None;
            }
        };
        let received = receive(prev).map_err(&fail).ok();
        if sender.join().is_err() {
            fail(CollectiveError::Usage("the sending thread panicked".into()));
        }
        received
    });
    match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(error) => Err(error),
        None => Ok(received.expect("no error was recorded, so the receiver finished")),
    }
}
