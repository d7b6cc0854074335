//! One direction of a link between two ranks: frames of a 16-byte header and a body, followed,
//! once the handshake has keyed the link, by a keyed BLAKE3 MAC over a per-direction sequence.
//!
//! Header: magic `PCOL`, version, kind, flags (bit 0: a MAC follows), body length (u64, LE).
//! The MAC covers sequence number (u64, LE) ‖ header ‖ body, so a frame that was altered,
//! replayed, reordered or sent on another link is refused. Bodies are hashed and written (read
//! and hashed) a segment at a time, so each byte is touched while it is still in cache.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::collective::{CollectiveError, Result};

const MAGIC: [u8; 4] = *b"PCOL";
/// Bumped on any change of the header, the handshake or a body layout.
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER_LEN: usize = 16;
pub(crate) const MAC_LEN: usize = 32;
const FLAG_MAC: u16 = 1;
/// Bytes hashed and then written (read and then hashed) at a time: large enough for few system
/// calls and full SIMD batches in BLAKE3, small enough to stay in L2 between the two passes.
pub(crate) const SEGMENT: usize = 256 << 10;

/// Every frame kind on a collective link.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Hello = 1,
    Challenge = 2,
    Proof = 3,
    Ready = 4,
    Refuse = 5,
    /// The closing round of group formation: incarnations and configuration digests.
    Check = 8,
    /// A rank failed while the group formed; the body names the cause (see [`encode_abort`]).
    Abort = 9,
    ReduceScatter = 16,
    AllGather = 17,
    Bytes = 18,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Challenge,
            Proof,
            Ready,
            Refuse,
            Check,
            Abort,
            ReduceScatter,
            AllGather,
            Bytes,
        ]
        .into_iter()
        .find(|k| *k as u8 == value)
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub kind: Kind,
    pub keyed: bool,
    pub len: usize,
    raw: [u8; HEADER_LEN],
}

/// Why 16 bytes are not a header this build understands.
#[derive(Debug)]
pub(crate) enum BadHeader {
    /// Not a collective frame at all (a port scan, a health probe, another protocol).
    Foreign,
    /// A collective frame of another version or with unknown fields: a mismatched build.
    Incompatible(String),
}

fn make_header(kind: Kind, keyed: bool, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    let flags = if keyed { FLAG_MAC } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

pub(crate) fn parse_header(raw: [u8; HEADER_LEN]) -> Result<Header, BadHeader> {
    if raw[..4] != MAGIC {
        return Err(BadHeader::Foreign);
    }
    if raw[4] != VERSION {
        return Err(BadHeader::Incompatible(format!(
            "frame version {}, this build speaks {VERSION}; run the same petl version on every rank",
            raw[4]
        )));
    }
    let kind = Kind::from_u8(raw[5])
        .ok_or_else(|| BadHeader::Incompatible(format!("unknown frame kind {}", raw[5])))?;
    let flags = u16::from_le_bytes([raw[6], raw[7]]);
    if flags & !FLAG_MAC != 0 {
        return Err(BadHeader::Incompatible(format!(
            "unknown frame flags {flags:#x}"
        )));
    }
    let len = u64::from_le_bytes(raw[8..].try_into().expect("8 bytes"));
    Ok(Header {
        kind,
        keyed: flags & FLAG_MAC != 0,
        len: usize::try_from(len).unwrap_or(usize::MAX),
        raw,
    })
}

/// Writes an unkeyed frame (the handshake, before keys exist).
pub(crate) fn write_plain(stream: &mut TcpStream, kind: Kind, body: &[u8]) -> io::Result<()> {
    let header = make_header(kind, false, body.len());
    write_all_vectored(stream, &mut [IoSlice::new(&header), IoSlice::new(body)])
}

/// Reads one header; `Ok(None)` when the stream ended before any byte of it.
pub(crate) fn read_header(stream: &mut TcpStream) -> io::Result<Option<[u8; HEADER_LEN]>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match stream.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(raw))
}

