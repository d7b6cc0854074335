//! The trainer → agent handoff through a sealed memfd: the trainer writes the encoded snapshot
//! once into an anonymous in-memory file and passes its descriptor; the agent maps it, no copy.
//!
//! The trainer seals the file against writes and shrinking before it lets go, so the bytes the
//! agent checksums, keeps and encodes can never change under it. The agent grows the file with
//! zeros to the Reed–Solomon padded length (a size change, not a write) and seals it for good,
//! so the data shards are slices of the very pages the trainer wrote.
//!
//! Fresh shared-memory pages are what the handoff costs most (allocating and zeroing them took
//! as long as writing the snapshot into them, bench/snapshot), so the trainer's sender prepares
//! the next file with its pages allocated ([`HandoffFile::prepare`]) while it is idle, off the
//! path from `put` to the commit; and the agent maps lazily, so the threads that hash the
//! shards fault the pages in, in parallel.

use std::fs::File;
use std::os::fd::OwnedFd;

use bytes::Bytes;
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

use crate::manifest::Snapshot;
use crate::{Error, Rejection, Result};

/// Seals the trainer must have set before handing over: the contents are frozen.
const FROZEN: SealFlags = SealFlags::WRITE.union(SealFlags::SHRINK);

/// A new memfd the trainer writes one snapshot into, possibly with its pages already allocated.
pub struct HandoffFile {
    file: File,
}

impl HandoffFile {
    /// An empty memfd.
    pub fn new() -> Result<HandoffFile> {
        let fd = rustix::fs::memfd_create(
            "petl-snapshot",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| Error::Handoff {
            what: "memfd_create",
            source: e.into(),
        })?;
        Ok(HandoffFile {
            file: File::from(fd),
        })
    }

    /// A memfd with `len` bytes of pages allocated (zeroed) up front, so that writing a snapshot
    /// of about that size into it only copies.
    pub fn prepare(len: usize) -> Result<HandoffFile> {
        let handoff = HandoffFile::new()?;
        rustix::fs::fallocate(&handoff.file, FallocateFlags::empty(), 0, len as u64).map_err(
            |e| Error::Handoff {
                what: "allocating the memfd's pages",
                source: e.into(),
            },
        )?;
        Ok(handoff)
    }

    /// Writes the snapshot's byte form, cuts the file to its length and seals it; the returned
    /// descriptor and length are what the trainer passes to its agent.
    pub fn seal(self, snapshot: &Snapshot) -> Result<(OwnedFd, usize)> {
        let len = snapshot.write_at(&self.file)?;
        // A prepared file may be longer than this snapshot.
        self.file.set_len(len as u64)?;
        let fd = OwnedFd::from(self.file);
        rustix::fs::fcntl_add_seals(&fd, FROZEN).map_err(|e| Error::Handoff {
            what: "sealing the memfd",
            source: e.into(),
        })?;
        Ok((fd, len))
    }
}

/// Writes the snapshot's byte form into a new memfd and seals it; the returned descriptor and
/// length are what the trainer passes to its agent.
pub fn write_sealed(snapshot: &Snapshot) -> Result<(OwnedFd, usize)> {
    HandoffFile::new()?.seal(snapshot)
}

/// Maps a handed-over memfd of `len` snapshot bytes, grown with zeros to `padded_len`. Returns
/// the whole padded mapping; the snapshot is its first `len` bytes.
pub fn map_padded(fd: OwnedFd, len: usize, padded_len: usize) -> Result<Bytes> {
    let seals =
        rustix::fs::fcntl_get_seals(&fd).map_err(|e| Rejection::NotMemfd { source: e.into() })?;
    if !seals.contains(FROZEN) {
        return Err(Rejection::NotSealed {
            seals: format!("{seals:?}"),
        }
        .into());
    }
    let size = rustix::fs::fstat(&fd)
        .map_err(std::io::Error::from)?
        .st_size as usize;
    if size != len {
        return Err(Rejection::HandoffLength {
            said: len,
            holds: size,
        }
        .into());
    }
    if padded_len < len {
        return Err(Error::Codec(format!(
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
    // so the mapped bytes cannot change or vanish while the mapping lives. Not populated: the
    // threads that hash the shards fault their pages in, in parallel (bench/snapshot).
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }?;
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
    fn a_prepared_file_longer_or_shorter_than_the_snapshot_hands_over_exactly_its_bytes() {
        let len = sample().encode().unwrap().len();
        for prepared in [len / 2, len, len * 3] {
            let (fd, written) = HandoffFile::prepare(prepared)
                .unwrap()
                .seal(&sample())
                .unwrap();
            assert_eq!(written, len);
            let padded = map_padded(fd, len, len + 64).unwrap();
            assert_eq!(Snapshot::decode(&padded[..len]).unwrap(), sample());
            assert!(padded[len..].iter().all(|&b| b == 0));
        }
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
        assert!(
            matches!(err, Error::Rejected(Rejection::NotSealed { .. })),
            "{err}"
        );
        let (fd, len) = write_sealed(&sample()).unwrap();
        let err = map_padded(fd, len + 4, len + 64).unwrap_err();
        assert!(
            matches!(err, Error::Rejected(Rejection::HandoffLength { said, holds }) if said == len + 4 && holds == len),
            "{err}"
        );
    }
}
