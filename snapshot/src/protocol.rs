//! Versioned frames between agents and between a trainer and its agent: a 16-byte header
//! (magic, version, kind, flags, body length), the body, and on peer links a keyed BLAKE3 MAC.
//!
//! Every read checks magic, version, kind, length limits and (when keyed) the MAC over a per-
//! direction sequence number, so truncated, garbage, replayed or flipped frames are errors.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::agreement::Agreement;
use crate::pool::{BufferPool, MIN_POOLED};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"PSNF";
/// Bumped on any change of the header or of a body layout.
pub const VERSION: u8 = 2;
const HEADER_LEN: usize = 16;
const MAC_LEN: usize = 32;
const FLAG_MAC: u16 = 1;
/// Limit for frames before authentication: a stranger cannot make the agent allocate.
pub const HANDSHAKE_MAX_BODY: usize = 4096;

/// Identifies one shard of one generation of one rank, and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub owner: u32,
    pub generation: u64,
    pub index: u32,
    pub data_shards: u16,
    pub parity_shards: u16,
    pub original_len: u64,
    /// BLAKE3 of the shard's bytes: checked at rest, and on the wire it binds the payload to
    /// the frame MAC, which then covers only the header.
    pub checksum: [u8; 32],
}

const SHARD_HEADER_LEN: usize = 4 + 8 + 4 + 2 + 2 + 8 + 32;

/// Frames whose payload is bound by the BLAKE3 digest in their leading part: the MAC covers the
/// frame header and that leading part, and the receiver hashes the payload against the digest
/// as it arrives. A shard is thus hashed once when encoded and once per receipt, never again
/// for a MAC. Returns the length of the leading part.
fn bound_payload(kind: u8) -> Option<usize> {
    matches!(kind, 4 | 8).then_some(SHARD_HEADER_LEN)
}

/// Bytes read from the socket per step while hashing: large enough for few syscalls and full
/// SIMD batches, small enough that what was just read is still in cache when hashed.
const READ_CHUNK: usize = 1 << 20;

