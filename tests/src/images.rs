//! petl's images as a node runs them: their names (tag = the chart's appVersion), and building
//! them from docker/Dockerfile with buildah out of this test build's binaries, as OCI archives.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::cache_dir;
use crate::control_plane::repo_root;
use crate::error::{Error, IoContext, Result};

/// Set to a folder holding the five binaries to build the images from them instead of running
/// `cargo build` (e.g. a release build made elsewhere).
pub const IMAGE_BINARIES_ENV: &str = "PETL_IMAGE_BINARIES";

/// The pod sandbox image every node's containerd runs (`scripts/setup/pause.c`); must match
/// `PAUSE_IMAGE` in `scripts/build-images.sh`.
pub const SANDBOX_IMAGE: &str = "localhost/petl-pause:1.0";

/// Fully qualified names of petl's images (what the chart and pod specs refer to). A kind
/// cluster gets the same names from `tests/e2e/kind.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// The chart's appVersion, the tag of every petl image.
    pub tag: String,
    /// `localhost/petl-operator:TAG`: the operator (non-root, glibc-only base).
    pub operator: String,
    /// `localhost/petl-worker:TAG`: petl-trainer, petl-snapshot-agent and petl (Debian base).
    pub worker: String,
    /// `localhost/petl-probe:TAG`: the tests' probe (`petl-probe api|resolve|serve|connect`).
    pub probe: String,
}

impl Images {
    /// The names, with the tag read from `charts/petl-operator/Chart.yaml`.
    pub fn names() -> Result<Self> {
        let chart = repo_root().join("charts/petl-operator/Chart.yaml");
        let text =
            std::fs::read_to_string(&chart).context(|| format!("reading {}", chart.display()))?;
        let value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| Error::Image {
            message: format!("{}: not YAML: {e}", chart.display()),
        })?;
        let tag = value
            .get("appVersion")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Image {
                message: format!("{}: no appVersion", chart.display()),
            })?
            .to_string();
        Ok(Self {
            operator: format!("localhost/petl-operator:{tag}"),
            worker: format!("localhost/petl-worker:{tag}"),
            probe: format!("localhost/petl-probe:{tag}"),
            tag,
        })
    }
}

/// Builds the binaries (`cargo build`, same profile and target dir as the running test, so
/// usually nothing is left to compile) and the images (`scripts/build-images.sh`, which skips
/// images whose inputs did not change). Returns the OCI archives: the sandbox image first,
/// then operator, worker and probe. Blocking.
pub(crate) fn build() -> Result<Vec<PathBuf>> {
    let binaries = match std::env::var_os(IMAGE_BINARIES_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => cargo_build()?,
    };
    let script = repo_root().join("scripts/build-images.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("--binaries")
        .arg(&binaries)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        return Err(Error::Setup {
            script,
            status: output.status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(PathBuf::from)
        .collect())
}

/// The binaries the images hold, compiled by cargo into the running test's profile folder.
fn cargo_build() -> Result<PathBuf> {
    let (target_dir, profile_dir) = build_dirs()?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => "dev".to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = [
        "build",
        "--profile",
        &profile,
        "--bins",
        "-p",
        "petl-operator",
        "-p",
        "petl-trainer",
        "-p",
        "petl-snapshot",
        "-p",
        "petl-tests",
    ];
    let status = Command::new(&cargo)
        .args(args)
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(repo_root().join("Cargo.toml"))
        .status()
        .context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        return Err(Error::Command {
            command: format!("cargo {}", args.join(" ")),
            status: status.to_string(),
            stderr: "see the compiler's output above".into(),
        });
    }
    Ok(profile_dir)
}

/// (target dir, profile dir) of the running executable: `target/debug/deps/test-HASH` for a
/// test, `target/debug/petl-dev-cluster` for the dev cluster.
fn build_dirs() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context(|| "finding the running executable".to_string())?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let target = dir
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Image {
            message: format!(
                "cannot tell the cargo target dir from {}; set {IMAGE_BINARIES_ENV}",
                exe.display()
            ),
        })?;
    Ok((target, dir))
}

/// Where the archives are kept between runs (`scripts/build-images.sh --out`'s default).
pub fn archive_dir() -> PathBuf {
    cache_dir().join("images/archives")
}
