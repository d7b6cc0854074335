//! The trainer: backbones, methods, data, optimiser, export.
