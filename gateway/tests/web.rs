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
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    // Every file of the npm package (package.json), so that what a page loads from the gateway
    // and what an application bundles are the same client.
    let package: serde_json::Value =
        serde_json::from_str(include_str!("../web/package.json")).expect("package.json");
    let mut files: Vec<(String, &str)> = package["files"]
        .as_array()
        .expect("files in package.json")
        .iter()
        .map(|file| {
            let file = file.as_str().expect("a file name");
            let content_type = if file.ends_with(".js") {
                "text/javascript; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            (file.to_owned(), content_type)
        })
        .collect();
    assert!(files.len() >= 6, "{files:?}");
    files.push(("index.html".to_owned(), "text/html; charset=utf-8"));
    for (file, content_type) in files {
        let path = if file == "index.html" {
            "/".to_owned()
        } else {
            format!("/{file}")
        };
        let expected = std::fs::read_to_string(web.join(&file)).expect("a file of gateway/web");
        let (status, head, body) = get(&gw, &path).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            head.contains(&format!("\r\ncontent-type: {content_type}\r\n")),
            "{path}: {head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", expected.len())),
            "{path}: {head}"
        );
        assert_eq!(body, expected, "{path}");
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
