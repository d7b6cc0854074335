//! The agents' framed connection over any async byte stream (TCP to peers, the Unix socket to
//! the trainer): vectored sends, bodies hashed while they arrive, memfd descriptors received.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::body::{DIGEST_LEN, bound_payload, put_shard_lead};
use super::message::{Kind, Message, ShardHeader};
use super::{
    HEADER_LEN, LinkKeys, MAC_LEN, ProtocolError, constant_time_eq, ended_in_header, mac,
    make_header, parse_header, truncated_in,
};
use crate::pool::{BufferPool, MIN_POOLED};
use crate::{Error, Result};

/// Bytes read from the socket per step while hashing: large enough for few syscalls and full
/// SIMD batches, small enough that what was just read is still in cache when hashed.
const READ_CHUNK: usize = 1 << 20;

/// A framed connection; keyed (every frame MACed) once `authenticate` was called.
pub struct Conn<S> {
    stream: S,
    keys: Option<LinkKeys>,
    send_seq: u64,
    recv_seq: u64,
    max_body: usize,
    pool: Option<Arc<BufferPool>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, max_body: usize) -> Conn<S> {
        Conn {
            stream,
            keys: None,
            send_seq: 0,
            recv_seq: 0,
            max_body,
            pool: None,
        }
    }

    /// Receives large bodies into recycled buffers of `pool`.
    pub fn with_pool(mut self, pool: Arc<BufferPool>) -> Conn<S> {
        self.pool = Some(pool);
        self
    }

    /// The underlying stream, for writing raw bytes (tests of malformed input).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// From now on every frame both ways carries a MAC under these keys.
    pub fn authenticate(&mut self, keys: LinkKeys) {
        self.keys = Some(keys);
    }

    pub async fn send(&mut self, msg: &Message) -> Result<()> {
        let body = msg.body();
        let kind = msg.kind();
        let header = make_header(kind, self.keys.is_some(), body.len());
        let payload = body.payload.unwrap_or_default();
        let tag = self.keys.as_ref().map(|keys| {
            let covered: &[&[u8]] = if bound_payload(kind).is_some() {
                &[&body.lead, &body.trailer]
            } else {
                &[&body.lead, &payload]
            };
            mac(&keys.send, self.send_seq, &header, covered)
        });
        let tag = tag.as_ref().map_or(&[][..], |t| &t[..]);
        let pieces: [&[u8]; 5] = [&header, &body.lead, &payload, &body.trailer, tag];
        write_all_vectored(&mut self.stream, &pieces).await?;
        self.send_seq += 1;
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a `StoreShard` of `data` whose digest is not known yet: each piece is hashed just
    /// before it is written, and the digest follows the payload (see `bound_payload`), so the
    /// shard starts leaving at once instead of after a pass over it. `header.checksum` is
    /// ignored; the digest sent is returned. The frame is the one [`Conn::send`] writes for the
    /// same shard with its digest filled in.
    pub async fn send_shard(&mut self, header: &ShardHeader, data: &[u8]) -> Result<[u8; 32]> {
        /// Bytes hashed then written at a time: the kernel copies them out of cache.
        const PIECE: usize = 256 << 10;
        let mut lead = Vec::new();
        put_shard_lead(&mut lead, header);
        let frame_header = make_header(
            Kind::StoreShard,
            self.keys.is_some(),
            lead.len() + data.len() + DIGEST_LEN,
        );
        write_all_vectored(&mut self.stream, &[&frame_header, &lead]).await?;
        let mut hasher = blake3::Hasher::new();
        for piece in data.chunks(PIECE) {
            hasher.update(piece);
            self.stream.write_all(piece).await?;
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let tag = self
            .keys
            .as_ref()
            .map(|keys| mac(&keys.send, self.send_seq, &frame_header, &[&lead, &digest]));
        let tag = tag.as_ref().map_or(&[][..], |t| &t[..]);
        write_all_vectored(&mut self.stream, &[&digest, tag]).await?;
        self.send_seq += 1;
        self.stream.flush().await?;
        Ok(digest)
    }

    /// Receives one frame whose body may be at most `limit` bytes (and at most the link's limit).
    /// The body is hashed while it arrives, chunk by chunk, so it is read from memory once.
    pub async fn recv_limited(&mut self, limit: usize) -> Result<Message> {
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.stream.read(&mut raw[got..]).await? {
                0 => return Err(ended_in_header(got).into()),
                n => got += n,
            }
        }
        let header = parse_header(&raw, self.keys.is_some(), limit.min(self.max_body))?;
        // A bound payload lies between the leading part and the digest after it; the MAC covers
        // the rest of the body, in order.
        let bound = bound_payload(header.kind).map(|lead| {
            let lead = lead.min(header.len);
            (lead, header.len.saturating_sub(DIGEST_LEN).max(lead))
        });
        let mut frame_mac = self.keys.as_ref().map(|keys| {
            let mut h = blake3::Hasher::new_keyed(&keys.recv);
            h.update(&self.recv_seq.to_le_bytes());
            h.update(&raw);
            h
        });
        let mut payload_hash = bound.map(|_| blake3::Hasher::new());
        let (payload_start, payload_end) = bound.unwrap_or((header.len, header.len));
        // A recycled buffer's pages are already mapped; a fresh one (calloc) is zero-mapped
        // lazily, so neither costs a pass before the kernel copies into it.
        let mut body = match &self.pool {
            Some(pool) if header.len >= MIN_POOLED => pool.take(header.len),
            _ => vec![0u8; header.len],
        };
        let mut got = 0;
        while got < header.len {
            let before = got;
            let want = (header.len - before).min(READ_CHUNK);
            let n = self.stream.read(&mut body[before..before + want]).await?;
            if n == 0 {
                return Err(ProtocolError::Truncated { field: "body" }.into());
            }
            got += n;
            let fresh = &body[before..got];
            let start = payload_start.clamp(before, got) - before;
            let end = payload_end.clamp(before, got) - before;
            if let Some(h) = frame_mac.as_mut() {
                h.update(&fresh[..start]);
                h.update(&fresh[end..]);
            }
            if let Some(h) = payload_hash.as_mut() {
                h.update(&fresh[start..end]);
            }
        }
        if let Some(h) = frame_mac {
            let mut tag = [0u8; MAC_LEN];
            self.stream
                .read_exact(&mut tag)
                .await
                .map_err(truncated_in("MAC"))?;
            if !constant_time_eq(&tag, h.finalize().as_bytes()) {
                return Err(ProtocolError::BadMac.into());
            }
        }
        self.recv_seq += 1;
        let body = match &self.pool {
            Some(pool) => pool.share(body),
            None => Bytes::from(body),
        };
        let msg = Message::decode(header.kind, body)?;
        if let (Some(h), Message::StoreShard { header, .. } | Message::Shard { header, .. }) =
            (payload_hash, &msg)
            && h.finalize().as_bytes() != &header.checksum
        {
            return Err(Error::Checksum {
                part: format!(
                    "shard {} of rank {} generation {} as received",
                    header.index, header.owner, header.generation
                ),
            });
        }
        Ok(msg)
    }

    pub async fn recv(&mut self) -> Result<Message> {
        self.recv_limited(self.max_body).await
    }

    /// Sends a request and reads the reply; an `Error` reply becomes [`Error::Remote`] from
    /// `peer`.
    pub async fn call(&mut self, msg: &Message) -> Result<Message> {
        self.send(msg).await?;
        self.recv_reply().await
    }

    /// Reads the reply to a request just sent; an `Error` reply becomes [`Error::Remote`].
    pub async fn recv_reply(&mut self) -> Result<Message> {
        match self.recv().await? {
            Message::Error { fault, message } => Err(Error::Remote {
                from: "the peer".into(),
                fault,
                message,
            }),
            reply => Ok(reply),
        }
    }
}

