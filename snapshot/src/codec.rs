//! Striped Reed–Solomon over a snapshot's bytes: k data shards are slices of the (padded)
//! snapshot, m parity shards are computed stripe by stripe so the working set stays in cache.
//!
//! The engine is `reed-solomon-simd` (pure Rust, runtime SIMD); bench/snapshot compares it with
//! `reed-solomon-erasure` and memcpy. Each shard carries a BLAKE3 checksum so a corrupted
//! shard is recognised and skipped, never decoded; on the wire the same digest binds the shard
//! to the frame MAC (see `protocol`).

use bytes::Bytes;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::{Error, Result};

/// Bytes of each shard encoded together: k such slices plus m outputs fit in L2/L3.
pub const DEFAULT_STRIPE: usize = 64 << 10;
/// The decoder has a high fixed cost per call (its error locator), so it works on larger
/// stripes than the encoder; bench/snapshot showed 16–64 KiB decode stripes 5–10× slower.
pub const MIN_DECODE_STRIPE: usize = 256 << 10;
/// Shard lengths are rounded to this so every stripe has the even length the engine needs.
const SHARD_ALIGN: usize = 64;

/// k data shards plus m parity shards: any k of the k+m rebuild the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub data_shards: usize,
    pub parity_shards: usize,
}

impl Layout {
    /// Checks the limits of the engine (k ≥ 1, m ≥ 1, k + m ≤ 32768).
    pub fn new(data_shards: usize, parity_shards: usize) -> Result<Layout> {
        if data_shards == 0 || parity_shards == 0 || data_shards + parity_shards > 32768 {
            return Err(Error::Layout(format!(
                "data shards {data_shards} and parity shards {parity_shards}: both must be ≥ 1 and their sum ≤ 32768"
            )));
        }
        Ok(Layout {
            data_shards,
            parity_shards,
        })
    }

    /// k + m.
    pub fn total(&self) -> usize {
        self.data_shards + self.parity_shards
    }

    /// Length of every shard for an original of `original_len` bytes.
    pub fn shard_len(&self, original_len: usize) -> usize {
        let per = original_len.div_ceil(self.data_shards).max(1);
        per.div_ceil(SHARD_ALIGN) * SHARD_ALIGN
    }

    /// Length the original is zero-padded to before encoding.
    pub fn padded_len(&self, original_len: usize) -> usize {
        self.shard_len(original_len) * self.data_shards
    }
}

/// One shard of one snapshot, with the checksum computed when it was made.
#[derive(Clone, Debug)]
pub struct Shard {
    pub index: usize,
    pub checksum: [u8; 32],
    pub data: Bytes,
}

/// Checksum of a shard's bytes.
pub fn shard_checksum(data: &[u8]) -> [u8; 32] {
    blake3::hash(data).into()
}

/// Splits `original` into k data + m parity shards. The data shards share the padded buffer
/// (no copy); parity is computed in stripes of `stripe` bytes per shard.
pub fn encode(layout: Layout, original: Bytes, stripe: usize) -> Result<Vec<Shard>> {
    let shard_len = layout.shard_len(original.len());
    let padded = pad(layout, original);
    let parity = encode_parity(layout, &padded, shard_len, stripe)?;
    let data = (0..layout.data_shards).map(|i| padded.slice(i * shard_len..(i + 1) * shard_len));
    Ok(data
        .chain(parity.into_iter().map(Bytes::from))
        .enumerate()
        .map(|(index, data)| Shard {
            index,
            checksum: shard_checksum(&data),
            data,
        })
        .collect())
}

/// The original followed by zeros to k whole shards; no copy when it is that long already.
pub fn pad(layout: Layout, original: Bytes) -> Bytes {
    let padded_len = layout.padded_len(original.len());
    if original.len() == padded_len {
        return original;
    }
    let mut v = Vec::with_capacity(padded_len);
    v.extend_from_slice(&original);
    v.resize(padded_len, 0);
    Bytes::from(v)
}

