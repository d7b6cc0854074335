//! The node's host-side network: the pod bridge whose gateway address is also the node IP, its
//! CNI configuration, and the iptables chains a node's kubelet and kube-proxy leave behind.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// The pod network's bridge. Host-global: one node per machine at a time (see `lock`).
pub const BRIDGE: &str = "petl0";
/// The node's address: the bridge's gateway address, reachable from the host and from pods.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The pods' subnet on the bridge (host-local IPAM hands out the rest of it).
pub const POD_CIDR: &str = "10.244.0.0/24";
const NODE_IP_PREFIX: u8 = 24;

/// A chain in one table of one address family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct IptablesChain {
    pub(crate) family: IpFamily,
    pub(crate) table: String,
    pub(crate) chain: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum IpFamily {
    V4,
    V6,
}

impl std::fmt::Display for IptablesChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family.command(), self.table, self.chain)
    }
}

impl IpFamily {
    fn command(self) -> &'static str {
        match self {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        }
    }
}

/// Creates the bridge with the node IP as its address, up (without ports its carrier is
/// down, but the address is local and serves the API server, kubelet and CoreDNS at once).
pub(crate) fn create_bridge() -> Result<()> {
    delete_bridge()?;
    let address = format!("{NODE_IP}/{NODE_IP_PREFIX}");
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", &address, "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])
}

/// Removes the bridge if it exists (a node killed with SIGKILL leaves it behind).
pub(crate) fn delete_bridge() -> Result<()> {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        ip(&["link", "delete", BRIDGE])?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(|_| ())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .context(|| format!("running {program} {}", args.join(" ")))?;
    if !output.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every chain named `KUBE-*` in the filter, nat and mangle tables of both families (a family
/// whose tool is missing or refuses, e.g. no IPv6, has none).
pub(crate) fn kube_chains() -> Result<BTreeSet<IptablesChain>> {
    let mut chains = BTreeSet::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        for table in ["filter", "nat", "mangle"] {
            let Ok(listing) = run(family.command(), &["-w", "-t", table, "-S"]) else {
                continue;
            };
            for line in listing.lines() {
                if let Some(chain) = line.strip_prefix("-N ")
                    && chain.starts_with("KUBE-")
                {
                    chains.insert(IptablesChain {
                        family,
                        table: table.to_string(),
                        chain: chain.trim().to_string(),
                    });
                }
            }
        }
    }
    Ok(chains)
}

/// Deletes `chains`: first every rule elsewhere that jumps to one of them, then their rules,
/// then the chains. Returns what failed.
pub(crate) fn delete_chains(chains: &[IptablesChain]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut tables: BTreeSet<(IpFamily, &str)> = BTreeSet::new();
    for c in chains {
        tables.insert((c.family, c.table.as_str()));
    }
    for (family, table) in tables {
        let doomed: BTreeSet<&str> = chains
            .iter()
            .filter(|c| c.family == family && c.table == table)
            .map(|c| c.chain.as_str())
            .collect();
        let listing = match run(family.command(), &["-w", "-t", table, "-S"]) {
            Ok(listing) => listing,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        // `-P CHAIN POLICY` and `-N CHAIN` name the table's chains; rules in the surviving ones
        // that jump to a doomed chain go first, by number, last first so numbers stay valid.
        let survivors = listing.lines().filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("-P" | "-N"), Some(chain)) if !doomed.contains(chain) => Some(chain),
                _ => None,
            }
        });
        for owner in survivors {
            let rules = match run(
                family.command(),
                &["-w", "-t", table, "-L", owner, "-n", "--line-numbers"],
            ) {
                Ok(rules) => rules,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
            // Lines: `num target prot opt source destination ...` after two header lines.
            let mut jumps: Vec<u32> = rules
                .lines()
                .skip(2)
                .filter_map(|line| {
                    let mut words = line.split_whitespace();
                    let number = words.next()?.parse().ok()?;
                    doomed.contains(words.next()?).then_some(number)
                })
                .collect();
            jumps.sort_unstable_by(|a, b| b.cmp(a));
            for number in jumps {
                let number = number.to_string();
                if let Err(e) = run(family.command(), &["-w", "-t", table, "-D", owner, &number]) {
                    problems.push(e.to_string());
                }
            }
        }
        for chain in &doomed {
            if let Err(e) = run(family.command(), &["-w", "-t", table, "-F", chain]) {
                problems.push(e.to_string());
            }
        }
        for chain in &doomed {
            if let Err(e) = run(family.command(), &["-w", "-t", table, "-X", chain]) {
                problems.push(e.to_string());
            }
        }
    }
    problems
}

/// The CNI configuration for containerd: a bridge on [`BRIDGE`] with host-local addresses
/// from [`POD_CIDR`] (its state in `ipam_dir`), the node IP as gateway, no masquerading (pods
/// reach nothing beyond this machine), hairpin mode so a pod reaches itself through a Service.
pub(crate) fn cni_config(ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "petl",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP.to_string()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir,
            },
        }],
    })
}
