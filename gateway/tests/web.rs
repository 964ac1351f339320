//! The browser client's files on the client listener: the demo page at `/`, the modules of the
//! client and its types, byte for byte the files of `gateway/web/`; `/ws` without an upgrade
//! stays 426.

mod common;

use common::{http_raw, Gateway};

/// `GET path` on the client listener: status, lower-cased head, body.
async fn get(gw: &Gateway, path: &str) -> (u16, String, String) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gw.client_addr
    );
    let (status, response) = http_raw(gw.client_addr, &request).await;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn the_browser_client_and_its_demo_page_are_served() {
    let gw = Gateway::start(&[]);
    let files = [
        (
            "/",
            "text/html; charset=utf-8",
            include_str!("../web/index.html"),
        ),
        (
            "/client.js",
            "text/javascript; charset=utf-8",
            include_str!("../web/client.js"),
        ),
        (
            "/client.d.ts",
            "text/plain; charset=utf-8",
            include_str!("../web/client.d.ts"),
        ),
        (
            "/connection.js",
            "text/javascript; charset=utf-8",
            include_str!("../web/connection.js"),
        ),
        (
            "/hub.js",
            "text/javascript; charset=utf-8",
            include_str!("../web/hub.js"),
        ),
        (
            "/leader.js",
            "text/javascript; charset=utf-8",
            include_str!("../web/leader.js"),
        ),
        (
            "/shared-worker.js",
            "text/javascript; charset=utf-8",
            include_str!("../web/shared-worker.js"),
        ),
    ];
    for (path, content_type, file) in files {
        let (status, head, body) = get(&gw, path).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            head.contains(&format!("\r\ncontent-type: {content_type}\r\n")),
            "{path}: {head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", file.len())),
            "{path}: {head}"
        );
        assert_eq!(body, file, "{path}");
    }
    // The page loads the client from this listener, which connects to /ws on it.
    let (_, _, page) = get(&gw, "/").await;
    assert!(page.contains(r#"from "/client.js""#), "{page}");
}

#[tokio::test]
async fn ws_without_an_upgrade_is_still_426_and_other_paths_404() {
    let gw = Gateway::start(&[]);
    for path in ["/ws", "/ws?token=x"] {
        let (status, head, _) = get(&gw, path).await;
        assert_eq!(status, 426, "{path}: {head}");
        assert!(head.contains("\r\nupgrade: websocket"), "{head}");
    }
    for path in [
        "/index.html",
        "/client",
        "/web/client.js",
        "/client.js/x",
        "/package.json",
        "/test/client.test.mjs",
    ] {
        assert_eq!(get(&gw, path).await.0, 404, "{path}");
    }
}
