//! The `petl-operator` binary itself (what the operator image runs) starts and describes its
//! flags. Also makes `cargo test --workspace` build it, so the images the node tests build
//! hold this build's operator.

use std::process::Command;

#[test]
fn the_operator_binary_prints_its_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_petl-operator"))
        .arg("--help")
        .output()
        .expect("running petl-operator --help");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in ["--trainer-image", "--worker-metrics-port"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