impl Conn<tokio::net::UnixStream> {
    /// Receives one frame from the trainer together with the descriptor passed with it, if
    /// any. The header is read with `recvmsg` because a descriptor rides on its first bytes
    /// and a plain read would drop it.
    pub async fn recv_local(&mut self) -> Result<(Message, Option<OwnedFd>)> {
        debug_assert!(self.keys.is_none(), "the local socket is not keyed");
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        let mut fd = None;
        while got < HEADER_LEN {
            let (n, passed) = self
                .stream
                .async_io(tokio::io::Interest::READABLE, || {
                    recv_with_fd(&self.stream, &mut raw[got..])
                })
                .await?;
            if n == 0 {
                return Err(ended_in_header(got).into());
            }
            got += n;
            fd = fd.or(passed);
        }
        let header = parse_header(&raw, false, self.max_body)?;
        let mut body = vec![0u8; header.len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(truncated_in("body"))?;
        self.recv_seq += 1;
        Ok((Message::decode(header.kind, Bytes::from(body))?, fd))
    }
}

fn recv_with_fd(stream: &impl AsFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        stream,
        &mut [std::io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // Extra descriptors are closed as they drop; only the first is the handoff.
            for passed in fds {
                fd = fd.or(Some(passed));
            }
        }
    }
    Ok((got.bytes, fd))
}