/// The m parity shards of a padded buffer of k × `shard_len` bytes.
pub fn encode_parity(
    layout: Layout,
    padded: &[u8],
    shard_len: usize,
    stripe: usize,
) -> Result<Vec<Vec<u8>>> {
    let (k, m) = (layout.data_shards, layout.parity_shards);
    if padded.len() != k * shard_len || !shard_len.is_multiple_of(2) {
        return Err(Error::Codec(format!(
            "buffer of {} bytes is not {k} shards of an even {shard_len} bytes",
            padded.len()
        )));
    }
    let mut parity: Vec<Vec<u8>> = (0..m).map(|_| vec![0u8; shard_len]).collect();
    encode_parity_into(layout, padded, shard_len, stripe, &mut parity)?;
    Ok(parity)
}

/// As [`encode_parity`], into m caller-provided buffers of `shard_len` bytes each (recycled
/// ones, whose pages are already mapped).
pub fn encode_parity_into(
    layout: Layout,
    padded: &[u8],
    shard_len: usize,
    stripe: usize,
    parity: &mut [Vec<u8>],
) -> Result<()> {
    encode_stripes(layout, padded, shard_len, stripe, parity, None)
}

/// As [`encode_parity_into`], and returns each parity shard's [`shard_checksum`], hashed
/// stripe by stripe as it is computed (while in cache), not in a second pass over the shard.
pub fn encode_parity_checksummed_into(
    layout: Layout,
    padded: &[u8],
    shard_len: usize,
    stripe: usize,
    parity: &mut [Vec<u8>],
) -> Result<Vec<[u8; 32]>> {
    let mut hashers = vec![blake3::Hasher::new(); layout.parity_shards];
    encode_stripes(
        layout,
        padded,
        shard_len,
        stripe,
        parity,
        Some(&mut hashers),
    )?;
    Ok(hashers.iter().map(|h| h.finalize().into()).collect())
}

fn encode_stripes(
    layout: Layout,
    padded: &[u8],
    shard_len: usize,
    stripe: usize,
    parity: &mut [Vec<u8>],
    mut hashers: Option<&mut [blake3::Hasher]>,
) -> Result<()> {
    let (k, m) = (layout.data_shards, layout.parity_shards);
    if padded.len() != k * shard_len
        || !shard_len.is_multiple_of(2)
        || parity.len() != m
        || parity.iter().any(|p| p.len() != shard_len)
    {
        return Err(Error::Codec(format!(
            "buffer of {} bytes is not {k} shards of an even {shard_len} bytes, or not {m} parity buffers of that length",
            padded.len()
        )));
    }
    let stripe = stripe_len(stripe, shard_len);
    let mut encoder = ReedSolomonEncoder::new(k, m, stripe).map_err(codec_err)?;
    let mut off = 0;
    while off < shard_len {
        let len = stripe.min(shard_len - off);
        encoder.reset(k, m, len).map_err(codec_err)?;
        for i in 0..k {
            let start = i * shard_len + off;
            encoder
                .add_original_shard(&padded[start..start + len])
                .map_err(codec_err)?;
        }
        let result = encoder.encode().map_err(codec_err)?;
        for (j, recovery) in result.recovery_iter().enumerate() {
            parity[j][off..off + len].copy_from_slice(recovery);
            if let Some(hashers) = hashers.as_deref_mut() {
                hashers[j].update(recovery);
            }
        }
        off += len;
    }
    Ok(())
}

