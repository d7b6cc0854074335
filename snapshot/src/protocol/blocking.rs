//! The trainer's side of the local socket, on plain blocking streams: unauthenticated frames,
//! a `Put` written in pieces, and a `PutFd` that passes the memfd as `SCM_RIGHTS`.

use std::io::{Read, Write};
use std::os::fd::BorrowedFd;

use bytes::Bytes;

use super::message::{Kind, Message};
use super::{HEADER_LEN, ended_in_header, make_header, parse_header, truncated_in};
use crate::Result;

/// Writes one unauthenticated frame on a blocking stream.
pub fn send_blocking(w: &mut impl Write, msg: &Message) -> Result<()> {
    let body = msg.body();
    w.write_all(&make_header(msg.kind(), false, body.len()))?;
    w.write_all(&body.lead)?;
    w.write_all(&body.payload.unwrap_or_default())?;
    w.write_all(&body.trailer)?;
    w.flush()?;
    Ok(())
}

/// Writes a `Put` frame whose snapshot is given in pieces (see `Snapshot::encode_parts`),
/// without joining them into one buffer first.
pub fn send_put_blocking(w: &mut impl Write, pieces: &[&[u8]]) -> Result<()> {
    let len = pieces.iter().map(|p| p.len()).sum();
    w.write_all(&make_header(Kind::Put, false, len))?;
    for piece in pieces {
        w.write_all(piece)?;
    }
    w.flush()?;
    Ok(())
}

/// Sends a `PutFd` frame with the memfd holding the snapshot.
pub fn send_put_fd_blocking(
    stream: &std::os::unix::net::UnixStream,
    len: u64,
    fd: BorrowedFd<'_>,
) -> Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let msg = Message::PutFd { len };
    let body = msg.body();
    let mut frame = make_header(msg.kind(), false, body.len()).to_vec();
    frame.extend_from_slice(&body.lead);
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

/// Reads one unauthenticated frame from a blocking stream.
pub fn recv_blocking(r: &mut impl Read, max_body: usize) -> Result<Message> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut raw[got..]) {
            Ok(0) => return Err(ended_in_header(got).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let header = parse_header(&raw, false, max_body)?;
    let mut body = vec![0u8; header.len];
    r.read_exact(&mut body).map_err(truncated_in("body"))?;
    Message::decode(header.kind, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::protocol::{ProtocolError, VERSION};

    fn frame() -> Vec<u8> {
        let mut frame = Vec::new();
        send_blocking(
            &mut frame,
            &Message::Commit {
                owner: 1,
                generation: 5,
            },
        )
        .unwrap();
        frame
    }

    #[test]
    fn a_truncated_frame_yields_the_truncated_variant_naming_the_field() {
        let frame = frame();
        assert!(matches!(
            recv_blocking(&mut &frame[..0], 1 << 20),
            Err(Error::Protocol(ProtocolError::Closed))
        ));
        for (cut, field) in [
            (3, "header"),
            (15, "header"),
            (16, "body"),
            (frame.len() - 1, "body"),
        ] {
            let err = recv_blocking(&mut &frame[..cut], 1 << 20).unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ProtocolError::Truncated { field: f }) if f == field),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn oversized_foreign_and_unknown_frames_are_refused_by_kind() {
        let frame = frame();
        let err = recv_blocking(&mut &frame[..], 10).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::TooLarge { len: 12, limit: 10 })
            ),
            "{err}"
        );
        let mut wrong_version = frame.clone();
        wrong_version[4] = 99;
        let err = recv_blocking(&mut &wrong_version[..], 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::UnsupportedVersion { found: 99 })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("speaks {VERSION}")),
            "{err}"
        );
        let mut bad_magic = frame.clone();
        bad_magic[0] = b'X';
        let err = recv_blocking(&mut &bad_magic[..], 1 << 20).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ProtocolError::BadMagic { .. })),
            "{err}"
        );
        let mut unknown = frame.clone();
        unknown[5] = 200;
        let err = recv_blocking(&mut &unknown[..], 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::UnknownKind { kind: 200 })
            ),
            "{err}"
        );
        let mut keyed = frame;
        keyed[6] = 1;
        let err = recv_blocking(&mut &keyed[..], 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::BadFlags {
                    flags: 1,
                    authenticated: false
                })
            ),
            "{err}"
        );
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
}
