//! Where every trainable scalar sits across the ranks: the parameters, in the method's fixed
//! order, flattened into buckets of a few MiB, each bucket cut into one equal piece per rank.
//!
//! Rank `r` owns piece `r` of every bucket: only it keeps those scalars' optimiser moments and
//! only it updates them. A bucket is padded to a multiple of the world size; padding belongs to
//! no parameter and stays zero.

/// Scalars per bucket by default: 4 MiB of f32, one message of a few MiB per collective call.
pub const DEFAULT_BUCKET_ELEMS: usize = 1 << 20;

/// One trainable tensor as the layout sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A run of consecutive scalars of one parameter inside one piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Index into the parameter list.
    pub param: usize,
    /// First scalar of the run in the parameter's flattened values.
    pub param_offset: usize,
    /// First scalar of the run in its piece.
    pub piece_offset: usize,
    pub len: usize,
}

/// One bucket: `world_size` pieces of `piece_len` scalars; piece `r` holds `segments[r]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub piece_len: usize,
    /// Per rank, the segments of its piece in order; they cover a prefix of the piece and the
    /// rest (only in the last pieces of a bucket) is padding.
    pub pieces: Vec<Vec<Segment>>,
}

impl Bucket {
    /// Scalars in the bucket, padding included.
    pub fn padded_len(&self) -> usize {
        self.piece_len * self.pieces.len()
    }
}

/// The whole assignment for one world size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world_size: usize,
    pub bucket_elems: usize,
    pub params: Vec<ParamInfo>,
    pub buckets: Vec<Bucket>,
}

impl Layout {
    /// Lays `params` out for `world_size` ranks in buckets of (at most) `bucket_elems` scalars.
    pub fn new(params: Vec<ParamInfo>, world_size: usize, bucket_elems: usize) -> Layout {
        let world_size = world_size.max(1);
        let bucket_elems = bucket_elems.max(1);
        let total: usize = params.iter().map(ParamInfo::elems).sum();
        // Parameter spans over the flat concatenation: (param, flat start, len).
        let mut spans = Vec::with_capacity(params.len());
        let mut flat = 0;
        for (i, p) in params.iter().enumerate() {
            spans.push((i, flat, p.elems()));
            flat += p.elems();
        }
        let mut buckets = Vec::new();
        let mut start = 0;
        let mut span = 0;
        while start < total {
            let len = bucket_elems.min(total - start);
            let piece_len = len.div_ceil(world_size);
            let mut pieces = vec![Vec::new(); world_size];
            for (rank, piece) in pieces.iter_mut().enumerate() {
                let lo = start + (rank * piece_len).min(len);
                let hi = start + ((rank + 1) * piece_len).min(len);
                let mut at = lo;
                while at < hi {
                    while spans[span].1 + spans[span].2 <= at {
                        span += 1;
                    }
                    let (param, p_start, p_len) = spans[span];
                    let end = hi.min(p_start + p_len);
                    piece.push(Segment {
                        param,
                        param_offset: at - p_start,
                        piece_offset: at - lo,
                        len: end - at,
                    });
                    at = end;
                }
            }
            buckets.push(Bucket { piece_len, pieces });
            start += len;
        }
        Layout {
            world_size,
            bucket_elems,
            params,
            buckets,
        }
    }

    /// Trainable scalars (padding excluded).
    pub fn total_elems(&self) -> usize {
        self.params.iter().map(ParamInfo::elems).sum()
    }

    /// Scalars rank `rank` owns, padding included: the length of its optimiser state.
    pub fn owned_elems(&self, rank: usize) -> usize {
        self.buckets
            .iter()
            .filter(|b| rank < b.pieces.len())
            .map(|b| b.piece_len)
            .sum()
    }