/// Rebuilds the original `original_len` bytes from any k intact shards. Shards whose checksum
/// does not match are ignored; fewer than k intact shards is an error.
pub fn decode(
    layout: Layout,
    original_len: usize,
    shards: &[Shard],
    stripe: usize,
) -> Result<Vec<u8>> {
    let (k, m) = (layout.data_shards, layout.parity_shards);
    let shard_len = layout.shard_len(original_len);
    let mut chosen: Vec<Option<&[u8]>> = vec![None; k + m];
    let mut intact = 0;
    for s in shards {
        let usable = s.index < k + m
            && s.data.len() == shard_len
            && chosen[s.index].is_none()
            && shard_checksum(&s.data) == s.checksum;
        if usable && intact < k {
            chosen[s.index] = Some(&s.data);
            intact += 1;
        }
    }
    if intact < k {
        return Err(Error::Codec(format!(
            "{intact} intact shards of the {k} needed (layout {k}+{m}); more than {m} shards are lost or corrupted"
        )));
    }
    let mut out = vec![0u8; k * shard_len];
    let missing: Vec<usize> = (0..k).filter(|&i| chosen[i].is_none()).collect();
    for i in (0..k).filter(|i| chosen[*i].is_some()) {
        out[i * shard_len..(i + 1) * shard_len].copy_from_slice(chosen[i].expect("chosen"));
    }
    if !missing.is_empty() {
        decode_missing(layout, shard_len, &chosen, &mut out, stripe)?;
    }
    out.truncate(original_len);
    Ok(out)
}

fn decode_missing(
    layout: Layout,
    shard_len: usize,
    chosen: &[Option<&[u8]>],
    out: &mut [u8],
    stripe: usize,
) -> Result<()> {
    let (k, m) = (layout.data_shards, layout.parity_shards);
    // Stripes are independent 64-byte-aligned pieces, so decode need not use the encode stripe.
    let stripe = stripe_len(stripe.max(MIN_DECODE_STRIPE), shard_len);
    let mut decoder = ReedSolomonDecoder::new(k, m, stripe).map_err(codec_err)?;
    let mut off = 0;
    while off < shard_len {
        let len = stripe.min(shard_len - off);
        decoder.reset(k, m, len).map_err(codec_err)?;
        for (index, shard) in chosen.iter().enumerate() {
            let Some(shard) = shard else { continue };
            let piece = &shard[off..off + len];
            if index < k {
                decoder.add_original_shard(index, piece)
            } else {
                decoder.add_recovery_shard(index - k, piece)
            }
            .map_err(codec_err)?;
        }
        let result = decoder.decode().map_err(codec_err)?;
        for (index, restored) in result.restored_original_iter() {
            let start = index * shard_len + off;
            out[start..start + len].copy_from_slice(restored);
        }
        off += len;
    }
    Ok(())
}

fn stripe_len(stripe: usize, shard_len: usize) -> usize {
    (stripe.max(SHARD_ALIGN) / SHARD_ALIGN * SHARD_ALIGN).min(shard_len)
}

