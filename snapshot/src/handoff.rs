//! The trainer → agent handoff through a sealed memfd: the trainer writes the encoded snapshot
//! once into an anonymous in-memory file and passes its descriptor; the agent maps it, no copy.
//!
//! The trainer seals the file against writes and shrinking before it lets go, so the bytes the
//! agent checksums, keeps and encodes can never change under it. The agent grows the file with
//! zeros to the Reed–Solomon padded length (a size change, not a write) and seals it for good,
//! so the data shards are slices of the very pages the trainer wrote.

use std::fs::File;
use std::os::fd::OwnedFd;

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};

use crate::manifest::Snapshot;
use crate::{Error, Result};

/// Seals the trainer must have set before handing over: the contents are frozen.
const FROZEN: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK);

/// Writes the snapshot's byte form into a new memfd and seals it; the returned descriptor and
/// length are what the trainer passes to its agent.
pub fn write_sealed(snapshot: &Snapshot) -> Result<(OwnedFd, usize)> {
    let fd = rustix::fs::memfd_create(
        "petl-snapshot",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| Error::Agent(format!("memfd_create for the snapshot handoff: {e}")))?;
    let file = File::from(fd);
    let len = snapshot.write_at(&file)?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(&fd, FROZEN)
        .map_err(|e| Error::Agent(format!("sealing the snapshot handoff: {e}")))?;
    Ok((fd, len))
}

/// Maps a handed-over memfd of `len` snapshot bytes, grown with zeros to `padded_len`. Returns
/// the whole padded mapping; the snapshot is its first `len` bytes.
pub fn map_padded(fd: OwnedFd, len: usize, padded_len: usize) -> Result<Bytes> {
    let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| {
        Error::Protocol(format!(
            "the handed-over descriptor is not a sealable memfd ({e}); trainer and agent versions differ?"
        ))
    })?;
    if !seals.contains(FROZEN) {
        return Err(Error::Protocol(format!(
            "the handed-over memfd is not sealed against writes and shrinking (seals {seals:?}); \
             the trainer could change the snapshot after the handoff"
        )));
    }
    let size = rustix::fs::fstat(&fd)
        .map_err(std::io::Error::from)?
        .st_size as usize;
    if size != len {
        return Err(Error::Protocol(format!(
            "the handoff says {len} bytes, the memfd holds {size}"
        )));
    }
    if padded_len < len {
        return Err(Error::Protocol(format!(
            "padded length {padded_len} is shorter than the snapshot's {len} bytes"
        )));
    }
    if padded_len > len {
        rustix::fs::ftruncate(&fd, padded_len as u64).map_err(std::io::Error::from)?;
    }
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SEAL)
        .map_err(std::io::Error::from)?;
    if padded_len == 0 {
        return Ok(Bytes::new());
    }
    let file = File::from(fd);
    // SAFETY: the file is sealed against writes, shrinking and growing (checked and set above),
    // so the mapped bytes cannot change or vanish while the mapping lives.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }?;
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            generation: 3,
            rng_state: b"rng".to_vec(),
            data_cursor: b"cursor".to_vec(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn maps_the_written_bytes_with_a_zero_tail() {
        let (fd, len) = write_sealed(&sample()).unwrap();
        let padded = map_padded(fd, len, len + 64).unwrap();
        assert_eq!(padded.len(), len + 64);
        assert_eq!(padded[..len], sample().encode().unwrap()[..]);
        assert!(padded[len..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_trainer_cannot_change_a_handed_over_snapshot() {
        let (fd, len) = write_sealed(&sample()).unwrap();
        let mut file = File::from(fd.try_clone().unwrap());
        assert!(file.write_all(b"X").is_err());
        assert!(file.set_len(1).is_err());
        let padded = map_padded(fd, len, len + 64).unwrap();
        assert!(
            file.set_len(4096).is_err(),
            "grown after the agent sealed it"
        );
        assert_eq!(Snapshot::decode(&padded[..len]).unwrap(), sample());
    }

    #[test]
    fn an_unsealed_or_misreported_memfd_is_refused() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::ALLOW_SEALING).unwrap();
        let mut file = File::from(fd);
        file.write_all(b"state").unwrap();
        let err = map_padded(OwnedFd::from(file), 5, 64).unwrap_err();
        assert!(err.to_string().contains("not sealed"), "{err}");
        let (fd, len) = write_sealed(&sample()).unwrap();
        let err = map_padded(fd, len + 4, len + 64).unwrap_err();
        assert!(err.to_string().contains(&format!("holds {len}")), "{err}");
    }
}
