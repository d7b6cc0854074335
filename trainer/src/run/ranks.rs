//! How this rank finds the others: every rank's trainer address (from `PETL_PEERS` or `petl
//! run`), the job secret that authenticates them, and the deadline for (re)forming the group.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use petl_snapshot::auth::Secret;

use crate::collective::{Collective, Solo, TcpCollective, TcpConfig};
use crate::{Error, Result};

/// The port trainers listen on for their peers when an address does not name one.
pub const DEFAULT_TRAINER_PORT: u16 = 29500;

/// How long forming the group may take by default: pods of one job may start minutes apart,
/// and a replaced rank must load the model before it answers.
pub const DEFAULT_CONNECT_DEADLINE: Duration = Duration::from_secs(180);

/// The other ranks of the job.
#[derive(Clone, Debug)]
pub struct Peers {
    /// `host:port` of every rank's trainer, in rank order (this rank's own included).
    pub addresses: Vec<String>,
    /// File holding the job's secret (at least 16 bytes), shared with the snapshot agents.
    pub secret_file: PathBuf,
    /// How long to wait for every rank when the group is (re)formed; past it the run fails
    /// with a temporary error naming the rank that did not answer.
    pub connect_deadline: Duration,
}

impl Peers {
    /// Parses a comma-separated list of hosts (`job-0.job`, …) or `host:port` entries; a host
    /// without a port gets `port`.
    pub fn addresses_from(list: &str, port: u16) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                if entry.starts_with('[') {
                    if entry.contains("]:") {
                        entry.to_string()
                    } else {
                        format!("{entry}:{port}")
                    }
                } else if entry.matches(':').count() > 1 {
                    // A bare IPv6 address.
                    format!("[{entry}]:{port}")
                } else if entry.contains(':') {
                    entry.to_string()
                } else {
                    format!("{entry}:{port}")
                }
            })
            .collect()
    }
}

/// Forms the group of `world_size` ranks as rank `rank`: one rank alone needs no peers.
pub fn connect(
    rank: usize,
    world_size: usize,
    job: &str,
    peers: Option<&Peers>,
) -> Result<Box<dyn Collective>> {
    if world_size <= 1 {
        return Ok(Box::new(Solo));
    }
    let peers = peers.ok_or_else(|| Error::Config {
        field: "PETL_PEERS".into(),
        message: format!(
            "a world of {world_size} ranks needs every rank's address (--peers or PETL_PEERS) and the job secret (--secret-file or PETL_SNAPSHOT_TOKEN_FILE)"
        ),
    })?;
    if peers.addresses.len() != world_size {
        return Err(Error::Config {
            field: "PETL_PEERS".into(),
            message: format!(
                "{} addresses for a world of {world_size} ranks: give one per rank, in rank order",
                peers.addresses.len()
            ),
        });
    }
    let secret = Secret::from_file(&peers.secret_file)?;
    let mut config = TcpConfig::new(rank, peers.addresses.clone(), job, secret)?;
    config.connect_deadline = peers.connect_deadline;
    // `petl run` gives loopback addresses: listen there, not on every interface.
    if let Ok(own) = peers.addresses[rank].parse::<SocketAddr>()
        && own.ip().is_loopback()
    {
        config.listen = own;
    }
    Ok(Box::new(TcpCollective::connect(config)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_the_trainer_port_and_explicit_ports_stay() {
        assert_eq!(
            Peers::addresses_from("job-0.job, job-1.job:7000,10.0.0.3", 29500),
            ["job-0.job:29500", "job-1.job:7000", "10.0.0.3:29500"]
        );
        assert_eq!(
            Peers::addresses_from("fd00::1,[fd00::2]:9", 29500),
            ["[fd00::1]:29500", "[fd00::2]:9"]
        );
    }
}
