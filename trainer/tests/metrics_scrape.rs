//! The Prometheus endpoint of a real (tiny) run: after `run_job` on MiniLM + Rotten Tomatoes, a
//! scrape of `/metrics` carries the run's step, loss, samples/s and a non-zero peak memory.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use petl_trainer::cli::load_job;
use petl_trainer::manifest::Manifest;
use petl_trainer::memory::CountingAllocator;
use petl_trainer::run::{RunOptions, run_job};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// The value of an unlabelled sample `name` in exposition text.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn metrics_endpoint_carries_step_loss_throughput_and_peak_memory_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        common::tiny_job(
            "{ type: lst, lst: { reduction: 8 } }",
            0,
            &format!("file://{}", out.display()),
        ),
    )
    .unwrap();
    let (name, spec) = load_job(&job).unwrap();
    let addr = free_port();
    let options = RunOptions {
        metrics_addr: Some(addr),
        ..RunOptions::single(&name)
    };
    let outcome = run_job(&spec, &options).unwrap();

    // The server lives for the process, so the last values of the run stay scrapeable.
    let body = scrape(addr);
    assert_eq!(sample(&body, "petl_trainer_step"), 3.0, "{body}");
    assert_eq!(sample(&body, "petl_trainer_total_steps"), 3.0, "{body}");
    let loss = sample(&body, "petl_trainer_loss");
    assert!(loss.is_finite() && loss > 0.0, "{body}");
    assert!(
        sample(&body, "petl_trainer_samples_per_second") > 0.0,
        "{body}"
    );
    let peak = sample(&body, "petl_trainer_peak_memory_bytes");
    // MiniLM's weights alone are ~90 MB of heap; a step's peak holds them and its activations.
    assert!(
        peak > 50e6,
        "peak memory {peak} is not a live-heap peak\n{body}"
    );

    // The manifest's metrics carry the run's peak and throughput as well.
    assert!(
        outcome.metrics.peak_memory_bytes as f64 >= peak,
        "{:?}",
        outcome.metrics
    );
    let manifest = Manifest::read(&out).unwrap();
    assert_eq!(
        manifest.metrics.peak_memory_bytes,
        outcome.metrics.peak_memory_bytes
    );
    assert!(manifest.metrics.samples_per_second > 0.0);
    assert_eq!(
        manifest.peak_memory_bytes,
        manifest.metrics.peak_memory_bytes
    );
}
