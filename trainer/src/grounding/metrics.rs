//! Moment-retrieval metrics as QVHighlights reports them (Moment-DETR's `standalone_eval`), for
//! clips with one ground-truth span each.
//!
//! * **R@1 at IoU θ**: the share of queries whose top-ranked predicted span overlaps the truth
//!   with temporal IoU ≥ θ.
//! * **mAP**: for each θ in 0.50, 0.55, …, 0.95, the average precision of every query's ranked
//!   predictions (at most [`MAX_PREDICTIONS`]) is computed as ActivityNet's
//!   `compute_average_precision_detection` does (greedy matching in rank order, a span matched to
//!   an already-matched truth counts as a false positive, precision interpolated to be monotone),
//!   averaged over queries, then over the ten thresholds. With one truth span this AP is exactly
//!   `1 / rank` of the first prediction with IoU ≥ θ, and 0 when none has.
//!
//! Spans are half-open intervals `[start, end)` in frame units.

/// Predictions kept per query for mAP (Moment-DETR's `max_pred_windows`).
pub const MAX_PREDICTIONS: usize = 10;

/// The IoU thresholds mAP averages over: 0.50, 0.55, …, 0.95.
pub fn map_thresholds() -> Vec<f64> {
    (0..10).map(|i| 0.5 + 0.05 * i as f64).collect()
}

/// A span `[start, end)` in frames.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    pub start: f64,
    pub end: f64,
}

impl Span {
    pub fn new(start: f64, end: f64) -> Self {
        Self { start, end }
    }
}

/// A predicted span and its confidence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    pub span: Span,
    pub score: f64,
}

/// Temporal intersection over union; 0 for two empty spans.
pub fn iou(a: Span, b: Span) -> f64 {
    let inter = (a.end.min(b.end) - a.start.max(b.start)).max(0.0);
    let union = (a.end - a.start).max(0.0) + (b.end - b.start).max(0.0) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Greedy non-maximum suppression: sorts by score (highest first), drops every span whose IoU
/// with a kept one is ≥ `threshold`, keeps at most `max`.
pub fn nms(mut spans: Vec<Scored>, threshold: f64, max: usize) -> Vec<Scored> {
    spans.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Scored> = Vec::new();
    for s in spans {
        if kept.len() == max {
            break;
        }
        if kept.iter().all(|k| iou(k.span, s.span) < threshold) {
            kept.push(s);
        }
    }
    kept
}

/// R@1 at `threshold`: the share of queries whose first prediction has IoU ≥ `threshold` with its
/// truth. `predictions[i]` is ranked (best first); an empty ranking counts as a miss.
pub fn recall_at_1(predictions: &[Vec<Scored>], truth: &[Span], threshold: f64) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let hits = predictions
        .iter()
        .zip(truth)
        .filter(|(p, t)| p.first().is_some_and(|s| iou(s.span, **t) >= threshold))
        .count();
    hits as f64 / truth.len() as f64
}

/// Average precision of one query's ranked predictions against its truth spans at `threshold`
/// (ActivityNet's detection AP: greedy matching, interpolated precision).
pub fn average_precision(ranked: &[Scored], truth: &[Span], threshold: f64) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let mut matched = vec![false; truth.len()];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut curve: Vec<(f64, f64)> = Vec::with_capacity(ranked.len());
    for p in ranked {
        // The unmatched truth with the highest IoU above the threshold, if any.
        let best = truth
            .iter()
            .enumerate()
            .filter(|(j, t)| !matched[*j] && iou(p.span, **t) >= threshold)
            .max_by(|a, b| iou(p.span, *a.1).total_cmp(&iou(p.span, *b.1)));
        match best {
            Some((j, _)) => {
                matched[j] = true;
                tp += 1;
            }
            None => fp += 1,
        }
        curve.push((tp as f64 / truth.len() as f64, tp as f64 / (tp + fp) as f64));
    }
    // VOC-style interpolation over the recall steps.
    let mut recall = vec![0.0];
    let mut precision = vec![0.0];
    for (r, p) in curve {
        recall.push(r);
        precision.push(p);
    }
    recall.push(1.0);
    precision.push(0.0);
    for i in (0..precision.len() - 1).rev() {
        precision[i] = precision[i].max(precision[i + 1]);
    }
    (1..recall.len())
        .filter(|&i| recall[i] != recall[i - 1])
        .map(|i| (recall[i] - recall[i - 1]) * precision[i])
        .sum()
}