/// Writes every piece with as few syscalls as the socket allows, without joining them.
async fn write_all_vectored<S: AsyncWrite + Unpin>(stream: &mut S, pieces: &[&[u8]]) -> Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> = pieces
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| std::io::IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = stream.write_vectored(rest).await?;
        if n == 0 {
            return Err(Error::Io(std::io::ErrorKind::WriteZero.into()));
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::{AgentStatus, Kind, ShardHeader};

    fn shard_header() -> ShardHeader {
        ShardHeader {
            owner: 3,
            generation: 9,
            index: 1,
            data_shards: 2,
            parity_shards: 1,
            original_len: 1000,
            checksum: crate::codec::shard_checksum(b"abcdef"),
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                job: "job-a".into(),
                rank: 2,
                nonce: [7; 32],
            },
            Message::StoreShard {
                header: shard_header(),
                data: Bytes::from_static(b"abcdef"),
            },
            Message::Commit {
                owner: 1,
                generation: 5,
            },
            Message::Status(AgentStatus {
                rank: 1,
                own: vec![(4, true)],
                held: vec![(0, 4, 1, true)],
                durable: vec![2],
                settled: true,
            }),
            Message::Committed {
                newest: Some(3),
                pending: Some(4),
            },
            Message::Committed {
                newest: None,
                pending: None,
            },
        ]
    }

    fn keys() -> LinkKeys {
        LinkKeys {
            send: [1; 32],
            recv: [1; 32],
        }
    }

    #[tokio::test]
    async fn keyed_frames_round_trip_and_reject_flips() {
        for msg in samples() {
            let (a, b) = tokio::io::duplex(1 << 16);
            let mut tx = Conn::new(a, 1 << 20);
            let mut rx = Conn::new(b, 1 << 20);
            tx.authenticate(keys());
            rx.authenticate(keys());
            tx.send(&msg).await.unwrap();
            assert_eq!(rx.recv().await.unwrap(), msg);
        }
        // A flipped bit anywhere in a keyed frame is refused.
        let msg = &samples()[1];
        let body = msg.body();
        let (small, trailer) = (&body.lead, &body.trailer);
        let payload = body.payload.clone().unwrap();
        let header = make_header(msg.kind(), true, body.len());
        // A shard's MAC covers its header and the digest after the payload, which binds it.
        let tag = mac(&keys().send, 0, &header, &[small, trailer]);
        let frame = [&header[..], small, &payload, trailer, &tag].concat();
        let payload_at = HEADER_LEN + small.len()..HEADER_LEN + small.len() + 6;
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let (mut a, b) = tokio::io::duplex(1 << 16);
            let mut rx = Conn::new(b, 1 << 20);
            rx.authenticate(keys());
            a.write_all(&bad).await.unwrap();
            drop(a);
            let err = rx
                .recv()
                .await
                .expect_err(&format!("flip at byte {i} accepted"));
            if payload_at.contains(&i) {
                assert!(matches!(err, Error::Checksum { .. }), "byte {i}: {err}");
            } else if i >= frame.len() - MAC_LEN {
                assert!(
                    matches!(err, Error::Protocol(ProtocolError::BadMac)),
                    "byte {i}: {err}"
                );
            }
        }
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx = Conn::new(b, 1 << 20);
        rx.authenticate(keys());
        a.write_all(&frame).await.unwrap();
        assert_eq!(
            &rx.recv().await.unwrap(),
            msg,
            "the hand-built frame is valid"
        );
    }

    #[tokio::test]
    async fn a_shard_hashed_while_sent_is_the_frame_of_the_shard_with_its_digest() {
        let data = Bytes::from(
            (0..700_000u32)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<_>>(),
        );
        let header = ShardHeader {
            checksum: [0; 32],
            ..shard_header()
        };
        let whole = Message::StoreShard {
            header: ShardHeader {
                checksum: crate::codec::shard_checksum(&data),
                ..header
            },
            data: data.clone(),
        };
        let frame = |streamed: bool| {
            let (whole, data) = (whole.clone(), data.clone());
            async move {
                let (a, mut b) = tokio::io::duplex(1 << 16);
                let reader = tokio::spawn(async move {
                    let mut frame = Vec::new();
                    b.read_to_end(&mut frame).await.unwrap();
                    frame
                });
                let mut tx = Conn::new(a, 1 << 20);
                tx.authenticate(keys());
                if streamed {
                    let digest = tx.send_shard(&header, &data).await.unwrap();
                    assert_eq!(digest, crate::codec::shard_checksum(&data));
                } else {
                    tx.send(&whole).await.unwrap();
                }
                drop(tx);
                reader.await.unwrap()
            }
        };
        let streamed = frame(true).await;
        assert_eq!(streamed, frame(false).await);
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx = Conn::new(b, 1 << 20);
        rx.authenticate(keys());
        tokio::spawn(async move { a.write_all(&streamed).await.unwrap() });
        assert_eq!(rx.recv().await.unwrap(), whole);
    }

    /// Feeds `bytes` and then the end of the stream to a keyed receiver.
    async fn recv_from(bytes: &[u8]) -> Result<Message> {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx = Conn::new(b, 1 << 20);
        rx.authenticate(keys());
        a.write_all(bytes).await.unwrap();
        drop(a);
        rx.recv().await
    }

    #[tokio::test]
    async fn a_close_between_frames_is_not_a_truncation() {
        let err = recv_from(&[]).await.unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ProtocolError::Closed)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_frame_cut_short_names_where_it_ended() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut tx = Conn::new(a, 1 << 20);
        tx.authenticate(keys());
        tx.send(&samples()[2]).await.unwrap();
        drop(tx);
        let mut frame = Vec::new();
        b.read_to_end(&mut frame).await.unwrap();
        let body_end = frame.len() - MAC_LEN;
        for (cut, field) in [
            (1, "header"),
            (HEADER_LEN - 1, "header"),
            (HEADER_LEN, "body"),
            (body_end - 1, "body"),
            (body_end, "MAC"),
            (frame.len() - 1, "MAC"),
        ] {
            let err = recv_from(&frame[..cut]).await.unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ProtocolError::Truncated { field: f }) if f == field),
                "cut at {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_kind_is_refused_before_its_body_is_read() {
        let mut frame = make_header(Kind::Ack, true, 1 << 30).to_vec();
        frame[5] = 99;
        let err = recv_from(&frame).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::UnknownKind { kind: 99 })
            ),
            "{err}"
        );
    }
}
