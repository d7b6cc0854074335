//! Mutual challenge–response on a fresh connection between two ranks: both prove they hold the
//! job secret (HMAC-SHA256 over a transcript with both nonces), then derive per-direction keys.
//!
//! Dialler → acceptor: `Hello` (job, world size, from, to, incarnation, nonce). Acceptor →
//! dialler: `Challenge` (its incarnation and nonce, its proof) or `Refuse`. Dialler → acceptor:
//! `Proof` or `Refuse`. Acceptor → dialler: `Ready`, the first frame under the new keys, or
//! `Refuse` (the ranks disagree on the ring). Both incarnations enter the transcript, so keys
//! and frames of one incarnation of a group never pass in another.

use std::net::TcpStream;

use petl_snapshot::auth::Secret;

use super::link::{self, BadHeader, Kind};
use crate::collective::CollectiveError;

/// A random identity of one group instance on one rank, drawn when the group forms.
pub(crate) type Incarnation = [u8; 16];

const MAX_HANDSHAKE_BODY: usize = 4096;
const LABEL_ACCEPTOR: &str = "petl-collective acceptor";
const LABEL_DIALLER: &str = "petl-collective dialler";
const LABEL_KEY_FORWARD: &str = "petl-collective key dialler->acceptor";
const LABEL_KEY_BACKWARD: &str = "petl-collective key acceptor->dialler";

/// Why a refusal was sent.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Another job, or another secret.
    Auth = 1,
    /// The same job and secret, but the ranks disagree on the ring (world size, rank numbers).
    Setup = 2,
}

/// What the caller learns from a failed handshake.
#[derive(Debug)]
pub(crate) enum Failed {
    /// Not a peer, or a peer that went away: try again (dialler) or keep accepting (acceptor).
    Retry(String),
    /// A peer of the wrong job or secret, or a mismatched setup: no retry can help.
    Fatal(CollectiveError),
}

/// What both sides agree on after the handshake.
#[derive(Debug)]
pub(crate) struct Agreed {
    /// Key for frames from the dialler to the acceptor (the ring's direction of data).
    pub forward_key: [u8; 32],
    /// The other end's incarnation.
    pub peer_incarnation: Incarnation,
}

/// This rank's side of a handshake.
pub(crate) struct Identity<'a> {
    pub job: &'a str,
    pub secret: &'a Secret,
    pub world_size: usize,
    pub rank: usize,
    pub incarnation: Incarnation,
}

struct Hello {
    job: String,
    world_size: u32,
    from: u32,
    to: u32,
    incarnation: Incarnation,
    nonce: [u8; 32],
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.job.len());
        b.extend_from_slice(&(self.job.len() as u32).to_le_bytes());
        b.extend_from_slice(self.job.as_bytes());
        for v in [self.world_size, self.from, self.to] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.incarnation);
        b.extend_from_slice(&self.nonce);
        b
    }

    fn decode(b: &[u8]) -> Option<Hello> {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let job = String::from_utf8(b.get(4..4 + len)?.to_vec()).ok()?;
        let rest = b.get(4 + len..)?;
        if rest.len() != 12 + 16 + 32 {
            return None;
        }
        let word = |i: usize| u32::from_le_bytes(rest[i * 4..i * 4 + 4].try_into().expect("4"));
        Some(Hello {
            job,
            world_size: word(0),
            from: word(1),
            to: word(2),
            incarnation: rest[12..28].try_into().ok()?,
            nonce: rest[28..].try_into().ok()?,
        })
    }
}

/// The bytes both proofs and both keys are computed over.
struct Transcript(Vec<Vec<u8>>);

impl Transcript {
    fn new(hello: &Hello, acceptor_incarnation: &Incarnation, acceptor_nonce: &[u8; 32]) -> Self {
        Transcript(vec![
            hello.job.as_bytes().to_vec(),
            hello.world_size.to_le_bytes().to_vec(),
            hello.from.to_le_bytes().to_vec(),
            hello.to.to_le_bytes().to_vec(),
            hello.incarnation.to_vec(),
            hello.nonce.to_vec(),
            acceptor_incarnation.to_vec(),
            acceptor_nonce.to_vec(),
        ])
    }

    fn parts(&self) -> Vec<&[u8]> {
        self.0.iter().map(Vec::as_slice).collect()
    }

    fn prove(&self, secret: &Secret, label: &str) -> [u8; 32] {
        secret.prove(label, &self.parts())
    }

