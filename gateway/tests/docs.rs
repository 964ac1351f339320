//! The docs say what the binary does: the README's configuration table is `gateway --help`, the
//! protocol reference (`shared/PROTOCOL.md`) names every frame, error and close code of the
//! `shared` crate, the admin API reference (`gateway/ADMIN-API.md`) every route of the admin
//! listener, and the README the Rust version the workspace needs, how to run the release
//! binary, and a tour of the code through files that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use shared::{ClientFrame, CloseCode, ErrorCode, ServerFrame};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// One flag of `gateway --help`: its environment variable and default, where it has them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// The flags of `gateway serve --help`, run without any `BGW_` variable.
fn help_flags() -> BTreeMap<String, Flag> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BGW_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(["serve", "--help"])
        .output()
        .expect("run gateway");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    // Each flag starts a block (`      --listen <LISTEN>`); its text follows, indented further.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if (trimmed.starts_with("--") || trimmed.starts_with('-')) && indent <= 6 {
            let name = trimmed
                .split([' ', ','])
                .find(|word| word.starts_with("--"))
                .unwrap_or(trimmed)
                .to_owned();
            blocks.push((name, String::new()));
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    let field = |text: &str, name: &str| {
        let start = text.find(&format!("[{name}: "))? + name.len() + 3;
        let end = start + text[start..].find(']')?;
        Some(text[start..end].to_owned())
    };
    blocks
        .into_iter()
        .filter(|(name, _)| name != "--help" && name != "--version")
        .map(|(name, text)| {
            let env = field(&text, "env").map(|e| e.trim_end_matches('=').to_owned());
            (
                name,
                Flag {
                    env,
                    default: field(&text, "default"),
                },
            )
        })
        .collect()
}

/// The rows of the README's configuration table: flag, environment, default.
fn readme_flags() -> BTreeMap<String, (String, String)> {
    read("README.md")
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let unquote = |cell: &str| {
                cell.trim_matches(|c| c == '|' || c == ' ' || c == '`')
                    .to_owned()
            };
            (
                unquote(cells[0]),
                (unquote(cells[1]), cells[2].trim().to_owned()),
            )
        })
        .collect()
}

#[test]
fn the_configuration_table_is_gateway_help() {
    let help = help_flags();
    let readme = readme_flags();
    assert!(help.len() > 20, "flags of --help: {help:?}");
    let in_help: BTreeSet<&String> = help.keys().collect();
    let in_readme: BTreeSet<&String> = readme.keys().collect();
    assert_eq!(in_readme, in_help, "README rows against gateway --help");
    for (flag, Flag { env, default }) in &help {
        let (readme_env, readme_default) = &readme[flag];
        assert_eq!(
            Some(readme_env),
            env.as_ref(),
            "{flag}: environment variable"
        );
        if let Some(default) = default {
            assert_eq!(readme_default, &format!("`{default}`"), "{flag}: default");
        }
    }
}

#[test]
fn the_readme_points_at_both_references_which_exist() {
    let readme = read("README.md");
    for reference in ["shared/PROTOCOL.md", "gateway/ADMIN-API.md"] {
        assert!(
            readme.contains(&format!("]({reference})")),
            "a link to {reference}"
        );
        assert!(read(reference).len() > 2000, "{reference} is a reference");
    }
    assert!(
        read("gateway/ADMIN-API.md").contains("](METRICS.md)"),
        "the admin API links the metrics reference"
    );
}

/// "How a message travels" follows a message through the source files: a file moved or split
/// must be renamed there too.
#[test]
fn the_readme_tour_of_the_code_names_files_that_exist() {
    let readme = read("README.md");
    let start = readme
        .find("## How a message travels")
        .expect("the README has its tour of the code");
    let section = &readme[start + 3..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let paths: Vec<&str> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| quoted.ends_with(".rs") || quoted.ends_with('/'))
        .collect();
    assert!(paths.len() >= 10, "the tour names only {paths:?}");
    for path in paths {
        let full = match path.strip_prefix("gateway/src/") {
            Some(inside) => sources.join(inside),
            None => sources.join(path),
        };
        assert!(
            full.exists(),
            "the README's tour names {path}, which is not in gateway/src"
        );
    }
}

/// A variant added to a frame enum fails to compile here until the reference names it.
fn client_type(frame: &ClientFrame) -> &'static str {
    match frame {
        ClientFrame::Hello { .. } => "hello",
        ClientFrame::Subscribe { .. } => "subscribe",
        ClientFrame::Unsubscribe { .. } => "unsubscribe",
        ClientFrame::Publish { .. } => "publish",
        ClientFrame::Ping { .. } => "ping",
        ClientFrame::Refresh { .. } => "refresh",
    }
}

