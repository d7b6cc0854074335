//! Every way a frame can break the wire protocol, one variant each, so readers act on the case
//! (a peer that closed between frames is the normal end of a link; the others are refused).

use super::VERSION;
use super::message::Kind;

/// A frame that breaks the wire protocol. Except for [`ProtocolError::Closed`], the link's byte
/// stream can no longer be trusted after one: the reader answers `Error` and closes the link.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The other side closed the connection between two frames: the normal end of a link.
    #[error("the connection closed between frames")]
    Closed,
    /// The connection ended inside a frame, while `field` was being read.
    #[error("truncated frame: the connection closed mid-frame, in its {field}")]
    Truncated { field: &'static str },
    /// The first four bytes are not `PSNF`.
    #[error("bad magic {found:02x?}: not a petl snapshot frame")]
    BadMagic { found: [u8; 4] },
    /// Another protocol version.
    #[error(
        "frame version {found}, this side speaks {VERSION}; run the same petl version on every rank"
    )]
    UnsupportedVersion { found: u8 },
    /// A kind byte that names no message.
    #[error("unknown frame kind {kind}; the peer speaks another protocol version?")]
    UnknownKind { kind: u8 },
    /// Flags with unknown bits, or a MAC flag that does not match whether the link is keyed.
    #[error("frame flags {flags:#x} do not match the link (authenticated: {authenticated})")]
    BadFlags { flags: u16, authenticated: bool },
    /// A body longer than the link accepts (4 KiB before authentication).
    #[error(
        "frame body of {len} bytes exceeds the limit of {limit}; raise --max-frame-bytes if the snapshot is that large"
    )]
    TooLarge { len: u64, limit: usize },
    /// The frame's MAC does not match: altered, replayed, reordered or keyed by another job.
    #[error("frame MAC mismatch: altered, replayed or from another job")]
    BadMac,
    /// The body ends before one of its fixed fields.
    #[error("truncated {kind} body: field {field} needs {needed} bytes, {left} left")]
    ShortBody {
        kind: Kind,
        field: &'static str,
        needed: usize,
        left: usize,
    },
    /// Bytes after the last field of a fixed body.
    #[error("{kind} frame has {extra} unexpected trailing bytes")]
    TrailingBytes { kind: Kind, extra: usize },
    /// A text field that is not UTF-8.
    #[error("field {field} of a {kind} frame is not UTF-8")]
    NotUtf8 { kind: Kind, field: &'static str },
    /// A JSON field that does not parse as what it carries.
    #[error("field {field} of a {kind} frame: {source}")]
    Json {
        kind: Kind,
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A restore tier byte outside 1..=3.
    #[error("unknown restore tier {tier}")]
    UnknownTier { tier: u8 },
    /// A well-formed message where another was due (`context` says where).
    #[error("unexpected {got} {context}")]
    Unexpected { got: Kind, context: &'static str },
}
