//! `petl run` of one job on several ranks (real processes on loopback, the real MiniLM): the same
//! job and world size write the same adapter bytes every run, and the loss curve follows the one
//! a single rank draws with the same global batch.

mod common;

use common::{Run, parallel_job, petl_run};

const LST: &str = "{ type: lst, lst: { reduction: 8 } }";
/// With dropout, so the masks' independence of the rank is part of the comparison.
const LORA: &str =
    "{ type: lora, lora: { rank: 2, alpha: 4, dropout: 0.1, targetModules: [query, value] } }";
const STEPS: u32 = 6;

/// One run of `method` on `replicas` ranks in a fresh directory.
fn run(method: &str, replicas: u32) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let yaml = parallel_job(method, replicas, STEPS, "{ everySteps: 1 }", "out");
    let run = petl_run(dir.path(), &yaml, &[]);
    assert_eq!(run.code, 0, "{replicas} ranks failed:\n{}", run.stderr);
    assert_eq!(run.losses.len(), STEPS as usize, "{}", run.stderr);
    run
}

/// The curves agree step for step within float tolerance (summation order differs).
fn assert_same_curve(parallel: &Run, alone: &Run, what: &str) {
    for ((step, a), (_, b)) in parallel.losses.iter().zip(&alone.losses) {
        assert!(
            (a - b).abs() < 2e-4 * b.abs().max(1.0),
            "{what}: step {step} loss {a} vs one rank's {b}"
        );
    }
}

#[test]
fn two_lst_ranks_write_the_same_bytes_every_run_and_follow_one_rank() {
    let first = run(LST, 2);
    let second = run(LST, 2);
    assert!(!first.adapter.is_empty());
    assert!(
        first.adapter == second.adapter,
        "two runs of 2 LST ranks differ"
    );
    assert_same_curve(&first, &run(LST, 1), "LST on 2 ranks");
    let manifest = first.manifest.unwrap();
    assert_eq!(manifest.metrics.steps, u64::from(STEPS));
    assert!(manifest.recoveries.is_empty());
}

#[test]
fn four_lst_ranks_write_the_same_bytes_every_run_and_follow_one_rank() {
    let first = run(LST, 4);
    let second = run(LST, 4);
    assert!(
        first.adapter == second.adapter,
        "two runs of 4 LST ranks differ"
    );
    assert_same_curve(&first, &run(LST, 1), "LST on 4 ranks");
}

#[test]
fn two_lora_ranks_with_dropout_write_the_same_bytes_every_run_and_follow_one_rank() {
    let first = run(LORA, 2);
    let second = run(LORA, 2);
    assert!(
        first.adapter == second.adapter,
        "two runs of 2 LoRA ranks differ"
    );
    assert_same_curve(&first, &run(LORA, 1), "LoRA on 2 ranks");
}

/// A rank whose peer never comes exits with EX_TEMPFAIL (75, so the operator retries it) once the
/// connect deadline passes, and its error names the rank and the address it waited for.
#[test]
fn a_rank_that_cannot_reach_its_peer_exits_75_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, parallel_job(LST, 2, 1, "{ everySteps: 1 }", "out")).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    // This rank listens on a port that was free a moment ago. Its peer's port stays bound here
    // without listening, so dialling it is refused and no other process (another test's
    // `petl run` picking free ports) is given it while this rank waits: a port merely free a
    // moment ago once went to another job's rank, which this rank then refused by its secret.
    let own = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    held.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let absent = held.local_addr().unwrap().as_socket().unwrap().to_string();
    let started = std::time::Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_petl"))
        .args(["train", "--config"])
        .arg(&job)
        .args(["--rank", "0", "--world-size", "2", "--no-snapshots"])
        .args(["--peers", &format!("127.0.0.1:{own},{absent}")])
        .arg("--secret-file")
        .arg(&secret)
        .args(["--connect-timeout", "2", "--log-format", "json", "--output"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    let error = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "run failed")
        .unwrap_or_else(|| panic!("no `run failed` line:\n{stderr}"));
    assert_eq!(error["fields"]["exit_code"], 75);
    let text = error["fields"]["error"].as_str().unwrap();
    assert!(text.contains("rank 1") && text.contains(&absent), "{text}");
    // One deadline, not one per retry (loading the model takes some of it).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(!dir.path().join("out/adapter_model.safetensors").exists());
    drop(held);
}

/// The processes whose command line mentions `dir` (the job's trainers and agents name files in it).
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

/// Ctrl-C on `petl run` of several ranks stops every trainer and agent it started and exits
/// 128 + SIGINT, leaving no adapter.
#[test]
fn ctrl_c_stops_every_rank_and_agent() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        parallel_job(LST, 2, 10_000, "{ everySteps: 1 }", "out"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_petl"))
        .arg("run")
        .arg(&job)
        .args(["--log-format", "json", "--output"])
        .arg(dir.path().join("out"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Wait for a step: every process is up and the ranks are training together.
    for line in lines.by_ref().map_while(|l| l.ok()) {
        let stepped = serde_json::from_str::<serde_json::Value>(&line)
            .is_ok_and(|v| v["fields"]["message"] == "step");
        seen.push(line);
        if stepped {
            break;
        }
    }
    // The launcher, two trainers and two agents.
    assert_eq!(processes_under(dir.path()).len(), 5, "{}", seen.join("\n"));
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{}", rest.join("\n"));
    assert!(
        processes_under(dir.path()).is_empty(),
        "{:?}",
        processes_under(dir.path())
    );
    assert!(!dir.path().join("out/adapter_model.safetensors").exists());
}