/// A keyed BLAKE3 hasher primed with the sequence number and the header.
fn frame_mac(key: &[u8; 32], seq: u64, header: &[u8; HEADER_LEN]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&seq.to_le_bytes());
    h.update(header);
    h
}

fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The error for a failed read or write on the link to `peer`.
pub(crate) fn link_error(peer: usize, error: io::Error, timeout: Duration) -> CollectiveError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
            rank: peer,
            waited: timeout,
        },
        _ => CollectiveError::PeerLost {
            rank: peer,
            source: error,
        },
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "it closed the connection (it stopped, or failed and closed its links)",
    )
}

/// The sending direction of a keyed link (this rank to the next on the ring).
#[derive(Debug)]
pub(crate) struct Sender {
    stream: TcpStream,
    peer: usize,
    key: [u8; 32],
    seq: u64,
    timeout: Duration,
}

impl Sender {
    pub(crate) fn new(stream: TcpStream, peer: usize, key: [u8; 32], timeout: Duration) -> Sender {
        Sender {
            stream,
            peer,
            key,
            seq: 0,
            timeout,
        }
    }

    pub(crate) fn peer(&self) -> usize {
        self.peer
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends one frame whose body is `parts` back to back. Each segment is hashed just before
    /// it is written; the header rides with the first write and the MAC with the last.
    pub(crate) fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<()> {
        let len = parts.iter().map(|p| p.len()).sum();
        let header = make_header(kind, true, len);
        let mut mac = frame_mac(&self.key, self.seq, &header);
        let mut header_sent = false;
        let mut pending: Option<&[u8]> = None;
        let (peer, timeout) = (self.peer, self.timeout);
        for segment in parts.iter().flat_map(|p| p.chunks(SEGMENT)) {
            mac.update(segment);
            if let Some(previous) = pending.replace(segment) {
                let lead: &[u8] = if header_sent { &[] } else { &header };
                write_all_vectored(
                    &mut self.stream,
                    &mut [IoSlice::new(lead), IoSlice::new(previous)],
                )
                .map_err(|e| link_error(peer, e, timeout))?;
                header_sent = true;
            }
        }
        let tag = mac.finalize();
        let lead: &[u8] = if header_sent { &[] } else { &header };
        write_all_vectored(
            &mut self.stream,
            &mut [
                IoSlice::new(lead),
                IoSlice::new(pending.unwrap_or_default()),
                IoSlice::new(tag.as_bytes()),
            ],
        )
        .map_err(|e| link_error(peer, e, timeout))?;
        self.seq += 1;
        Ok(())
    }
}

/// What length a frame must have.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expect {
    Exactly(usize),
    AtMost(usize),
}

/// The receiving direction of a keyed link (from the previous rank on the ring).
#[derive(Debug)]
pub(crate) struct Receiver {
    stream: TcpStream,
    peer: usize,
    key: [u8; 32],
    seq: u64,
    timeout: Duration,
}

impl Receiver {
    pub(crate) fn new(
        stream: TcpStream,
        peer: usize,
        key: [u8; 32],
        timeout: Duration,
    ) -> Receiver {
        Receiver {
            stream,
            peer,
            key,
            seq: 0,
            timeout,
        }
    }

    pub(crate) fn peer(&self) -> usize {
        self.peer
    }

    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    fn protocol(&self, reason: String) -> CollectiveError {
        CollectiveError::Protocol {
            rank: self.peer,
            reason,
        }
    }

