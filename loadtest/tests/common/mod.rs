//! What the loadtest tests share.

use std::path::PathBuf;
use std::process::Command;

/// The gateway binary next to this package's `loadtest`, built first when it is missing.
pub fn gateway_binary() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
        .parent()
        .unwrap()
        .to_owned();
    let binary = dir.join("gateway");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "gateway", "--bin", "gateway"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo runs").success(),
            "building the gateway failed"
        );
    }
    binary
}
