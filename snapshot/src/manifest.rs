//! What a snapshot is (named tensors, RNG state, data cursor, step) and its self-checking byte
//! form: a manifest with one BLAKE3 checksum per part, followed by the parts.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"PETLSNAP";
const FORMAT: u32 = 1;
/// Fixed bytes before the manifest: magic, format, manifest length.
const PREAMBLE: usize = 8 + 4 + 4;
/// The manifest is small (one entry per tensor); a larger length means corruption.
const MAX_MANIFEST: usize = 64 << 20;

/// Element type of a tensor, named as in safetensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Dtype {
    U8,
    I8,
    U16,
    I16,
    F16,
    BF16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }
}

/// One trainable tensor or optimiser moment, as raw little-endian bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The trainable state of one rank at one step. The frozen backbone is never part of it: it is
/// re-read from its source on restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Chosen by the trainer and equal on every rank for the same step (e.g. the step itself),
    /// so that the ranks can agree on one generation to resume from.
    pub generation: u64,
    pub step: u64,
    pub tensors: Vec<NamedTensor>,
    /// Opaque RNG state of the trainer.
    pub rng_state: Vec<u8>,
    /// Opaque position in the data stream, so every sample is used once per epoch.
    pub data_cursor: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum PartKind {
    Tensor { dtype: Dtype, shape: Vec<usize> },
    RngState,
    DataCursor,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Part {
    name: String,
    #[serde(flatten)]
    kind: PartKind,
    offset: u64,
    len: u64,
    blake3: String,
}

/// The table of contents of an encoded snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub generation: u64,
    pub step: u64,
    parts: Vec<Part>,
    payload_len: u64,
}

impl Manifest {
    /// Total encoded length this manifest describes.
    fn encoded_len(&self, manifest_len: usize) -> usize {
        PREAMBLE + manifest_len + 32 + self.payload_len as usize
    }
}

impl Snapshot {
    /// Checks that every tensor's byte length matches its dtype and shape.
    pub fn validate(&self) -> Result<()> {
        for t in &self.tensors {
            let elements = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let expected = elements.and_then(|e| e.checked_mul(t.dtype.size()));
            if expected != Some(t.data.len()) {
                return Err(Error::Manifest(format!(
                    "tensor {:?}: {} bytes but dtype {:?} and shape {:?} need {:?}; pass the tensor's raw bytes",
                    t.name,
                    t.data.len(),
                    t.dtype,
                    t.shape,
                    expected
                )));
            }
        }
        Ok(())
    }

    /// Total bytes of the parts (what a restore moves).
    pub fn payload_len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum::<usize>()
            + self.rng_state.len()
            + self.data_cursor.len()
    }

    /// The self-checking byte form: preamble, manifest JSON, its BLAKE3, then the parts.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let (head, parts) = self.encode_parts()?;
        let mut out = Vec::with_capacity(head.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        out.extend_from_slice(&head);
        for part in parts {
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    /// The same byte form as a head (preamble, manifest, its checksum) and the parts in place,
    /// so a sender can write it without first copying the whole state into one buffer.
    pub fn encode_parts(&self) -> Result<(Vec<u8>, Vec<&[u8]>)> {
        self.validate()?;
        let parts = self.parts();
        let digests: Vec<blake3::Hash> = parts.iter().map(|p| blake3::hash(p)).collect();
        Ok((self.head(&digests)?, parts))
    }

    /// Writes the byte form into `out` from offset 0 in one pass over the state: each piece is
    /// hashed just before it is written, while still in cache. The head goes in front last; its
    /// length does not depend on the digests (fixed-width hex). Returns the total length.
    pub fn write_at(&self, out: &impl std::os::unix::fs::FileExt) -> Result<usize> {
        /// Bytes hashed then written at a time: well inside L2.
        const PIECE: usize = 256 << 10;
        self.validate()?;
        let parts = self.parts();
        let head_len = self
            .head(&vec![blake3::Hash::from([0; 32]); parts.len()])?
            .len();
        let mut offset = head_len;
        let mut digests = Vec::with_capacity(parts.len());
        for part in &parts {
            let mut hasher = blake3::Hasher::new();
            for piece in part.chunks(PIECE) {
                hasher.update(piece);
                out.write_all_at(piece, offset as u64)?;
                offset += piece.len();
            }
            digests.push(hasher.finalize());
        }
        let head = self.head(&digests)?;
        debug_assert_eq!(
            head.len(),
            head_len,
            "head length depends only on the layout"
        );
        out.write_all_at(&head, 0)?;
        Ok(offset)
    }

    /// The parts in their byte-form order: tensors, RNG state, data cursor.
    fn parts(&self) -> Vec<&[u8]> {
        self.tensors
            .iter()
            .map(|t| &t.data[..])
            .chain([&self.rng_state[..], &self.data_cursor[..]])
            .collect()
    }

    /// Preamble, manifest JSON and its checksum, for parts with these digests.
    fn head(&self, digests: &[blake3::Hash]) -> Result<Vec<u8>> {
        let names = self
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    PartKind::Tensor {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    },
                )
            })
            .chain([
                ("rng_state".to_string(), PartKind::RngState),
                ("data_cursor".to_string(), PartKind::DataCursor),
            ]);
        let mut offset = 0u64;
        let parts = names
            .zip(self.parts())
            .zip(digests)
            .map(|(((name, kind), data), digest)| {
                let part = Part {
                    name,
                    kind,
                    offset,
                    len: data.len() as u64,
                    blake3: digest.to_hex().to_string(),
                };
                offset += data.len() as u64;
                part
            })
            .collect();
        let manifest = Manifest {
            generation: self.generation,
            step: self.step,
            parts,
            payload_len: offset,
        };
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| Error::Manifest(format!("cannot serialise the manifest: {e}")))?;
        let mut head = Vec::with_capacity(PREAMBLE + json.len() + 32);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        head.extend_from_slice(blake3::hash(&json).as_bytes());
        Ok(head)
    }

    /// Parses and verifies every checksum; corrupted bytes are an error, never a snapshot.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot> {
        let (manifest, payload) = read_manifest(bytes)?;
        let mut snapshot = Snapshot {
            generation: manifest.generation,
            step: manifest.step,
            ..Snapshot::default()
        };
        for part in manifest.parts {
            let start = part.offset as usize;
            let data = payload
                .get(start..start + part.len as usize)
                .ok_or_else(|| {
                    Error::Manifest(format!("part {:?} lies outside the payload", part.name))
                })?;
            if blake3::hash(data).to_hex().as_str() != part.blake3 {
                return Err(Error::Checksum { part: part.name });
            }
            match part.kind {
                PartKind::Tensor { dtype, shape } => snapshot.tensors.push(NamedTensor {
                    name: part.name,
                    dtype,
                    shape,
                    data: data.to_vec(),
                }),
                PartKind::RngState => snapshot.rng_state = data.to_vec(),
                PartKind::DataCursor => snapshot.data_cursor = data.to_vec(),
            }
        }
        snapshot.validate()?;
        Ok(snapshot)
    }
}

