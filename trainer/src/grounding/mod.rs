//! Video grounding with R²-Tuning, built honestly from real images (no video-grounding data can
//! be fetched here): a clip is a sequence of real MNIST frames, the query names a digit in words
//! ("the digit seven"), the target is the span of frames that show it. The frozen DINOv2 ViT-S/14
//! encodes the frames and the frozen MiniLM the query, once; the R² block trains on the cached
//! features.
//!
//! * [`data`]: clips from a split's images, and batches of their cached features;
//! * [`features`]: the frozen encoders' last-`k`-layer tokens;
//! * [`model`]: the R² block over frames with grounding heads;
//! * [`metrics`]: R@1 at IoU 0.5 and 0.7, mAP, and the chance baselines;
//! * [`task`]: the encoders and MNIST loaded from the cached packages and encoded once;
//! * [`train`]: training with AdamW and the held-out evaluation.

pub mod data;
pub mod features;
pub mod metrics;
pub mod model;
pub mod task;
pub mod train;
