//! The command line's handling of job files: clear errors for a missing file, invalid YAML, an
//! unknown field or a wrong kind, and the shipped examples parse as full PetlJob manifests.

use std::path::{Path, PathBuf};
use std::process::Command;

use petl_crds::{MethodType, StorageUri};
use petl_trainer::cli::load_job;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Runs `petl run <file>` and returns (exit code, stderr).
fn petl_run(job: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_petl"))
        .arg("run")
        .arg(job)
        .env("PETL_CACHE_DIR", job.parent().unwrap())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const VALID: &str = r#"
apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: { name: tiny }
spec:
  model: { uri: "file:///nonexistent/model" }
  dataset: { uri: "file:///nonexistent/data.csv", labels: [a, b] }
  method: { type: lst }
  training: { maxSteps: 2 }
  output: { uri: "file:///tmp/petl-never-written" }
"#;

#[test]
fn missing_job_file_says_what_to_give() {
    let (code, stderr) = petl_run(Path::new("/nonexistent/job.yaml"));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/job.yaml: cannot read the job file"),
        "{stderr}"
    );
}

#[test]
fn invalid_yaml_names_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("bad.yaml");
    std::fs::write(&job, "spec: [unclosed\n  model: {").unwrap();
    let (code, stderr) = petl_run(&job);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("bad.yaml: invalid YAML") && stderr.contains("line"),
        "{stderr}"
    );
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("typo.yaml");
    std::fs::write(
        &job,
        VALID.replace("maxSteps: 2", "maxSteps: 2, learningRat: 0.1"),
    )
    .unwrap();
    let err = load_job(&job).unwrap_err().to_string();
    assert!(
        err.contains("unknown field spec.training.learningRat"),
        "{err}"
    );
    let (code, stderr) = petl_run(&job);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("learningRat"), "{stderr}");
}

#[test]
fn wrong_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("pod.yaml");
    std::fs::write(&job, "apiVersion: v1\nkind: Pod\nspec: {}\n").unwrap();
    let err = load_job(&job).unwrap_err().to_string();
    assert!(
        err.contains("expected apiVersion petl.dev/v1alpha1 and kind PetlJob"),
        "{err}"
    );
}

#[test]
fn bare_spec_is_accepted_and_named_after_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("rendered.yaml");
    let spec: serde_yaml::Value = serde_yaml::from_str(VALID).unwrap();
    std::fs::write(&job, serde_yaml::to_string(&spec["spec"]).unwrap()).unwrap();
    let (name, spec) = load_job(&job).unwrap();
    assert_eq!(name, "rendered");
    assert_eq!(spec.training.max_steps, Some(2));
}

#[test]
fn missing_model_fails_before_training_with_exit_code_66() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, VALID).unwrap();
    let (code, stderr) = petl_run(&job);
    assert_eq!(code, 66, "{stderr}");
    assert!(
        stderr.contains("file:///nonexistent/model") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn examples_are_complete_petl_jobs_with_admissible_uris() {
    let files = examples();
    let mut methods: Vec<MethodType> = Vec::new();
    for file in &files {
        let (name, spec) = load_job(file).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            file.to_string_lossy().contains(&name),
            "{name} in {}",
            file.display()
        );
        StorageUri::parse_source("spec.model.uri", &spec.model.uri).unwrap();
        StorageUri::parse_source("spec.dataset.uri", &spec.dataset.uri).unwrap();
        StorageUri::parse_sink("spec.output.uri", &spec.output.uri).unwrap();
        // Exactly the block that matches the type (the CRD's CEL rule).
        assert_eq!(
            spec.method.blocks_present(),
            [spec.method.type_],
            "{}",
            file.display()
        );
        assert!(spec.training.epochs.is_some() != spec.training.max_steps.is_some());
        methods.push(spec.method.type_);
    }
    for &method in MethodType::ALL {
        assert!(methods.contains(&method), "no example for {method:?}");
    }
}
