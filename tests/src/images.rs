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

/// Builds the binaries (`cargo test --workspace --no-run`, same profile and target dir as the
/// running test, so under `scripts/test` nothing is left to compile) and the images (`scripts/build-images.sh`, which skips
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
///
/// `cargo test --workspace --no-run`, the build `scripts/test` makes before it runs any test:
/// it builds every package's binaries (their integration tests need them) with the features
/// of that build, so under `scripts/test` nothing is left to compile. A narrower build
/// (`cargo build -p ...`) resolves other features for shared dependencies, and cargo then
/// recompiles them both ways on every run.
fn cargo_build() -> Result<PathBuf> {
    let (target_dir, profile_dir) = build_dirs()?;
    let mut args = vec!["test", "--workspace", "--no-run"];
    let profile = profile_dir.file_name().and_then(|n| n.to_str());
    match profile {
        Some("debug") | None => {}
        Some("release") => args.push("--release"),
        Some(other) => args.extend(["--profile", other]),
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Only the environment a shell gives cargo: what cargo sets for a running test
    // (`CARGO_PKG_*`, `LD_LIBRARY_PATH`, ...) would make build scripts that watch the
    // environment (ring's, through `cc`) run again, and everything above them recompile.
    let status = Command::new(&cargo)
        .env_clear()
        .envs(std::env::vars_os().filter(|(name, _)| {
            name.to_str()
                .is_some_and(|name| SHELL_ENV.contains(&name) || name.starts_with("RUSTUP_"))
        }))
        .args(&args)
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

/// The variables the nested cargo keeps (besides `RUSTUP_*`).
const SHELL_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "TERM",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "CARGO_HOME",
    "CARGO_TARGET_DIR",
    "CARGO_TERM_COLOR",
    "CARGO_BUILD_JOBS",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CC",
    "CFLAGS",
    "PETL_CACHE_DIR",
];

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
