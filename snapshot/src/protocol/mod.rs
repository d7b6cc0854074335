//! Versioned frames between agents and between a trainer and its agent: a 16-byte header
//! (magic, version, kind, flags, body length), the body, and on peer links a keyed BLAKE3 MAC.
//!
//! Every read checks magic, version, kind, length limits and (when keyed) the MAC over a per-
//! direction sequence number, so truncated, garbage, replayed or flipped frames are errors, one
//! [`ProtocolError`] variant each. [`Message`] and its [`Kind`] say what travels, `body` how it
//! is laid out, [`Conn`] is the agents' async link, `blocking` the trainer's side.

mod blocking;
mod body;
mod conn;
mod error;
mod message;

pub use blocking::{recv_blocking, send_blocking, send_put_blocking, send_put_fd_blocking};
pub use conn::Conn;
pub use error::ProtocolError;
pub use message::{AgentStatus, Fault, Kind, Message, ShardHeader, Tier};

const MAGIC: &[u8; 4] = b"PSNF";
/// Bumped on any change of the header or of a body layout.
pub const VERSION: u8 = 4;
const HEADER_LEN: usize = 16;
const MAC_LEN: usize = 32;
const FLAG_MAC: u16 = 1;
/// Limit for frames before authentication: a stranger cannot make the agent allocate.
pub const HANDSHAKE_MAX_BODY: usize = 4096;

/// Per-direction MAC keys of an authenticated link (see `auth`).
#[derive(Clone, Debug)]
pub struct LinkKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
}

/// A checked frame header.
struct Header {
    kind: Kind,
    len: usize,
}

fn make_header(kind: Kind, keyed: bool, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    let flags = if keyed { FLAG_MAC } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// Checks a header before any of its body is read: an unknown kind or an oversized body is
/// refused without allocating for it.
fn parse_header(
    h: &[u8; HEADER_LEN],
    keyed: bool,
    max_body: usize,
) -> Result<Header, ProtocolError> {
    if &h[..4] != MAGIC {
        return Err(ProtocolError::BadMagic {
            found: h[..4].try_into().expect("4"),
        });
    }
    if h[4] != VERSION {
        return Err(ProtocolError::UnsupportedVersion { found: h[4] });
    }
    let kind = Kind::try_from(h[5])?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if (flags & FLAG_MAC != 0) != keyed || flags & !FLAG_MAC != 0 {
        return Err(ProtocolError::BadFlags {
            flags,
            authenticated: keyed,
        });
    }
    let len = u64::from_le_bytes(h[8..].try_into().expect("8"));
    if len > max_body as u64 {
        return Err(ProtocolError::TooLarge {
            len,
            limit: max_body,
        });
    }
    Ok(Header {
        kind,
        len: len as usize,
    })
}

/// The error for a stream that ended after `got` bytes of a header: between frames when none.
fn ended_in_header(got: usize) -> ProtocolError {
    if got == 0 {
        ProtocolError::Closed
    } else {
        ProtocolError::Truncated { field: "header" }
    }
}

/// Maps the end of the stream while reading `field` to `Truncated`; other I/O errors stay I/O.
fn truncated_in(field: &'static str) -> impl Fn(std::io::Error) -> crate::Error {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated { field }.into()
        } else {
            crate::Error::Io(e)
        }
    }
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

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
