//! Prometheus metrics of one agent (prometheus-client): commits, bytes, encode and send
//! latency, shards held, recoveries by tier, rejected frames, durable writes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::protocol::Tier;

/// Label of `petl_snapshot_recoveries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}

/// Label of `petl_snapshot_rejected_frames_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric the agent exports, registered under the `petl_snapshot` prefix.
pub struct Metrics {
    registry: Registry,
    pub generations_committed: Counter,
    pub committed_generation: Gauge,
    pub snapshot_bytes: Gauge,
    pub encode_seconds: Histogram,
    pub send_seconds: Histogram,
    pub shards_held: Gauge,
    pub recoveries: Family<TierLabel, Counter>,
    pub rejected_frames: Family<ReasonLabel, Counter>,
    pub durable_writes: Counter,
    pub durable_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("petl_snapshot");
        let m = Metrics {
            generations_committed: Counter::default(),
            committed_generation: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            encode_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            send_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            shards_held: Gauge::default(),
            recoveries: Family::default(),
            rejected_frames: Family::default(),
            durable_writes: Counter::default(),
            durable_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "generations_committed",
            "Generations of this rank whose every shard was acknowledged",
            m.generations_committed.clone(),
        );
        registry.register(
            "committed_generation",
            "Newest committed generation of this rank",
            m.committed_generation.clone(),
        );
        registry.register(
            "bytes",
            "Size of the newest snapshot handed over by the trainer",
            m.snapshot_bytes.clone(),
        );
        registry.register(
            "encode_seconds",
            "Reed-Solomon encode time of one generation",
            m.encode_seconds.clone(),
        );
        registry.register(
            "send_seconds",
            "Time from encoded to every shard acknowledged",
            m.send_seconds.clone(),
        );
        registry.register(
            "shards_held",
            "Shards of other ranks held in memory",
            m.shards_held.clone(),
        );
        registry.register(
            "recoveries",
            "Restores served, by tier (1 local, 2 peers, 3 durable)",
            m.recoveries.clone(),
        );
        registry.register(
            "rejected_frames",
            "Peer frames or handshakes refused, by reason",
            m.rejected_frames.clone(),
        );
        registry.register(
            "durable_writes",
            "Durable checkpoints written",
            m.durable_writes.clone(),
        );
        registry.register(
            "durable_failures",
            "Durable checkpoint writes that failed",
            m.durable_failures.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn recovered(&self, tier: Tier) {
        self.recoveries
            .get_or_create(&TierLabel {
                tier: tier.number().to_string(),
            })
            .inc();
    }

    pub fn rejected(&self, reason: Refused) {
        self.rejected_frames
            .get_or_create(&ReasonLabel {
                reason: reason.label().to_string(),
            })
            .inc();
    }
}

/// Why peer input was refused: the `reason` label of `petl_snapshot_rejected_frames_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Another job, or no knowledge of the job's secret.
    Auth,
    /// A handshake that broke the protocol or did not finish in time.
    Handshake,
    /// A peer claiming a rank outside the job.
    Rank,
    /// A frame that broke the protocol after authentication.
    Frame,
    /// A frame whose MAC did not match.
    Mac,
    /// A whole frame whose content was refused (a shard failing its digest, a wrong placement).
    Content,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::Auth => "auth",
            Refused::Handshake => "handshake",
            Refused::Rank => "rank",
            Refused::Frame => "frame",
            Refused::Mac => "mac",
            Refused::Content => "content",
        }
    }
}