    fn check(&self, secret: &Secret, label: &str, proof: &[u8]) -> bool {
        secret.check_proof(label, &self.parts(), proof)
    }
}

/// Reads one unkeyed frame of at most [`MAX_HANDSHAKE_BODY`] bytes.
fn read_plain(stream: &mut TcpStream) -> Result<(Kind, Vec<u8>), Failed> {
    let raw = match link::read_header(stream) {
        Ok(Some(raw)) => raw,
        Ok(None) => return Err(Failed::Retry("the peer closed the connection".into())),
        Err(e) => return Err(Failed::Retry(format!("reading a handshake frame: {e}"))),
    };
    let header = match link::parse_header(raw) {
        Ok(h) => h,
        Err(BadHeader::Foreign) => return Err(Failed::Retry("not a petl collective peer".into())),
        Err(BadHeader::Incompatible(why)) => {
            return Err(Failed::Fatal(CollectiveError::Usage(why)));
        }
    };
    if header.len > MAX_HANDSHAKE_BODY {
        return Err(Failed::Retry(format!(
            "a handshake frame of {} bytes",
            header.len
        )));
    }
    // Only `Ready` is keyed: its body is empty and its MAC follows, which the caller checks
    // with the keys; it receives the MAC and then the header the MAC covers.
    let extra = if header.keyed { link::MAC_LEN } else { 0 };
    let mut body = vec![0u8; header.len + extra];
    std::io::Read::read_exact(stream, &mut body)
        .map_err(|e| Failed::Retry(format!("reading a handshake frame: {e}")))?;
    if header.keyed {
        body.extend_from_slice(&raw);
    }
    Ok((header.kind, body))
}

fn send_plain(stream: &mut TcpStream, kind: Kind, body: &[u8]) -> Result<(), Failed> {
    link::write_plain(stream, kind, body)
        .map_err(|e| Failed::Retry(format!("writing a handshake frame: {e}")))
}

fn refuse(stream: &mut TcpStream, why: Refusal, reason: &str) {
    let mut body = vec![why as u8];
    body.extend_from_slice(reason.as_bytes());
    // Best effort: the refusal only tells the other end why; the error is ours either way.
    let _ = link::write_plain(stream, Kind::Refuse, &body);
}

fn refused(peer: usize, body: &[u8]) -> Failed {
    let reason = String::from_utf8_lossy(body.get(1..).unwrap_or_default()).into_owned();
    Failed::Fatal(match body.first() {
        Some(&code) if code == Refusal::Setup as u8 => {
            CollectiveError::Usage(format!("rank {peer} refused the link: {reason}"))
        }
        _ => CollectiveError::Auth {
            rank: peer,
            reason: format!("it refused this rank: {reason}"),
        },
    })
}

fn keys(transcript: &Transcript, secret: &Secret) -> ([u8; 32], [u8; 32]) {
    (
        transcript.prove(secret, LABEL_KEY_FORWARD),
        transcript.prove(secret, LABEL_KEY_BACKWARD),
    )
}

/// The dialler's side, on a connection to rank `to`.
pub(crate) fn dial(stream: &mut TcpStream, me: &Identity, to: usize) -> Result<Agreed, Failed> {
    let hello = Hello {
        job: me.job.to_string(),
        world_size: me.world_size as u32,
        from: me.rank as u32,
        to: to as u32,
        incarnation: me.incarnation,
        nonce: rand::random(),
    };
    send_plain(stream, Kind::Hello, &hello.encode())?;
    let (incarnation, nonce, proof) = match read_plain(stream)? {
        (Kind::Challenge, b) if b.len() == 16 + 32 + 32 => {
            let incarnation: Incarnation = b[..16].try_into().expect("16");
            let nonce: [u8; 32] = b[16..48].try_into().expect("32");
            (incarnation, nonce, b[48..].to_vec())
        }
        (Kind::Refuse, b) => return Err(refused(to, &b)),
        (kind, _) => return Err(Failed::Retry(format!("expected a challenge, got {kind:?}"))),
    };
    let transcript = Transcript::new(&hello, &incarnation, &nonce);
    if !transcript.check(me.secret, LABEL_ACCEPTOR, &proof) {
        let reason = format!(
            "its proof does not match this rank's secret for job {:?}: the ranks hold different secrets (check the secret file)",
            me.job
        );
        refuse(stream, Refusal::Auth, &reason);
        return Err(Failed::Fatal(CollectiveError::Auth { rank: to, reason }));
    }
    let proof = transcript.prove(me.secret, LABEL_DIALLER);
    send_plain(stream, Kind::Proof, &proof)?;
    let (forward_key, backward_key) = keys(&transcript, me.secret);
    match read_plain(stream)? {
        (Kind::Ready, b) if b.len() == link::HEADER_LEN + link::MAC_LEN => {
            let (tag, raw) = b.split_at(link::MAC_LEN);
            let mut mac = blake3::Hasher::new_keyed(&backward_key);
            mac.update(&0u64.to_le_bytes());
            mac.update(raw);
            let tag: [u8; 32] = tag.try_into().expect("32");
            if mac.finalize() != blake3::Hash::from_bytes(tag) {
                return Err(Failed::Fatal(CollectiveError::Auth {
                    rank: to,
                    reason: "its Ready frame does not carry the derived keys' MAC".into(),
                }));
            }
        }
        (Kind::Refuse, b) => return Err(refused(to, &b)),
        (kind, _) => return Err(Failed::Retry(format!("expected Ready, got {kind:?}"))),
    }
    Ok(Agreed {
        forward_key,
        peer_incarnation: incarnation,
    })
}

