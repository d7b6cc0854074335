//! In-memory erasure-coded snapshots of training state.