    /// A digest of the parameter names and shapes, the world size and the bucket size: two
    /// ranks (or a rank and a snapshot) with the same fingerprint cut the state identically.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&(self.world_size as u64).to_le_bytes());
        h.update(&(self.bucket_elems as u64).to_le_bytes());
        for p in &self.params {
            h.update(&(p.name.len() as u64).to_le_bytes());
            h.update(p.name.as_bytes());
            h.update(&(p.shape.len() as u64).to_le_bytes());
            for d in &p.shape {
                h.update(&(*d as u64).to_le_bytes());
            }
        }
        h.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sizes: &[usize]) -> Vec<ParamInfo> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ParamInfo {
                name: format!("p{i}"),
                shape: vec![n],
            })
            .collect()
    }

    /// Every scalar of every parameter appears exactly once, at the place the layout says.
    fn check_covers(layout: &Layout) {
        let mut seen: Vec<Vec<u32>> = layout.params.iter().map(|p| vec![0; p.elems()]).collect();
        for bucket in &layout.buckets {
            assert_eq!(bucket.pieces.len(), layout.world_size);
            for piece in &bucket.pieces {
                let mut next = 0;
                for s in piece {
                    assert_eq!(
                        s.piece_offset, next,
                        "segments fill a piece's prefix in order"
                    );
                    next += s.len;
                    for i in 0..s.len {
                        seen[s.param][s.param_offset + i] += 1;
                    }
                }
                assert!(next <= bucket.piece_len);
            }
        }
        assert!(seen.iter().flatten().all(|&n| n == 1), "{seen:?}");
    }

    #[test]
    fn every_scalar_has_exactly_one_owner() {
        for world in [1, 2, 3, 4, 7] {
            for bucket in [1, 5, 16, 1000] {
                let layout = Layout::new(params(&[7, 1, 30, 4, 13]), world, bucket);
                check_covers(&layout);
                assert_eq!(layout.total_elems(), 55);
            }
        }
    }

    #[test]
    fn buckets_are_padded_to_equal_pieces_and_owned_state_falls_as_one_over_n() {
        let layout = Layout::new(params(&[10, 10]), 3, 8);
        // 20 scalars → buckets of 8, 8, 4 → pieces of 3, 3, 2.
        let lens: Vec<usize> = layout.buckets.iter().map(|b| b.piece_len).collect();
        assert_eq!(lens, [3, 3, 2]);
        assert_eq!(layout.buckets[0].padded_len(), 9);
        // The last piece of the first bucket holds 2 scalars and one of padding.
        let last: usize = layout.buckets[0].pieces[2].iter().map(|s| s.len).sum();
        assert_eq!(last, 2);
        let big = Layout::new(params(&[1 << 20, 3 << 18]), 4, DEFAULT_BUCKET_ELEMS);
        let one = Layout::new(params(&[1 << 20, 3 << 18]), 1, DEFAULT_BUCKET_ELEMS);
        assert_eq!(big.owned_elems(0) * 4, one.owned_elems(0));
        assert_eq!(big.owned_elems(3), big.owned_elems(0));
    }

    #[test]
    fn a_parameter_crossing_a_piece_boundary_splits_into_two_segments() {
        let layout = Layout::new(params(&[5]), 2, 1024);
        let bucket = &layout.buckets[0];
        assert_eq!(bucket.piece_len, 3);
        assert_eq!(
            bucket.pieces[1],
            [Segment {
                param: 0,
                param_offset: 3,
                piece_offset: 0,
                len: 2
            }]
        );
    }

    #[test]
    fn fingerprint_changes_with_world_size_names_and_shapes() {
        let a = Layout::new(params(&[4, 4]), 2, 16).fingerprint();
        assert_eq!(a, Layout::new(params(&[4, 4]), 2, 16).fingerprint());
        assert_ne!(a, Layout::new(params(&[4, 4]), 4, 16).fingerprint());
        assert_ne!(a, Layout::new(params(&[4, 5]), 2, 16).fingerprint());
        let mut renamed = params(&[4, 4]);
        renamed[1].name = "other".into();
        assert_ne!(a, Layout::new(renamed, 2, 16).fingerprint());
    }
}
