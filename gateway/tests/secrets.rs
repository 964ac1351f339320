//! No secret value (JWT secret, admin API key, Redis password, client token) in `--help`, logs,
//! metrics, admin answers or error messages, whether it came by flag or by environment.

mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{claims, free_port, gateway_command, hs256, publish_body, Admin, Gateway, DEADLINE};
use shared::ServerFrame;

const JWT_SECRET: &str = "jwt-secret-5f1d9c0a77e2";
const API_KEY: &str = "api-key-c3b8e41f02aa";
const REDIS_PASSWORD: &str = "redis-password-9e7d1b33";
const WRONG_KEY: &str = "wrong-key-70d2e6b1c4";

/// Runs the binary to its end (killed after the deadline) with only `env` of the `BGW_`
/// variables; what it printed on both streams.
fn run(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = gateway_command();
    command
        .args(args)
        .envs(env.iter().copied())
        .env("BGW_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn the gateway binary");
    let until = Instant::now() + DEADLINE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Output { stdout, stderr, .. } = child.wait_with_output().expect("output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    )
}

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} shows a secret ({secret}):\n{text}"
        );
    }
}

fn secret_env() -> Vec<(&'static str, String)> {
    vec![
        ("BGW_JWT_SECRET", JWT_SECRET.to_owned()),
        ("BGW_API_KEY", API_KEY.to_owned()),
        (
            "BGW_REDIS_URL",
            format!("redis://user:{REDIS_PASSWORD}@127.0.0.1:1/0"),
        ),
    ]
}

#[test]
fn help_names_the_secret_variables_but_never_their_values() {
    let env = secret_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for args in [
        &["--help"][..],
        &["-h"],
        &["serve", "--help"],
        &["publish", "--help"],
        &["health", "--help"],
        &["help", "serve"],
    ] {
        let help = run(args, &env);
        assert!(help.contains("Usage"), "{args:?}: {help}");
        assert_no_secret(
            &format!("gateway {args:?}"),
            &help,
            &[JWT_SECRET, API_KEY, REDIS_PASSWORD],
        );
    }
    let help = run(&["--help"], &env);
    for name in ["BGW_JWT_SECRET", "BGW_API_KEY", "BGW_REDIS_URL"] {
        assert!(
            help.contains(&format!("[env: {name}]")),
            "{name} is documented: {help}"
        );
    }
    assert!(
        run(&["publish", "--help"], &env).contains("[env: BGW_API_KEY]"),
        "publish documents its key"
    );
}

#[tokio::test]
async fn a_node_never_logs_or_exposes_its_secrets_or_tokens() {
    let gw = Gateway::start(&["--jwt-secret", JWT_SECRET, "--api-key", API_KEY]);
    let token = hs256(&claims("alice", &["*"], &["chat"]), JWT_SECRET);
    let forged = hs256(&claims("mallory", &["*"], &["*"]), "not-the-secret");

    // A token in hello, one in the query, a forged one, a refresh.
    let mut client = gw.connect().await;
    client.hello_token(&token).await;
    client.subscribe("chat").await;
    client
        .send_text(&format!(
            r#"{{"type":"refresh","id":1,"token":"{forged}"}}"#
        ))
        .await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Error { code: 401, .. }
    ));
    let mut by_query = gw
        .try_connect(gw.request(&format!("token={token}")))
        .await
        .expect("upgrade");
    by_query.send_text(r#"{"type":"hello"}"#).await;
    by_query.recv_welcome().await;
    let mut bad = gw.connect().await;
    bad.send_text(&format!(r#"{{"type":"hello","token":"{forged}"}}"#))
        .await;
    let (code, reason) = bad.expect_close().await;
    assert_eq!(code, 4001);
    assert_no_secret("a 4001 reason", &reason, &[JWT_SECRET, &forged]);

    // The admin API with the key, without it, and with a wrong one.
    let mut admin = Admin::connect(gw.admin_addr).await;
    let body = publish_body("chat", "1");
    let bearer = format!("Bearer {API_KEY}");
    let wrong = format!("Bearer {WRONG_KEY}");
    for (auth, expected) in [
        (Some(bearer.as_str()), 200),
        (None, 401),
        (Some(wrong.as_str()), 401),
    ] {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(auth.map(|a| ("authorization", a)));
        let (status, answer) = admin
            .request("POST", "/v1/publish", &headers, body.as_bytes())
            .await;
        assert_eq!(status, expected, "{answer}");
        assert_no_secret(
            "an admin answer",
            &answer,
            &[API_KEY, WRONG_KEY, JWT_SECRET],
        );
    }
    client.recv_message().await;

    for path in ["/metrics", "/v1/stats", "/readyz", "/healthz"] {
        let (_, answer) = admin.get(path).await;
        assert_no_secret(
            path,
            &answer,
            &[JWT_SECRET, API_KEY, WRONG_KEY, &token, &forged],
        );
    }
    client.close().await;
    by_query.close().await;
    assert_no_secret(
        "the node's logs (gateway=debug)",
        &gw.logs(),
        &[JWT_SECRET, API_KEY, WRONG_KEY, &token, &forged],
    );
}

#[test]
fn errors_never_show_secrets() {
    let closed = free_port();
    // A Redis that is not there, by flag and by environment, with a user and without.
    for url in [
        format!("redis://user:{REDIS_PASSWORD}@127.0.0.1:{closed}/0"),
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{closed}"),
        format!("redis://:{REDIS_PASSWORD}@127.0.0.1:notaport"),
        format!("nonsense:{REDIS_PASSWORD}"),
    ] {
        let by_flag = run(
            &[
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--redis-url",
                &url,
            ],
            &[],
        );
        assert!(by_flag.contains("gateway: "), "the node failed: {by_flag}");
        assert_no_secret(&format!("a node on {url}"), &by_flag, &[REDIS_PASSWORD]);
        let by_env = run(
            &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            &[("BGW_REDIS_URL", &url)],
        );
        assert_no_secret(&format!("a node on {url}"), &by_env, &[REDIS_PASSWORD]);
    }

    // Flags that clap refuses.
    let conflict = run(
        &[
            "--jwt-secret",
            JWT_SECRET,
            "--jwt-public-key",
            "/nonexistent",
        ],
        &[],
    );
    assert!(conflict.contains("cannot be used with"), "{conflict}");
    assert_no_secret("a refused command line", &conflict, &[JWT_SECRET]);

    // `gateway publish` to no node, and to a node with another key.
    let admin_url = format!("http://127.0.0.1:{closed}");
    let unreachable = run(
        &[
            "publish",
            "--admin-url",
            &admin_url,
            "--api-key",
            API_KEY,
            "news",
            "1",
        ],
        &[],
    );
    assert!(unreachable.contains("gateway: "), "{unreachable}");
    assert_no_secret("publish to no node", &unreachable, &[API_KEY]);
    let gw = Gateway::start(&["--api-key", API_KEY]);
    let admin_url = format!("http://{}", gw.admin_addr);
    let refused = run(
        &["publish", "--admin-url", &admin_url, "news", "1"],
        &[("BGW_API_KEY", WRONG_KEY)],
    );
    assert!(refused.contains("wrong API key"), "{refused}");
    assert_no_secret("a refused publish", &refused, &[API_KEY, WRONG_KEY]);
    assert_no_secret("the node's logs", &gw.logs(), &[API_KEY, WRONG_KEY]);
}