/// mAP over [`map_thresholds`]: per threshold the mean over queries of
/// [`average_precision`] of the first [`MAX_PREDICTIONS`] predictions, then the mean over
/// thresholds.
pub fn mean_average_precision(predictions: &[Vec<Scored>], truth: &[Span]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let thresholds = map_thresholds();
    let per_threshold: f64 = thresholds
        .iter()
        .map(|&th| {
            predictions
                .iter()
                .zip(truth)
                .map(|(p, t)| {
                    let n = p.len().min(MAX_PREDICTIONS);
                    average_precision(&p[..n], std::slice::from_ref(t), th)
                })
                .sum::<f64>()
                / truth.len() as f64
        })
        .sum();
    per_threshold / thresholds.len() as f64
}

/// The three numbers a grounding run reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scores {
    pub r1_at_05: f64,
    pub r1_at_07: f64,
    pub map: f64,
}

/// R@1 at IoU 0.5 and 0.7 and mAP of ranked predictions.
pub fn scores(predictions: &[Vec<Scored>], truth: &[Span]) -> Scores {
    Scores {
        r1_at_05: recall_at_1(predictions, truth, 0.5),
        r1_at_07: recall_at_1(predictions, truth, 0.7),
        map: mean_average_precision(predictions, truth),
    }
}

/// The expected scores of one span drawn uniformly from all `t(t+1)/2` integer spans of a
/// `t`-frame clip (chance): exact, by enumeration. A single prediction's AP is 1 on a hit and 0
/// otherwise, so its mAP is the mean hit rate over the thresholds.
pub fn uniform_span_scores(truth: &[Span], t: usize) -> Scores {
    let all: Vec<Span> = (0..t)
        .flat_map(|s| (s + 1..=t).map(move |e| Span::new(s as f64, e as f64)))
        .collect();
    let mut total = Scores::default();
    for span in &all {
        let ranked: Vec<Vec<Scored>> = truth
            .iter()
            .map(|_| {
                vec![Scored {
                    span: *span,
                    score: 1.0,
                }]
            })
            .collect();
        let s = scores(&ranked, truth);
        total.r1_at_05 += s.r1_at_05;
        total.r1_at_07 += s.r1_at_07;
        total.map += s.map;
    }
    let n = all.len() as f64;
    Scores {
        r1_at_05: total.r1_at_05 / n,
        r1_at_07: total.r1_at_07 / n,
        map: total.map / n,
    }
}