fn server_type(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome { .. } => "welcome",
        ServerFrame::Subscribed { .. } => "subscribed",
        ServerFrame::Unsubscribed { .. } => "unsubscribed",
        ServerFrame::Message { .. } => "message",
        ServerFrame::Published { .. } => "published",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Refreshed { .. } => "refreshed",
        ServerFrame::Error { .. } => "error",
        ServerFrame::Join(_) => "join",
        ServerFrame::Leave(_) => "leave",
    }
}

fn error_code(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest
        | ErrorCode::Unauthorized
        | ErrorCode::Forbidden
        | ErrorCode::NotSubscribed
        | ErrorCode::TooLarge
        | ErrorCode::TooMany
        | ErrorCode::Unavailable => code as u16,
    }
}

#[test]
fn the_protocol_reference_names_every_frame_error_and_close_code() {
    let protocol = read("shared/PROTOCOL.md");
    let client = [
        "hello",
        "subscribe",
        "unsubscribe",
        "publish",
        "ping",
        "refresh",
    ];
    let server = [
        "welcome",
        "subscribed",
        "unsubscribed",
        "message",
        "published",
        "pong",
        "refreshed",
        "error",
        "join",
        "leave",
    ];
    for kind in client.iter().chain(&server) {
        assert!(
            protocol.contains(&format!("| `{kind}` |")),
            "frame `{kind}`"
        );
    }
    // The lists above are the enums' variants.
    for (kind, json) in [
        ("hello", r#"{"type":"hello"}"#),
        ("subscribe", r#"{"type":"subscribe","channel":"a"}"#),
        ("unsubscribe", r#"{"type":"unsubscribe","channel":"a"}"#),
        ("publish", r#"{"type":"publish","channel":"a","data":1}"#),
        ("ping", r#"{"type":"ping"}"#),
        ("refresh", r#"{"type":"refresh","token":"t"}"#),
    ] {
        let frame = ClientFrame::parse(json).expect("a client frame");
        assert_eq!(client_type(&frame), kind);
        assert!(client.contains(&kind));
    }
    let pong = ServerFrame::Pong { id: None };
    let error = ServerFrame::error(None, ErrorCode::BadRequest, "x");
    for frame in [pong, error] {
        assert!(server.contains(&server_type(&frame)));
    }
    for code in [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotSubscribed,
        ErrorCode::TooLarge,
        ErrorCode::TooMany,
        ErrorCode::Unavailable,
    ] {
        let code = error_code(code);
        assert!(protocol.contains(&format!("\n| {code} |")), "error {code}");
    }
    let closes: Vec<u16> = (1000..5000)
        .filter_map(CloseCode::from_code)
        .map(CloseCode::code)
        .collect();
    assert!(closes.len() >= 13, "{closes:?}");
    for code in closes {
        assert!(protocol.contains(&format!("\n| {code} |")), "close {code}");
    }
}

#[test]
fn the_admin_reference_names_every_route() {
    let admin = read("gateway/ADMIN-API.md");
    let source = read("gateway/src/admin/mod.rs");
    // `(&Method::GET, "/healthz") =>`: every route of the admin listener.
    let routes: Vec<(String, String)> = source
        .split("(&Method::")
        .skip(1)
        .filter_map(|rest| {
            let (method, rest) = rest.split_once(", \"")?;
            let (path, _) = rest.split_once('"')?;
            Some((method.to_owned(), path.to_owned()))
        })
        .collect();
    assert!(routes.len() >= 5, "{routes:?}");
    for (method, path) in routes {
        assert!(
            admin.contains(&format!("## `{method} {path}`")),
            "a section for {method} {path}"
        );
    }
}

#[test]
fn the_readme_runs_the_release_binary_and_names_the_rust_version() {
    let readme = read("README.md");
    for line in readme.lines().filter(|line| line.contains("cargo run")) {
        assert!(
            line.contains("--release"),
            "a debug build just to run the gateway: {line}"
        );
    }
    assert!(
        readme.contains("cargo install --path gateway"),
        "how to install it"
    );

    let manifest = read("Cargo.toml");
    let version = manifest
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .expect("the workspace's rust-version")
        .trim_matches('"');
    assert!(
        readme.contains(&format!("Rust {version} or later")),
        "the README names rust-version {version}"
    );

    // No dependency needs a newer Rust than the workspace says.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    // `1.88` is `1.88.0`.
    let parse = |v: &str| -> [u32; 3] {
        let mut parts = v.split('.').map(|n| n.parse().unwrap_or(0));
        [(); 3].map(|()| parts.next().unwrap_or(0))
    };
    let ours = parse(version);
    for package in metadata["packages"].as_array().expect("packages") {
        if let Some(needed) = package["rust_version"].as_str() {
            assert!(
                parse(needed) <= ours,
                "{} {} needs Rust {needed}, the README says {version}",
                package["name"],
                package["version"]
            );
        }
    }
}