/// Reads the manifest and checks every part's checksum without copying the parts: what the
/// agent does to a state it rebuilt from shards before it hands it out.
pub fn verify(bytes: &[u8]) -> Result<Manifest> {
    let (manifest, payload) = read_manifest(bytes)?;
    for part in &manifest.parts {
        let start = part.offset as usize;
        let data = payload
            .get(start..start + part.len as usize)
            .ok_or_else(|| {
                Error::Manifest(format!("part {:?} lies outside the payload", part.name))
            })?;
        if blake3::hash(data).to_hex().as_str() != part.blake3 {
            return Err(Error::Checksum {
                part: part.name.clone(),
            });
        }
    }
    Ok(manifest)
}

/// Reads the manifest and checks its own checksum and the total length, without hashing the
/// payload: cheap enough for the agent to do on every handoff.
pub fn peek(bytes: &[u8]) -> Result<Manifest> {
    read_manifest(bytes).map(|(m, _)| m)
}

fn read_manifest(bytes: &[u8]) -> Result<(Manifest, &[u8])> {
    if bytes.len() < PREAMBLE || &bytes[..8] != MAGIC {
        return Err(Error::Manifest(
            "not a petl snapshot (bad magic or shorter than its preamble)".into(),
        ));
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(Error::Manifest(format!(
            "snapshot format {format}, this build reads {FORMAT}; use matching trainer and agent versions"
        )));
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if len > MAX_MANIFEST || bytes.len() < PREAMBLE + len + 32 {
        return Err(Error::Manifest(format!(
            "manifest length {len} does not fit in {} bytes (truncated?)",
            bytes.len()
        )));
    }
    let json = &bytes[PREAMBLE..PREAMBLE + len];
    let sum = &bytes[PREAMBLE + len..PREAMBLE + len + 32];
    if blake3::hash(json).as_bytes() != sum {
        return Err(Error::Checksum {
            part: "manifest".into(),
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| Error::Manifest(format!("manifest JSON: {e}")))?;
    if bytes.len() != manifest.encoded_len(len) {
        return Err(Error::Manifest(format!(
            "snapshot is {} bytes, its manifest says {} (truncated or padded)",
            bytes.len(),
            manifest.encoded_len(len)
        )));
    }
    Ok((manifest, &bytes[PREAMBLE + len + 32..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            generation: 7,
            step: 70,
            tensors: vec![
                NamedTensor {
                    name: "side.w".into(),
                    dtype: Dtype::F32,
                    shape: vec![2, 3],
                    data: (0..24).collect(),
                },
                NamedTensor {
                    name: "adam.m.side.w".into(),
                    dtype: Dtype::BF16,
                    shape: vec![3],
                    data: vec![9; 6],
                },
            ],
            rng_state: vec![1, 2, 3],
            data_cursor: b"epoch=1,offset=42".to_vec(),
        }
    }

    #[test]
    fn writing_in_place_gives_the_same_bytes_as_encoding() {
        let s = sample();
        let mut file = tempfile::tempfile().unwrap();
        let len = s.write_at(&file).unwrap();
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut written).unwrap();
        assert_eq!(len, written.len());
        assert_eq!(written, s.encode().unwrap());
    }

    #[test]
    fn round_trips_every_part() {
        let s = sample();
        assert_eq!(Snapshot::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn rejects_every_single_flipped_byte() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                Snapshot::decode(&bad).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn rejects_truncation_and_padding() {
        let bytes = sample().encode().unwrap();
        for cut in [0, 5, 16, bytes.len() / 2, bytes.len() - 1] {
            assert!(Snapshot::decode(&bytes[..cut]).is_err());
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(Snapshot::decode(&padded).is_err());
    }

    #[test]
    fn rejects_a_tensor_whose_bytes_do_not_match_its_shape() {
        let mut s = sample();
        s.tensors[0].shape = vec![5];
        let err = s.encode().unwrap_err().to_string();
        assert!(err.contains("side.w"), "{err}");
    }
}
