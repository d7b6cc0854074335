//! Grounding clips built from real images: a clip is `T` frames, each a real MNIST digit; one
//! contiguous span of frames shows the query's digit (each frame a real image of that class drawn
//! at random), every other frame a digit of another class. Deterministic from a seed.
//!
//! The frames come from one split's images (their indices into that split's frame features), so
//! clips built from the training images and clips built from the held-out images share no image.

use candle_core::{Device, Tensor};

use super::features::{FrameFeatures, QueryFeatures};
use super::metrics::Span;
use crate::init::Rng;
use crate::{Error, Result};

/// How clips are drawn.
#[derive(Clone, Copy, Debug)]
pub struct ClipConfig {
    /// Frames per clip, `T`.
    pub frames: usize,
    /// Shortest and longest span of the query's digit, in frames (both inclusive).
    pub min_span: usize,
    pub max_span: usize,
}

impl Default for ClipConfig {
    /// 16 frames, spans of 2 to 8.
    fn default() -> Self {
        Self {
            frames: 16,
            min_span: 2,
            max_span: 8,
        }
    }
}

/// One clip: its frames (indices into a split's images), the queried digit and where it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clip {
    pub frames: Vec<usize>,
    pub digit: u32,
    /// `[start, end)` in frames.
    pub start: usize,
    pub end: usize,
}

impl Clip {
    pub fn span(&self) -> Span {
        Span::new(self.start as f64, self.end as f64)
    }
}

fn pick(rng: &mut Rng, n: usize) -> usize {
    ((rng.uniform() * n as f64) as usize).min(n - 1)
}

/// `count` clips over images labelled `labels` (digits 0–9), seeded by `seed`. The digit is
/// uniform over the classes present; the span length uniform in `[min_span, max_span]`; its start
/// uniform over the positions where it fits; each frame's image uniform among its class (span
/// frames) or among all images of other classes (the rest).
pub fn make_clips(
    labels: &[u32],
    count: usize,
    config: &ClipConfig,
    seed: u64,
) -> Result<Vec<Clip>> {
    let t = config.frames;
    if config.min_span == 0 || config.min_span > config.max_span || config.max_span >= t {
        return Err(Error::Config {
            field: "grounding clips".into(),
            message: format!(
                "spans of {}..={} frames must be at least 1 and shorter than the clip's {t} \
                 frames (e.g. 2..=8 of 16)",
                config.min_span, config.max_span
            ),
        });
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); 10];
    for (i, &l) in labels.iter().enumerate() {
        let class = by_class.get_mut(l as usize).ok_or_else(|| Error::Data {
            file: "(grounding images)".into(),
            line: None,
            field: "label".into(),
            message: format!("image {i} has label {l}; digits are 0–9"),
        })?;
        class.push(i);
    }
    let present: Vec<u32> = (0..10u32)
        .filter(|&d| !by_class[d as usize].is_empty())
        .collect();
    if present.len() < 2 {
        return Err(Error::Data {
            file: "(grounding images)".into(),
            line: None,
            field: "label".into(),
            message: format!(
                "{} images of {} digit classes; clips need at least two classes",
                labels.len(),
                present.len()
            ),
        });
    }
    let mut rng = Rng::new(seed);
    let mut clips = Vec::with_capacity(count);
    for _ in 0..count {
        let digit = present[pick(&mut rng, present.len())];
        let len = config.min_span + pick(&mut rng, config.max_span - config.min_span + 1);
        let start = pick(&mut rng, t - len + 1);
        let own = &by_class[digit as usize];
        let others: Vec<usize> = present
            .iter()
            .filter(|&&d| d != digit)
            .flat_map(|&d| by_class[d as usize].iter().copied())
            .collect();
        let frames = (0..t)
            .map(|f| {
                if (start..start + len).contains(&f) {
                    own[pick(&mut rng, own.len())]
                } else {
                    others[pick(&mut rng, others.len())]
                }
            })
            .collect();
        clips.push(Clip {
            frames,
            digit,
            start,
            end: start + len,
        });
    }
    Ok(clips)
}

/// A batch of clips as the model reads it.
pub struct ClipBatch {
    /// Per tapped layer, oldest first: the frames' tokens `(B, T, P, C)` (untracked).
    pub video: Vec<Tensor>,
    /// Per tapped layer, oldest first: the query's tokens `(B, L, C)` (untracked).
    pub query: Vec<Tensor>,
    /// The truth spans.
    pub spans: Vec<Span>,
    /// The queried digits (clips with the same digit are each other's positives in the
    /// calibration loss).
    pub digits: Vec<u32>,
    /// Frames per clip.
    pub frames: usize,
}

/// Gathers the cached features of `clips`' frames and queries.
pub fn batch(
    clips: &[&Clip],
    frames: &FrameFeatures,
    queries: &QueryFeatures,
) -> Result<ClipBatch> {
    let t = clips.first().map_or(0, |c| c.frames.len());
    if clips.iter().any(|c| c.frames.len() != t) || t == 0 {
        return Err(Error::Internal(
            "a grounding batch needs clips of one non-zero length".into(),
        ));
    }
    let device = frames
        .layers
        .first()
        .map_or(Device::Cpu, |l| l.device().clone());
    let b = clips.len();
    let frame_ids: Vec<u32> = clips
        .iter()
        .flat_map(|c| c.frames.iter().map(|&f| f as u32))
        .collect();
    let frame_ids = Tensor::from_vec(frame_ids, b * t, &device)?;
    let digits = Tensor::from_vec(clips.iter().map(|c| c.digit).collect(), b, &device)?;
    let video = frames
        .layers
        .iter()
        .map(|l| {
            let (_, p, c) = l.dims3()?;
            Ok(l.index_select(&frame_ids, 0)?.reshape((b, t, p, c))?)
        })
        .collect::<Result<Vec<_>>>()?;
    let query = queries
        .layers
        .iter()
        .map(|l| Ok(l.index_select(&digits, 0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(ClipBatch {
        video,
        query,
        spans: clips.iter().map(|c| c.span()).collect(),
        digits: clips.iter().map(|c| c.digit).collect(),
        frames: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_show_the_digit_exactly_on_their_span() {
        let labels: Vec<u32> = (0..200).map(|i| (i * 7 % 10) as u32).collect();
        let config = ClipConfig::default();
        let clips = make_clips(&labels, 50, &config, 3).unwrap();
        assert_eq!(clips, make_clips(&labels, 50, &config, 3).unwrap());
        let mut lengths = std::collections::BTreeSet::new();
        for c in &clips {
            assert_eq!(c.frames.len(), 16);
            lengths.insert(c.end - c.start);
            for (f, &image) in c.frames.iter().enumerate() {
                let inside = (c.start..c.end).contains(&f);
                assert_eq!(labels[image] == c.digit, inside, "{c:?}");
            }
            let span: std::collections::BTreeSet<usize> =
                c.frames[c.start..c.end].iter().copied().collect();
            assert!(span.len() > 1 || c.end - c.start == 1);
        }
        assert!(lengths.len() >= 5, "span lengths {lengths:?}");
    }
}