    /// Reads the next frame's header, which must be of `kind` and length `expect`; an `Abort`
    /// frame instead becomes the error it carries. The body is then read with [`Incoming`].
    pub(crate) fn begin(&mut self, kind: Kind, expect: Expect) -> Result<Incoming<'_>> {
        let (peer, timeout) = (self.peer, self.timeout);
        let raw = match read_header(&mut self.stream) {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(link_error(peer, closed(), timeout)),
            Err(e) => return Err(link_error(peer, e, timeout)),
        };
        let header = parse_header(raw).map_err(|bad| {
            self.protocol(match bad {
                BadHeader::Foreign => "bad magic: the stream lost its framing".into(),
                BadHeader::Incompatible(why) => why,
            })
        })?;
        if !header.keyed {
            return Err(self.protocol(format!(
                "an unauthenticated {:?} frame on an authenticated link",
                header.kind
            )));
        }
        if header.kind == Kind::Abort && kind != Kind::Abort {
            let mut body = vec![0u8; header.len.min(MAX_ABORT)];
            if header.len > MAX_ABORT {
                return Err(self.protocol(format!("an abort frame of {} bytes", header.len)));
            }
            let mut frame = self.incoming(header);
            frame.read(&mut body)?;
            frame.finish()?;
            return Err(decode_abort(&body)
                .unwrap_or_else(|| self.protocol("a malformed abort frame".into())));
        }
        if header.kind != kind {
            return Err(self.protocol(format!(
                "sent a {:?} frame where this rank expected {kind:?}: the ranks called different operations",
                header.kind
            )));
        }
        let fits = match expect {
            Expect::Exactly(n) => header.len == n,
            Expect::AtMost(n) => header.len <= n,
        };
        if !fits {
            return Err(self.protocol(format!(
                "sent a {:?} frame of {} bytes, this rank expected {expect:?}: the ranks passed different sizes",
                header.kind, header.len
            )));
        }
        Ok(self.incoming(header))
    }

    fn incoming(&mut self, header: Header) -> Incoming<'_> {
        let mac = frame_mac(&self.key, self.seq, &header.raw);
        Incoming {
            left: header.len,
            len: header.len,
            mac,
            link: self,
        }
    }
}

/// The body of one frame being received; [`Incoming::finish`] checks its MAC.
pub(crate) struct Incoming<'a> {
    link: &'a mut Receiver,
    mac: blake3::Hasher,
    left: usize,
    len: usize,
}