/// The acceptor's side, on a connection that should come from rank `from`.
pub(crate) fn accept(stream: &mut TcpStream, me: &Identity, from: usize) -> Result<Agreed, Failed> {
    let hello = match read_plain(stream)? {
        (Kind::Hello, b) => {
            Hello::decode(&b).ok_or_else(|| Failed::Retry("a malformed Hello".to_string()))?
        }
        (kind, _) => return Err(Failed::Retry(format!("expected Hello, got {kind:?}"))),
    };
    let claimed = match hello.from as usize {
        r if r < me.world_size => r,
        _ => from,
    };
    if hello.job != me.job {
        let reason = format!(
            "rank {} of job {:?} dialled rank {} of job {:?}: check the peer addresses of both jobs",
            hello.from, hello.job, me.rank, me.job
        );
        refuse(stream, Refusal::Auth, &reason);
        return Err(Failed::Fatal(CollectiveError::Auth {
            rank: claimed,
            reason,
        }));
    }
    let incarnation = me.incarnation;
    let nonce: [u8; 32] = rand::random();
    let transcript = Transcript::new(&hello, &incarnation, &nonce);
    let mut challenge = incarnation.to_vec();
    challenge.extend_from_slice(&nonce);
    challenge.extend_from_slice(&transcript.prove(me.secret, LABEL_ACCEPTOR));
    send_plain(stream, Kind::Challenge, &challenge)?;
    match read_plain(stream)? {
        (Kind::Proof, proof) if transcript.check(me.secret, LABEL_DIALLER, &proof) => {}
        (Kind::Proof, _) => {
            let reason = format!(
                "its proof does not match this rank's secret for job {:?}: the ranks hold different secrets (check the secret file)",
                me.job
            );
            refuse(stream, Refusal::Auth, &reason);
            return Err(Failed::Fatal(CollectiveError::Auth {
                rank: claimed,
                reason,
            }));
        }
        (Kind::Refuse, b) => return Err(refused(claimed, &b)),
        (kind, _) => return Err(Failed::Retry(format!("expected Proof, got {kind:?}"))),
    }
    // Only now, with both sides proven, do the claims about the ring count.
    if hello.world_size as usize != me.world_size
        || hello.to as usize != me.rank
        || hello.from as usize != from
    {
        let reason = format!(
            "rank {} (world size {}) dialled this address as rank {}, but it is rank {} of {} and expects rank {from}: the ranks were given different peer lists",
            hello.from, hello.world_size, hello.to, me.rank, me.world_size
        );
        refuse(stream, Refusal::Setup, &reason);
        return Err(Failed::Fatal(CollectiveError::Usage(reason)));
    }
    let (forward_key, backward_key) = keys(&transcript, me.secret);
    let mut ready = link::Sender::new(
        stream
            .try_clone()
            .map_err(|e| Failed::Retry(format!("cloning the socket: {e}")))?,
        from,
        backward_key,
        std::time::Duration::from_secs(5),
    );
    ready
        .send(Kind::Ready, &[])
        .map_err(|e| Failed::Retry(format!("sending Ready: {e}")))?;
    Ok(Agreed {
        forward_key,
        peer_incarnation: hello.incarnation,
    })
}