/// The one fixed span of a `t`-frame clip with the highest R@1 at IoU 0.5 on `train` (ties:
/// the first in start, end order): the best a predictor that ignores the clip and the query can
/// learn from the training spans' positions and lengths.
pub fn best_fixed_span(train: &[Span], t: usize) -> Span {
    let mut best = (Span::new(0.0, t as f64), -1.0);
    for s in 0..t {
        for e in s + 1..=t {
            let span = Span::new(s as f64, e as f64);
            let hits = train.iter().filter(|g| iou(span, **g) >= 0.5).count() as f64;
            if hits > best.1 {
                best = (span, hits);
            }
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(start: f64, end: f64, score: f64) -> Scored {
        Scored {
            span: Span::new(start, end),
            score,
        }
    }

    #[test]
    fn iou_of_hand_made_spans() {
        assert_eq!(iou(Span::new(0.0, 4.0), Span::new(2.0, 6.0)), 2.0 / 6.0);
        assert_eq!(iou(Span::new(0.0, 4.0), Span::new(0.0, 4.0)), 1.0);
        assert_eq!(iou(Span::new(0.0, 2.0), Span::new(2.0, 4.0)), 0.0);
        assert_eq!(iou(Span::new(1.0, 3.0), Span::new(0.0, 8.0)), 0.25);
    }

    #[test]
    fn recall_at_one_reads_only_the_first_prediction() {
        let truth = [Span::new(1.0, 6.0), Span::new(0.0, 4.0)];
        let predictions = vec![
            // IoU 3/5 = 0.6 first: a hit at 0.5, a miss at 0.7.
            vec![scored(3.0, 6.0, 0.9), scored(0.0, 1.0, 0.5)],
            // A miss first, the exact span second.
            vec![scored(8.0, 9.0, 0.9), scored(0.0, 4.0, 0.8)],
        ];
        assert_eq!(recall_at_1(&predictions, &truth, 0.5), 0.5);
        assert_eq!(recall_at_1(&predictions, &truth, 0.7), 0.0);
    }

    #[test]
    fn average_precision_with_one_truth_is_one_over_the_first_hits_rank() {
        let truth = [Span::new(4.0, 8.0)];
        let ranked = [
            scored(0.0, 2.0, 0.9),
            scored(4.0, 7.0, 0.8), // IoU 0.75
            scored(4.0, 8.0, 0.7), // a duplicate hit: a false positive
        ];
        assert!((average_precision(&ranked, &truth, 0.5) - 0.5).abs() < 1e-12);
        assert!((average_precision(&ranked, &truth, 0.8) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(average_precision(&ranked[..1], &truth, 0.5), 0.0);
        // Two truths, found at ranks 1 and 3: (1/2)·1 + (1/2)·(2/3).
        let two = [Span::new(0.0, 2.0), Span::new(4.0, 8.0)];
        let ap = average_precision(&ranked, &two, 0.9);
        assert!((ap - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12, "{ap}");
    }

    #[test]
    fn map_averages_the_ten_thresholds_and_the_queries() {
        // IoU 0.775: a hit at 0.50 … 0.75 (six thresholds) at rank 1, at none above.
        let truth = [Span::new(4.0, 8.0), Span::new(0.0, 2.0)];
        let predictions = vec![
            vec![scored(4.0, 7.1, 0.9)],
            vec![scored(5.0, 6.0, 0.9), scored(0.0, 2.0, 0.1)],
        ];
        let expected = (6.0 / 10.0 + 0.5) / 2.0;
        let map = mean_average_precision(&predictions, &truth);
        assert!((map - expected).abs() < 1e-12, "{map} vs {expected}");
    }

    #[test]
    fn nms_drops_overlapping_lower_scores_and_caps_the_count() {
        let kept = nms(
            vec![
                scored(0.0, 4.0, 0.5),
                scored(0.0, 5.0, 0.9),
                scored(6.0, 8.0, 0.7),
                scored(9.0, 10.0, 0.1),
            ],
            0.7,
            2,
        );
        assert_eq!(kept, vec![scored(0.0, 5.0, 0.9), scored(6.0, 8.0, 0.7)]);
    }

    #[test]
    fn chance_and_the_best_fixed_span() {
        // A 2-frame clip has spans [0,1), [1,2), [0,2); truth [0,1): IoU 1, 0, 0.5.
        let s = uniform_span_scores(&[Span::new(0.0, 1.0)], 2);
        assert!((s.r1_at_05 - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.r1_at_07 - 1.0 / 3.0).abs() < 1e-12);
        // [1, 4) is the first span (in start, end order) with IoU ≥ 0.5 on two of the three:
        // 2/3 with [2, 4) and 1/2 with [2, 5).
        let train = [
            Span::new(2.0, 4.0),
            Span::new(2.0, 5.0),
            Span::new(0.0, 1.0),
        ];
        assert_eq!(best_fixed_span(&train, 6), Span::new(1.0, 4.0));
    }
}
