//! Interoperability with software nobody here wrote, started by the tests on loopback:
//! nginx as an HTTPS upstream (HTTP/2 by ALPN and HTTP/1.1 only), curl as a client, and
//! a WebSocket client and server from tokio-tungstenite.

mod curl;
mod nginx;
pub mod websocket;

use std::path::PathBuf;

/// The path of `program` when it is installed. When it is not: in CI (`CI=true`) the
/// test fails, since CI installs it; on a developer machine the test is skipped with a
/// message saying what to install.
pub fn require(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // nginx lives in sbin, which a non-root PATH often lacks.
    let extra = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
    let found = std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{program} is not installed; .ci/run installs it in CI");
        }
        eprintln!("SKIPPED: {program} is not installed (apt-get install {program})");
    }
    found
}

/// `require` and its kin fail only when `CI=true`: `.ci/run` installs the programs, so it
/// must set that itself (before any cargo command) for runners that do not.
#[test]
fn the_ci_script_sets_ci_so_missing_programs_fail_rather_than_skip() {
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).expect(".ci/run");
    let export = script
        .lines()
        .position(|l| l.trim() == r#"export CI="${CI:-true}""#)
        .expect(".ci/run exports CI=true by default");
    let first_cargo = script
        .lines()
        .position(|l| l.trim_start().starts_with("cargo "))
        .expect("a cargo command");
    assert!(export < first_cargo);
}