/// What one agent holds, as reported to a peer that computes the agreement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub rank: u32,
    /// Generations of this rank's own state held as a full copy, with their commit state.
    pub own: Vec<(u64, bool)>,
    /// Shards of other ranks: (owner, generation, index, known committed).
    pub held: Vec<(u32, u64, u32, bool)>,
    /// Generations of this rank in the durable store.
    pub durable: Vec<u64>,
    /// No handoff is waiting and no generation is being encoded or sent.
    pub settled: bool,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Hello {
        job: String,
        rank: u32,
        nonce: [u8; 32],
    },
    Challenge {
        nonce: [u8; 32],
        proof: [u8; 32],
    },
    Proof {
        proof: [u8; 32],
    },
    StoreShard {
        header: ShardHeader,
        data: Bytes,
    },
    Ack,
    /// The owner saw every shard of `generation` acknowledged; newer ones it sent are void.
    Commit {
        owner: u32,
        generation: u64,
    },
    /// The owner resumes from `generation`; its newer generations are void.
    Rollback {
        owner: u32,
        generation: u64,
    },
    FetchShard {
        owner: u32,
        generation: u64,
        index: u32,
    },
    Shard {
        header: ShardHeader,
        data: Bytes,
    },
    NotFound,
    StatusQuery,
    Status(AgentStatus),
    Error {
        message: String,
    },
    Put {
        snapshot: Bytes,
    },
    /// A snapshot of `len` bytes in a sealed memfd passed alongside the frame (see `handoff`).
    PutFd {
        len: u64,
    },
    PutAck {
        generation: u64,
        /// The agent's durable interval (0: no durable store), so the trainer's mailbox knows
        /// which handoffs every rank must deliver (see `client`).
        durable_every: u64,
    },
    Agree {
        timeout_ms: u64,
    },
    Agreement(Option<Agreement>),
    Restore {
        generation: u64,
        from_tier: u8,
    },
    Restored {
        tier: u8,
        snapshot: Bytes,
    },
    WaitCommitted {
        generation: u64,
        timeout_ms: u64,
    },
    Committed {
        newest: Option<u64>,
    },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Challenge { .. } => 2,
            Message::Proof { .. } => 3,
            Message::StoreShard { .. } => 4,
            Message::Ack => 5,
            Message::Commit { .. } => 6,
            Message::FetchShard { .. } => 7,
            Message::Shard { .. } => 8,
            Message::NotFound => 9,
            Message::StatusQuery => 10,
            Message::Status(_) => 11,
            Message::Error { .. } => 12,
            Message::Rollback { .. } => 13,
            Message::Put { .. } => 20,
            Message::PutAck { .. } => 21,
            Message::Agree { .. } => 22,
            Message::Agreement(_) => 23,
            Message::Restore { .. } => 24,
            Message::Restored { .. } => 25,
            Message::WaitCommitted { .. } => 26,
            Message::Committed { .. } => 27,
            Message::PutFd { .. } => 28,
        }
    }

    /// The small leading part of the body and the large payload that follows it unchanged.
    fn body(&self) -> (Vec<u8>, Option<Bytes>) {
        let mut w = Vec::new();
        let payload = match self {
            Message::Hello { job, rank, nonce } => {
                put_str(&mut w, job);
                w.extend_from_slice(&rank.to_le_bytes());
                w.extend_from_slice(nonce);
                None
            }
            Message::Challenge { nonce, proof } => {
                w.extend_from_slice(nonce);
                w.extend_from_slice(proof);
                None
            }
            Message::Proof { proof } => {
                w.extend_from_slice(proof);
                None
            }
            Message::StoreShard { header, data } | Message::Shard { header, data } => {
                put_shard_header(&mut w, header);
                Some(data.clone())
            }
            Message::Ack | Message::NotFound | Message::StatusQuery => None,
            Message::Commit { owner, generation } | Message::Rollback { owner, generation } => {
                w.extend_from_slice(&owner.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                None
            }
            Message::FetchShard {
                owner,
                generation,
                index,
            } => {
                w.extend_from_slice(&owner.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&index.to_le_bytes());
                None
            }
            Message::Status(status) => {
                w = serde_json::to_vec(status).expect("status serialises");
                None
            }
            Message::Agreement(agreement) => {
                w = serde_json::to_vec(agreement).expect("agreement serialises");
                None
            }
            Message::Error { message } => {
                w.extend_from_slice(message.as_bytes());
                None
            }
            Message::Put { snapshot } => Some(snapshot.clone()),
            Message::PutAck {
                generation,
                durable_every,
            } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&durable_every.to_le_bytes());
                None
            }
            Message::PutFd { len } => {
                w.extend_from_slice(&len.to_le_bytes());
                None
            }
            Message::Agree { timeout_ms } => {
                w.extend_from_slice(&timeout_ms.to_le_bytes());
                None
            }
            Message::Restore {
                generation,
                from_tier,
            } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.push(*from_tier);
                None
            }
            Message::Restored { tier, snapshot } => {
                w.push(*tier);
                Some(snapshot.clone())
            }
            Message::WaitCommitted {
                generation,
                timeout_ms,
            } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&timeout_ms.to_le_bytes());
                None
            }
            Message::Committed { newest } => {
                w.push(newest.is_some() as u8);
                w.extend_from_slice(&newest.unwrap_or(0).to_le_bytes());
                None
            }
        };
        (w, payload)
    }

    fn decode(kind: u8, body: Bytes) -> Result<Message> {
        let mut r = BodyReader { body, pos: 0 };
        let msg = match kind {
            1 => Message::Hello {
                job: r.string("job")?,
                rank: r.u32("rank")?,
                nonce: r.array("nonce")?,
            },
            2 => Message::Challenge {
                nonce: r.array("nonce")?,
                proof: r.array("proof")?,
            },
            3 => Message::Proof {
                proof: r.array("proof")?,
            },
            4 => Message::StoreShard {
                header: r.shard_header()?,
                data: r.rest(),
            },
            5 => Message::Ack,
            6 => Message::Commit {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
            },
            7 => Message::FetchShard {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
                index: r.u32("index")?,
            },
            8 => Message::Shard {
                header: r.shard_header()?,
                data: r.rest(),
            },
            13 => Message::Rollback {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
            },
            9 => Message::NotFound,
            10 => Message::StatusQuery,
            11 => Message::Status(r.json("status")?),
            12 => Message::Error {
                message: String::from_utf8_lossy(&r.rest()).into_owned(),
            },
            20 => Message::Put { snapshot: r.rest() },
            28 => Message::PutFd { len: r.u64("len")? },
            21 => Message::PutAck {
                generation: r.u64("generation")?,
                durable_every: r.u64("durable_every")?,
            },
            22 => Message::Agree {
                timeout_ms: r.u64("timeout_ms")?,
            },
            23 => Message::Agreement(r.json("agreement")?),
            24 => Message::Restore {
                generation: r.u64("generation")?,
                from_tier: r.u8("from_tier")?,
            },
            25 => Message::Restored {
                tier: r.u8("tier")?,
                snapshot: r.rest(),
            },
            26 => Message::WaitCommitted {
                generation: r.u64("generation")?,
                timeout_ms: r.u64("timeout_ms")?,
            },
            27 => {
                let some = r.u8("newest flag")? != 0;
                let newest = r.u64("newest")?;
                Message::Committed {
                    newest: some.then_some(newest),
                }
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unknown frame kind {other}; peer speaks another protocol version?"
                )));
            }
        };
        r.finish(kind)?;
        Ok(msg)
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    w.extend_from_slice(&(len as u16).to_le_bytes());
    w.extend_from_slice(&s.as_bytes()[..len]);
}