fn codec_err(e: reed_solomon_simd::Error) -> Error {
    Error::Codec(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(len: usize, seed: u64) -> Bytes {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn a_flipped_byte_in_a_shard_is_skipped_not_decoded() {
        let layout = Layout::new(4, 2).unwrap();
        let original = bytes_of(100_000, 3);
        let mut shards = encode(layout, original.clone(), 4096).unwrap();
        let mut bad = shards[1].data.to_vec();
        bad[77] ^= 1;
        shards[1].data = bad.into();
        // Drop one more so that the corrupted shard would be needed if it were trusted.
        shards.remove(0);
        let out = decode(layout, original.len(), &shards, 4096).unwrap();
        assert_eq!(out, original);
        shards.remove(0); // only 3 intact of 4 needed remain (index 1 is corrupt)
        shards.retain(|s| s.index != 2);
        assert!(decode(layout, original.len(), &shards, 4096).is_err());
    }

    #[test]
    fn parity_hashed_while_encoded_has_the_checksum_of_the_finished_shard() {
        for (k, m, len, stripe) in [(2, 1, 10_000, 1024), (3, 2, 100_003, 4096), (3, 1, 64, 64)] {
            let layout = Layout::new(k, m).unwrap();
            let padded = pad(layout, bytes_of(len, 9));
            let shard_len = layout.shard_len(len);
            let mut parity = vec![vec![7u8; shard_len]; m];
            let checksums =
                encode_parity_checksummed_into(layout, &padded, shard_len, stripe, &mut parity)
                    .unwrap();
            assert_eq!(
                parity,
                encode_parity(layout, &padded, shard_len, stripe).unwrap()
            );
            let separate: Vec<[u8; 32]> = parity.iter().map(|p| shard_checksum(p)).collect();
            assert_eq!(checksums, separate, "{k}+{m} of {len} bytes");
        }
    }

    #[test]
    fn a_truncated_shard_is_skipped() {
        let layout = Layout::new(2, 1).unwrap();
        let original = bytes_of(10_000, 5);
        let mut shards = encode(layout, original.clone(), 1024).unwrap();
        shards[0].data = shards[0].data.slice(..100);
        shards[0].checksum = shard_checksum(&shards[0].data);
        let out = decode(layout, original.len(), &shards, 1024).unwrap();
        assert_eq!(out, original);
        shards.remove(1);
        assert!(decode(layout, original.len(), &shards, 1024).is_err());
    }

    /// Decodes with exactly the given stripe, bypassing `MIN_DECODE_STRIPE`.
    fn decode_missing_with(layout: Layout, len: usize, kept: &[Shard], stripe: usize) -> Vec<u8> {
        let shard_len = layout.shard_len(len);
        let mut chosen: Vec<Option<&[u8]>> = vec![None; layout.total()];
        for s in kept {
            chosen[s.index] = Some(&s.data);
        }
        let mut out = vec![0u8; layout.data_shards * shard_len];
        for (i, c) in chosen.iter().enumerate().take(layout.data_shards) {
            if let Some(c) = c {
                out[i * shard_len..(i + 1) * shard_len].copy_from_slice(c);
            }
        }
        if chosen[..layout.data_shards].iter().any(|c| c.is_none()) {
            let mut off = 0;
            let (k, m) = (layout.data_shards, layout.parity_shards);
            let stripe = stripe_len(stripe, shard_len);
            let mut decoder = ReedSolomonDecoder::new(k, m, stripe).unwrap();
            while off < shard_len {
                let n = stripe.min(shard_len - off);
                decoder.reset(k, m, n).unwrap();
                for (index, shard) in chosen.iter().enumerate() {
                    let Some(shard) = shard else { continue };
                    if index < k {
                        decoder
                            .add_original_shard(index, &shard[off..off + n])
                            .unwrap();
                    } else {
                        decoder
                            .add_recovery_shard(index - k, &shard[off..off + n])
                            .unwrap();
                    }
                }
                for (index, restored) in decoder.decode().unwrap().restored_original_iter() {
                    out[index * shard_len + off..index * shard_len + off + n]
                        .copy_from_slice(restored);
                }
                off += n;
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn rejects_impossible_layouts() {
        assert!(Layout::new(0, 1).is_err());
        assert!(Layout::new(3, 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn any_k_shards_decode_to_the_original(
            k in 1usize..9,
            m in 1usize..5,
            len in 0usize..300_000,
            stripe in prop::sample::select(vec![64usize, 1000, 4096, 65536]),
            decode_stripe in prop::sample::select(vec![64usize, 4096, 300_000]),
            seed in any::<u64>(),
            order in any::<u64>(),
        ) {
            let layout = Layout::new(k, m).unwrap();
            let original = bytes_of(len, seed);
            let shards = encode(layout, original.clone(), stripe).unwrap();
            prop_assert_eq!(shards.len(), k + m);
            // Choose a random loss set of exactly m shards.
            let mut idx: Vec<usize> = (0..k + m).collect();
            let mut x = order | 1;
            for i in (1..idx.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                idx.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let kept: Vec<Shard> = idx[..k].iter().map(|&i| shards[i].clone()).collect();
            let out = decode(layout, len, &kept, decode_stripe).unwrap();
            prop_assert_eq!(&out[..], &original[..]);
            // Decoding is independent of the stripe it runs in.
            let direct = decode_missing_with(layout, len, &kept, decode_stripe);
            prop_assert_eq!(&direct[..], &original[..]);
        }
    }
}
