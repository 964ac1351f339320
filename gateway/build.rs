//! Names the commit the binary is built from, for `bgw_build_info{commit}`: `BGW_BUILD_COMMIT`
//! when set (a Docker build has no `.git`: pass it as a build argument), else `git rev-parse`,
//! else "unknown" (a build from a source tarball).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BGW_BUILD_COMMIT");
    let commit = std::env::var("BGW_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BGW_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // Build again when HEAD moves: a checkout changes HEAD, a commit changes the branch's ref
    // (loose, or in packed-refs after a gc).
    for path in ["HEAD", "packed-refs"] {
        watch(git(&["rev-parse", "--git-path", path]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    Some(commit)
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn watch(path: Option<String>) {
    if let Some(path) = path.filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}