impl Incoming<'_> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Fills `buf` with the next bytes of the body, hashing them segment by segment as they land.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() > self.left {
            return Err(self.link.protocol(format!(
                "the frame has {} bytes left, {} were wanted",
                self.left,
                buf.len()
            )));
        }
        let (peer, timeout) = (self.link.peer, self.link.timeout);
        for segment in buf.chunks_mut(SEGMENT) {
            read_exact(&mut self.link.stream, segment).map_err(|e| link_error(peer, e, timeout))?;
            self.mac.update(segment);
        }
        self.left -= buf.len();
        Ok(())
    }

    /// Reads the MAC and compares it; only then may the body be trusted.
    pub(crate) fn finish(self) -> Result<()> {
        if self.left != 0 {
            return Err(self
                .link
                .protocol(format!("{} bytes of the frame were left unread", self.left)));
        }
        let (peer, timeout) = (self.link.peer, self.link.timeout);
        let mut tag = [0u8; MAC_LEN];
        read_exact(&mut self.link.stream, &mut tag).map_err(|e| link_error(peer, e, timeout))?;
        // blake3::Hash compares in constant time.
        if self.mac.finalize() != blake3::Hash::from_bytes(tag) {
            return Err(self.link.protocol(
                "frame MAC mismatch: the frame was altered, replayed or sent on another link"
                    .into(),
            ));
        }
        self.link.seq += 1;
        Ok(())
    }
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(closed()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const MAX_ABORT: usize = 4096;

/// The body of an `Abort` frame: which error ended the formation of the group on a rank, so
/// that every rank reports the cause (the rank that never started) rather than a lost neighbour.
/// Layout: variant (u8), rank (u32), waited in ms (u64), address and reason (u32 length + UTF-8).
pub(crate) fn encode_abort(error: &CollectiveError) -> Vec<u8> {
    let (code, rank, waited, address, reason) = match error {
        CollectiveError::PeerUnreachable {
            rank,
            address,
            waited,
        } => (1u8, *rank, *waited, address.clone(), String::new()),
        CollectiveError::PeerLost { rank, source } => {
            (2, *rank, Duration::ZERO, String::new(), source.to_string())
        }
        CollectiveError::Timeout { rank, waited } => {
            (3, *rank, *waited, String::new(), String::new())
        }
        CollectiveError::Auth { rank, reason } => {
            (4, *rank, Duration::ZERO, String::new(), reason.clone())
        }
        CollectiveError::Protocol { rank, reason } => {
            (5, *rank, Duration::ZERO, String::new(), reason.clone())
        }
        other => (6, 0, Duration::ZERO, String::new(), other.to_string()),
    };
    let mut body = vec![code];
    body.extend_from_slice(&(rank as u32).to_le_bytes());
    body.extend_from_slice(&(waited.as_millis() as u64).to_le_bytes());
    for text in [address, reason] {
        let text = &text.as_bytes()[..text.len().min(1024)];
        body.extend_from_slice(&(text.len() as u32).to_le_bytes());
        body.extend_from_slice(text);
    }
    body
}

fn decode_abort(body: &[u8]) -> Option<CollectiveError> {
    let code = *body.first()?;
    let rank = u32::from_le_bytes(body.get(1..5)?.try_into().ok()?) as usize;
    let waited = Duration::from_millis(u64::from_le_bytes(body.get(5..13)?.try_into().ok()?));
    let mut at = 13;
    let mut text = || {
        let len = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
        let s = String::from_utf8_lossy(body.get(at + 4..at + 4 + len)?).into_owned();
        at += 4 + len;
        Some(s)
    };
    let (address, reason) = (text()?, text()?);
    Some(match code {
        1 => CollectiveError::PeerUnreachable {
            rank,
            address,
            waited,
        },
        2 => CollectiveError::PeerLost {
            rank,
            source: io::Error::other(reason),
        },
        3 => CollectiveError::Timeout { rank, waited },
        4 => CollectiveError::Auth { rank, reason },
        5 => CollectiveError::Protocol { rank, reason },
        _ => CollectiveError::Usage(format!("another rank failed: {reason}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyed link over loopback: the sender, the receiver, and a raw handle on the sending
    /// socket for writing what an attacker would.
    fn pair() -> (Sender, Receiver, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let key = [5u8; 32];
        let timeout = Duration::from_secs(5);
        b.set_read_timeout(Some(timeout)).unwrap();
        let raw = a.try_clone().unwrap();
        (
            Sender::new(a, 1, key, timeout),
            Receiver::new(b, 0, key, timeout),
            raw,
        )
    }

    fn receive(rx: &mut Receiver, kind: Kind) -> Result<Vec<u8>> {
        let mut frame = rx.begin(kind, Expect::AtMost(1 << 20))?;
        let mut body = vec![0u8; frame.len()];
        frame.read(&mut body)?;
        frame.finish()?;
        Ok(body)
    }

    /// The bytes of one keyed frame as `Sender::send` writes them, for sequence number `seq`.
    fn frame_bytes(kind: Kind, body: &[u8], seq: u64) -> Vec<u8> {
        let header = make_header(kind, true, body.len());
        let mut mac = frame_mac(&[5u8; 32], seq, &header);
        mac.update(body);
        [&header[..], body, mac.finalize().as_bytes()].concat()
    }

    #[test]
    fn frames_of_several_segments_arrive_whole() {
        let (mut tx, mut rx, _) = pair();
        let big: Vec<u8> = (0..SEGMENT * 2 + 7).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = std::thread::spawn(move || {
            tx.send(Kind::Bytes, &[b"head", &sent]).unwrap();
            tx.send(Kind::Bytes, &[]).unwrap();
        });
        assert_eq!(
            receive(&mut rx, Kind::Bytes).unwrap(),
            [&b"head"[..], &big].concat()
        );
        assert_eq!(receive(&mut rx, Kind::Bytes).unwrap(), Vec::<u8>::new());
        writer.join().unwrap();
    }

    #[test]
    fn a_flipped_byte_fails_the_mac() {
        let (_, mut rx, mut raw) = pair();
        let mut frame = frame_bytes(Kind::Bytes, b"twelve bytes", 0);
        frame[HEADER_LEN + 3] ^= 1;
        raw.write_all(&frame).unwrap();
        let error = receive(&mut rx, Kind::Bytes).unwrap_err();
        assert!(
            matches!(error, CollectiveError::Protocol { rank: 0, .. }),
            "{error}"
        );
    }

    #[test]
    fn a_replayed_frame_fails_the_mac() {
        let (_, mut rx, mut raw) = pair();
        let frame = frame_bytes(Kind::Bytes, b"once", 0);
        raw.write_all(&frame).unwrap();
        raw.write_all(&frame).unwrap();
        assert_eq!(receive(&mut rx, Kind::Bytes).unwrap(), b"once");
        assert!(matches!(
            receive(&mut rx, Kind::Bytes),
            Err(CollectiveError::Protocol { .. })
        ));
    }

    #[test]
    fn another_operation_or_size_is_refused_before_the_body_is_read() {
        let (mut tx, mut rx, _) = pair();
        tx.send(Kind::AllGather, &[&[0u8; 8]]).unwrap();
        let error = rx
            .begin(Kind::ReduceScatter, Expect::Exactly(8))
            .err()
            .unwrap();
        assert!(matches!(error, CollectiveError::Protocol { .. }), "{error}");
        let (mut tx, mut rx, _) = pair();
        tx.send(Kind::AllGather, &[&[0u8; 8]]).unwrap();
        let error = rx
            .begin(Kind::AllGather, Expect::Exactly(12))
            .err()
            .unwrap();
        assert!(matches!(error, CollectiveError::Protocol { .. }), "{error}");
    }

    #[test]
    fn a_closed_link_is_a_lost_peer_and_silence_a_timeout() {
        let (tx, mut rx, raw) = pair();
        rx.stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        rx.timeout = Duration::from_millis(50);
        let error = rx.begin(Kind::Bytes, Expect::AtMost(8)).err().unwrap();
        assert!(
            matches!(error, CollectiveError::Timeout { rank: 0, .. }),
            "{error}"
        );
        drop((tx, raw));
        let error = rx.begin(Kind::Bytes, Expect::AtMost(8)).err().unwrap();
        assert!(
            matches!(error, CollectiveError::PeerLost { rank: 0, .. }),
            "{error}"
        );
    }

    #[test]
    fn aborts_carry_their_variant_and_fields() {
        let sent = CollectiveError::PeerUnreachable {
            rank: 3,
            address: "job-3.petl:29500".into(),
            waited: Duration::from_millis(1500),
        };
        match decode_abort(&encode_abort(&sent)) {
            Some(CollectiveError::PeerUnreachable {
                rank: 3,
                address,
                waited,
            }) => {
                assert_eq!(address, "job-3.petl:29500");
                assert_eq!(waited, Duration::from_millis(1500));
            }
            other => panic!("decoded {other:?}"),
        }
        let sent = CollectiveError::Auth {
            rank: 1,
            reason: "wrong secret".into(),
        };
        assert!(matches!(
            decode_abort(&encode_abort(&sent)),
            Some(CollectiveError::Auth { rank: 1, reason }) if reason == "wrong secret"
        ));
        assert!(decode_abort(&[1, 2, 3]).is_none());
    }

    #[test]
    fn headers_of_other_protocols_and_versions_are_told_apart() {
        assert!(matches!(
            parse_header(*b"GET / HTTP/1.1\r\n"),
            Err(BadHeader::Foreign)
        ));
        let mut raw = make_header(Kind::Hello, false, 7);
        raw[4] = VERSION + 1;
        assert!(matches!(parse_header(raw), Err(BadHeader::Incompatible(_))));
        let h = parse_header(make_header(Kind::Bytes, true, 7)).unwrap();
        assert_eq!((h.kind, h.keyed, h.len), (Kind::Bytes, true, 7));
    }
}
