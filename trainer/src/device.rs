//! Which device a run trains on: `--device` / `PETL_DEVICE` (`auto`, `cpu`, `cuda`, `cuda:N`).
//! `auto` takes the first CUDA GPU in a `--features cuda` build when one answers, else the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use tracing::{info, warn};

use crate::{Error, Result};

/// How many times candle's CPU pool workers spin, waiting for the next parallel op, before they
/// sleep (candle's default is 25,000).
const CPU_POOL_SPIN_LIMIT: &str = "200";

/// Sets petl's defaults for candle's CPU thread pool, leaving whatever the user set.
///
/// After each parallel element-wise op candle's pool workers spin before they sleep. gemm runs
/// on rayon's threads, not candle's, so on a node with few cores a spinning worker takes a core
/// from the matrix product that follows. With 200 spins instead of 25,000 the bench's full
/// fine-tuning step fell from 0.94 s to 0.84 s on 2 cores (mean of four runs each, see
/// bench/README.md).
///
/// # Safety
/// Sets an environment variable: call it first thing in `main`, before any other thread exists.
pub unsafe fn set_cpu_pool_defaults() {
    const KEY: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(KEY).is_none() {
        // SAFETY: the caller guarantees no other thread reads or writes the environment.
        unsafe { std::env::set_var(KEY, CPU_POOL_SPIN_LIMIT) };
    }
}

/// The device asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A CUDA GPU when this build has CUDA and a GPU answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA GPU by ordinal; an error when there is none.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Open the chosen device.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(ordinal) => cuda(ordinal).map_err(|reason| Error::Config {
            field: "--device (PETL_DEVICE)".into(),
            message: format!(
                "cuda:{ordinal} is not usable: {reason}; use --device cpu, or run a `--features cuda` build on a GPU node"
            ),
        })?,
        DeviceChoice::Auto => match cuda(0) {
            Ok(device) => device,
            Err(reason) => {
                if cfg!(feature = "cuda") {
                    warn!(%reason, "no usable CUDA GPU; training on the CPU");
                }
                Device::Cpu
            }
        },
    };
    info!(device = ?device.location(), "training device");
    Ok(device)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> std::result::Result<Device, String> {
    // candle appends a backtrace to driver errors; the first line is the reason.
    Device::new_cuda(ordinal)
        .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this build has no CUDA support (built without `--features cuda`)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_names_the_valid_ones() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        let err = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("auto, cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_and_cpu_open_a_device_here() {
        assert!(open(DeviceChoice::Cpu).unwrap().is_cpu());
        // A CPU build (or a CUDA build without a GPU) falls back to the CPU.
        if !cfg!(feature = "cuda") {
            assert!(open(DeviceChoice::Auto).unwrap().is_cpu());
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn asking_for_cuda_in_a_cpu_build_names_the_flag_and_the_fix() {
        let err = open(DeviceChoice::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("--device"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
}