fn put_shard_header(w: &mut Vec<u8>, h: &ShardHeader) {
    w.extend_from_slice(&h.owner.to_le_bytes());
    w.extend_from_slice(&h.generation.to_le_bytes());
    w.extend_from_slice(&h.index.to_le_bytes());
    w.extend_from_slice(&h.data_shards.to_le_bytes());
    w.extend_from_slice(&h.parity_shards.to_le_bytes());
    w.extend_from_slice(&h.original_len.to_le_bytes());
    w.extend_from_slice(&h.checksum);
}

/// Reads fields off a body; running short names the field that was cut.
struct BodyReader {
    body: Bytes,
    pos: usize,
}

impl BodyReader {
    fn take(&mut self, n: usize, field: &str) -> Result<&[u8]> {
        if self.body.len() - self.pos < n {
            return Err(Error::Protocol(format!(
                "truncated body: field {field} needs {n} bytes, {} left",
                self.body.len() - self.pos
            )));
        }
        self.pos += n;
        Ok(&self.body[self.pos - n..self.pos])
    }
    fn u8(&mut self, f: &str) -> Result<u8> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, f)?.try_into().expect("2")))
    }
    fn u32(&mut self, f: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().expect("4")))
    }
    fn u64(&mut self, f: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().expect("8")))
    }
    fn array(&mut self, f: &str) -> Result<[u8; 32]> {
        Ok(self.take(32, f)?.try_into().expect("32"))
    }
    fn string(&mut self, f: &str) -> Result<String> {
        let len = self.u16(f)? as usize;
        let raw = self.take(len, f)?.to_vec();
        String::from_utf8(raw).map_err(|_| Error::Protocol(format!("field {f} is not UTF-8")))
    }
    fn shard_header(&mut self) -> Result<ShardHeader> {
        if self.body.len() - self.pos < SHARD_HEADER_LEN {
            return Err(Error::Protocol("truncated shard header".into()));
        }
        Ok(ShardHeader {
            owner: self.u32("owner")?,
            generation: self.u64("generation")?,
            index: self.u32("index")?,
            data_shards: self.u16("data_shards")?,
            parity_shards: self.u16("parity_shards")?,
            original_len: self.u64("original_len")?,
            checksum: self.array("checksum")?,
        })
    }
    fn rest(&mut self) -> Bytes {
        let rest = self.body.slice(self.pos..);
        self.pos = self.body.len();
        rest
    }
    fn json<T: for<'de> Deserialize<'de>>(&mut self, f: &str) -> Result<T> {
        let rest = self.rest();
        serde_json::from_slice(&rest).map_err(|e| Error::Protocol(format!("field {f}: {e}")))
    }
    fn finish(&self, kind: u8) -> Result<()> {
        if self.pos != self.body.len() {
            return Err(Error::Protocol(format!(
                "frame kind {kind} has {} unexpected trailing bytes",
                self.body.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Per-direction MAC keys of an authenticated link (see `auth`).
#[derive(Clone, Debug)]
pub struct LinkKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

struct Header {
    kind: u8,
    flags: u16,
    len: usize,
}

fn make_header(kind: u8, keyed: bool, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = kind;
    let flags = if keyed { FLAG_MAC } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER_LEN], keyed: bool, max_body: usize) -> Result<Header> {
    if &h[..4] != MAGIC {
        return Err(Error::Protocol(
            "bad magic: not a petl snapshot frame".into(),
        ));
    }
    if h[4] != VERSION {
        return Err(Error::Protocol(format!(
            "frame version {}, this agent speaks {VERSION}; run the same petl version on every rank",
            h[4]
        )));
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if (flags & FLAG_MAC != 0) != keyed || flags & !FLAG_MAC != 0 {
        return Err(Error::Protocol(format!(
            "frame flags {flags:#x} do not match the link (authenticated: {keyed})"
        )));
    }
    let len = u64::from_le_bytes(h[8..].try_into().expect("8"));
    if len > max_body as u64 {
        return Err(Error::Protocol(format!(
            "frame body of {len} bytes exceeds the limit of {max_body}"
        )));
    }
    Ok(Header {
        kind: h[5],
        flags,
        len: len as usize,
    })
}

fn mac(key: &[u8; 32], seq: u64, header: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&seq.to_le_bytes());
    h.update(header);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn truncated(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::Protocol("truncated frame: the connection closed mid-frame".into())
    } else {
        Error::Io(e)
    }
}

/// A framed connection over any async byte stream (TCP to peers, Unix socket to the trainer).
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
        let (small, payload) = msg.body();
        let payload = payload.unwrap_or_default();
        let kind = msg.kind();
        let header = make_header(kind, self.keys.is_some(), small.len() + payload.len());
        let tag = self.keys.as_ref().map(|keys| {
            let covered: &[&[u8]] = if bound_payload(kind).is_some() {
                &[&small]
            } else {
                &[&small, &payload]
            };
            mac(&keys.send, self.send_seq, &header, covered)
        });
        let tag = tag.as_ref().map_or(&[][..], |t| &t[..]);
        write_all_vectored(&mut self.stream, &[&header, &small, &payload, tag]).await?;
        self.send_seq += 1;
        self.stream.flush().await?;
        Ok(())
    }

    /// Receives one frame whose body may be at most `limit` bytes (and at most the link's limit).
    /// The body is hashed while it arrives, chunk by chunk, so it is read from memory once.
    pub async fn recv_limited(&mut self, limit: usize) -> Result<Message> {
        let mut raw = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut raw).await.map_err(truncated)?;
        let header = parse_header(&raw, self.keys.is_some(), limit.min(self.max_body))?;
        let bound = bound_payload(header.kind).map(|lead| lead.min(header.len));
        let mut frame_mac = self.keys.as_ref().map(|keys| {
            let mut h = blake3::Hasher::new_keyed(&keys.recv);
            h.update(&self.recv_seq.to_le_bytes());
            h.update(&raw);
            h
        });
        let mut payload_hash = bound.map(|_| blake3::Hasher::new());
        let covered_by_mac = bound.unwrap_or(header.len);
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
                return Err(truncated(std::io::ErrorKind::UnexpectedEof.into()));
            }
            got += n;
            let fresh = &body[before..got];
            let split = covered_by_mac.clamp(before, before + n) - before;
            if let Some(h) = frame_mac.as_mut() {
                h.update(&fresh[..split]);
            }
            if let Some(h) = payload_hash.as_mut() {
                h.update(&fresh[split..]);
            }
        }
        if let Some(h) = frame_mac {
            let mut tag = [0u8; MAC_LEN];
            self.stream.read_exact(&mut tag).await.map_err(truncated)?;
            if !constant_time_eq(&tag, h.finalize().as_bytes()) {
                return Err(Error::Auth(
                    "frame MAC mismatch: altered, replayed or from another job".into(),
                ));
            }
        }
        debug_assert!(header.flags & !FLAG_MAC == 0);
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

    /// Sends a request and reads the reply; an `Error` reply becomes `Error::Agent`.
    pub async fn call(&mut self, msg: &Message) -> Result<Message> {
        self.send(msg).await?;
        match self.recv().await? {
            Message::Error { message } => Err(Error::Agent(message)),
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
                return Err(truncated(std::io::ErrorKind::UnexpectedEof.into()));
            }
            got += n;
            fd = fd.or(passed);
        }
        let header = parse_header(&raw, false, self.max_body)?;
        let mut body = vec![0u8; header.len];
        self.stream.read_exact(&mut body).await.map_err(truncated)?;
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

/// Sends a `PutFd` frame with the memfd holding the snapshot (the trainer's side).
pub fn send_put_fd_blocking(
    stream: &std::os::unix::net::UnixStream,
    len: u64,
    fd: BorrowedFd<'_>,
) -> Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let msg = Message::PutFd { len };
    let (small, _) = msg.body();
    let mut frame = make_header(msg.kind(), false, small.len()).to_vec();
    frame.extend_from_slice(&small);
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    let sent = rustix::net::sendmsg(
        stream,
        &[std::io::IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(std::io::Error::from)?;
    // The descriptor rode on the first byte; a short send finishes as plain bytes.
    let mut plain = stream;
    plain.write_all(&frame[sent..])?;
    Ok(())
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

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes one unauthenticated frame on a blocking stream (the trainer's side of the local socket).
pub fn send_blocking(w: &mut impl Write, msg: &Message) -> Result<()> {
    let (small, payload) = msg.body();
    let payload = payload.unwrap_or_default();
    w.write_all(&make_header(msg.kind(), false, small.len() + payload.len()))?;
    w.write_all(&small)?;
    w.write_all(&payload)?;
    w.flush()?;
    Ok(())
}

/// Writes a `Put` frame whose snapshot is given in pieces (see `Snapshot::encode_parts`),
/// without joining them into one buffer first.
pub fn send_put_blocking(w: &mut impl Write, pieces: &[&[u8]]) -> Result<()> {
    let len = pieces.iter().map(|p| p.len()).sum();
    let kind = Message::Put {
        snapshot: Bytes::new(),
    }
    .kind();
    w.write_all(&make_header(kind, false, len))?;
    for piece in pieces {
        w.write_all(piece)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads one unauthenticated frame from a blocking stream.
pub fn recv_blocking(r: &mut impl Read, max_body: usize) -> Result<Message> {
    let mut raw = [0u8; HEADER_LEN];
    r.read_exact(&mut raw).map_err(truncated)?;
    let header = parse_header(&raw, false, max_body)?;
    let mut body = vec![0u8; header.len];
    r.read_exact(&mut body).map_err(truncated)?;
    Message::decode(header.kind, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Message::Restore {
                generation: 4,
                from_tier: 2,
            },
            Message::Committed { newest: Some(3) },
            Message::Committed { newest: None },
        ]
    }

    #[tokio::test]
    async fn keyed_frames_round_trip_and_reject_flips() {
        let keys = LinkKeys {
            send: [1; 32],
            recv: [1; 32],
        };
        for msg in samples() {
            let (a, b) = tokio::io::duplex(1 << 16);
            let mut tx = Conn::new(a, 1 << 20);
            let mut rx = Conn::new(b, 1 << 20);
            tx.authenticate(keys.clone());
            rx.authenticate(keys.clone());
            tx.send(&msg).await.unwrap();
            assert_eq!(rx.recv().await.unwrap(), msg);
        }
        // A flipped bit anywhere in a keyed frame is refused.
        let msg = &samples()[1];
        let (small, payload) = msg.body();
        let header = make_header(
            msg.kind(),
            true,
            small.len() + payload.as_ref().unwrap().len(),
        );
        // A shard's MAC covers its header, whose digest binds the payload.
        let tag = mac(&keys.send, 0, &header, &[&small]);
        let frame = [&header[..], &small, payload.as_ref().unwrap(), &tag].concat();
        let payload_at = HEADER_LEN + small.len()..HEADER_LEN + small.len() + 6;
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let (mut a, b) = tokio::io::duplex(1 << 16);
            let mut rx = Conn::new(b, 1 << 20);
            rx.authenticate(keys.clone());
            a.write_all(&bad).await.unwrap();
            drop(a);
            let err = rx
                .recv()
                .await
                .expect_err(&format!("flip at byte {i} accepted"));
            if payload_at.contains(&i) {
                assert!(matches!(err, Error::Checksum { .. }), "byte {i}: {err}");
            }
        }
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx = Conn::new(b, 1 << 20);
        rx.authenticate(keys.clone());
        a.write_all(&frame).await.unwrap();
        assert_eq!(
            &rx.recv().await.unwrap(),
            msg,
            "the hand-built frame is valid"
        );
    }

    #[tokio::test]
    async fn truncated_and_oversized_frames_are_errors() {
        let msg = &samples()[1];
        let mut frame = Vec::new();
        send_blocking(&mut frame, msg).unwrap();
        for cut in [0, 3, 15, 16, frame.len() - 1] {
            let err = recv_blocking(&mut &frame[..cut], 1 << 20).unwrap_err();
            assert!(matches!(err, Error::Protocol(_)), "{err}");
        }
        let err = recv_blocking(&mut &frame[..], 10).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        let mut wrong_version = frame.clone();
        wrong_version[4] = 99;
        let err = recv_blocking(&mut &wrong_version[..], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("version 99"), "{err}");
    }

    #[test]
    fn a_put_sent_in_pieces_reads_as_one_snapshot() {
        let mut frame = Vec::new();
        send_put_blocking(&mut frame, &[b"ab", b"", b"cde"]).unwrap();
        let msg = recv_blocking(&mut &frame[..], 100).unwrap();
        assert_eq!(
            msg,
            Message::Put {
                snapshot: Bytes::from_static(b"abcde")
            }
        );
    }

    #[test]
    fn a_short_fixed_body_names_the_missing_field() {
        let err = Message::decode(6, Bytes::from_static(&[1, 0, 0, 0, 5])).unwrap_err();
        assert!(err.to_string().contains("generation"), "{err}");
        let err = Message::decode(5, Bytes::from_static(&[1])).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
        let err = Message::decode(200, Bytes::new()).unwrap_err();
        assert!(err.to_string().contains("unknown frame kind"), "{err}");
    }
}
