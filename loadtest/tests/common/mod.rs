//! What the loadtest tests share: the gateway binary, and the Redis servers and deadline waits
//! of the gateway's own test harness.
// Each test file is a crate of its own that uses its own part of this: what one file leaves
// unused is not dead in the others.
#![allow(dead_code)]

#[path = "../../../gateway/tests/common/redis.rs"]
pub mod redis;
#[path = "../../../gateway/tests/common/wait.rs"]
pub mod wait;

// The same for the re-exports: each file imports what it uses.
#[allow(unused_imports)]
pub use self::{redis::*, wait::*};

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
