//! Malformed input never takes the node down: after a barrage of broken frames, broken
//! WebSocket framing, broken HTTP and broken admin requests, a client connected all along still
//! receives its messages, and the node logged no panic.

mod common;

use std::time::Duration;

use common::{channel, http_exchange, http_raw, Client, Gateway, RawWs, DEADLINE};
use futures_util::SinkExt;
use serde_json::Value;
use shared::ServerFrame;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Text frames a broken or hostile client may send, after `hello` or instead of it.
fn broken_texts() -> Vec<String> {
    let deep = format!(
        r#"{{"type":"ping","id":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "i".repeat(30_000));
    [
        "",
        " ",
        "{",
        "}",
        "{}",
        "[]",
        "\u{feff}{\"type\":\"ping\"}",
        r#"{"type":null}"#,
        r#"{"type":""}"#,
        r#"{"type":"hello","token":5}"#,
        r#"{"type":"hello","session":{}}"#,
        r#"{"type":"hello","session":"../../etc"}"#,
        r#"{"type":"hello","since":[]}"#,
        r#"{"type":"hello","since":{"x":{"seq":"a"}}}"#,
        r#"{"type":"hello","since":{"bad name":{"seq":1}}}"#,
        r#"{"type":"ping","id":1e999999}"#,
        r#"{"type":"ping","id":{"a":[1,{"b":null}]}}"#,
        r#"{"type":"ping","id":"\ud800"}"#,
        r#"{"type":"ping","id":"\u0000"}"#,
        r#"{"type":"subscribe","channel":"x","since":{"seq":18446744073709551615,"epoch":"e"}}"#,
        r#"{"type":"subscribe","channel":"y","since":{"seq":18446744073709551616}}"#,
        r#"{"type":"subscribe","channel":"z","since":{"seq":0,"epoch":""}}"#,
        r#"{"type":"subscribe","channel":"w","since":{"seq":1.5}}"#,
        r#"{"type":"subscribe","channel":"\u006e\u0065ws"}"#,
        r#"{"type":"unsubscribe","channel":"never"}"#,
        r#"{"type":"publish","channel":"x","data":}"#,
        r#"{"type":"publish","channel":"x","data":{"a":1}"#,
        r#"{"type":"refresh","token":""}"#,
        r#"{"type":"refresh","token":"a.b.c"}"#,
        r#"{"type":"ping","type":"hello"}"#,
        r#"{"type":"ping"} trailing"#,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([deep, long_id])
    .collect()
}

/// Sends `message` on a fresh connection (after `hello` when asked), then a ping: the
/// connection either answers it or closes. Which one is the contract's business elsewhere;
/// here the node must only survive.
async fn probe(gw: &Gateway, hello: bool, message: Message) {
    let mut client = gw.connect().await;
    if hello {
        client.hello().await;
    }
    client.send_message(message).await;
    let _ = client
        .ws
        .send(Message::text(r#"{"type":"ping","id":"end"}"#))
        .await;
    drain(&mut client).await;
}

/// Reads until the pong of the closing ping, a close, or the end of the socket.
async fn drain(client: &mut Client) {
    loop {
        match client.next_message().await {
            Some(Ok(Message::Text(text))) => {
                if let Ok(ServerFrame::Pong { id: Some(id) }) = serde_json::from_str(&text) {
                    if id.get() == r#""end""# {
                        return;
                    }
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

/// Sends raw frames after a raw upgrade (and `hello`, when asked), then reads until a close
/// frame or the end of the socket; a server that waits for more is given the end of input.
async fn raw_probe(gw: &Gateway, hello: bool, frames: &[(u8, Vec<u8>, bool)]) {
    let mut raw = RawWs::connect(gw.client_addr).await;
    if hello {
        raw.send_text(r#"{"type":"hello"}"#).await;
        raw.read_frame().await.expect("welcome");
    }
    for (first, payload, mask) in frames {
        raw.send_frame(*first, payload, *mask).await;
    }
    let mut shut = false;
    loop {
        match raw.try_read_frame(Duration::from_secs(2)).await {
            Ok(Some((0x8, _)) | None) => return,
            Ok(Some(_)) => {}
            Err(_) if !shut => {
                let _ = raw.stream.shutdown().await;
                shut = true;
            }
            Err(_) => panic!("the server neither closed nor ended the socket"),
        }
    }
}

/// WebSocket framing a library client would never send: (first byte, payload, masked).
fn broken_frames() -> Vec<Vec<(u8, Vec<u8>, bool)>> {
    let close = |payload: &[u8]| vec![(0x88, payload.to_vec(), true)];
    vec![
        close(&[0x03, 0xE7]),                   // close code 999
        close(&[0x03]),                         // a one-byte close payload
        close(&[0x03, 0xE8, 0xff, 0xfe]),       // a close reason that is not UTF-8
        close(&[0x0B, 0xB8, b'x']),             // close code 3000, fine
        vec![(0x89, vec![b'p'; 126], true)],    // a control frame above 125 bytes
        vec![(0x09, b"p".to_vec(), true)],      // a fragmented control frame
        vec![(0x80, b"orphan".to_vec(), true)], // a continuation with nothing to continue
        vec![
            (0x01, b"{\"type\"".to_vec(), true),
            (0x01, b":\"ping\"}".to_vec(), true),
        ], // a new message in the middle of one
        vec![(0x82, vec![0, 1, 2], true)],      // binary
        // An unsolicited pong, and a ping, are fine: the client closes after them.
        vec![
            (0x8A, b"unasked".to_vec(), true),
            (0x88, vec![0x03, 0xE8], true),
        ],
        vec![
            (0x89, b"ping".to_vec(), true),
            (0x88, vec![0x03, 0xE8], true),
        ],
        vec![(0x81, b"{\"type\":\"ping\"}".to_vec(), false)], // unmasked
        vec![(0xF1, b"{}".to_vec(), true)],                   // every reserved bit
        vec![(0x8F, vec![], true)],                           // an unknown control opcode
        vec![(0x81, b"\xc3\x28".to_vec(), true)],             // invalid UTF-8
    ]
}

#[tokio::test]
async fn malformed_input_never_takes_the_node_down() {
    let mut gw = Gateway::start(&["--max-frame-bytes", "65536"]);
    let news = channel("news");
    let (mut observer, _) = gw.connect_hello().await;
    observer.subscribe(&news).await;
    gw.publish_ok(&news, r#"{"n":1}"#).await;
    observer.recv_run(&news, 0, 1).await;

    for text in broken_texts() {
        probe(&gw, true, Message::text(text.clone())).await;
        probe(&gw, false, Message::text(text)).await;
    }
    probe(&gw, true, Message::binary(vec![0xff; 100])).await;
    probe(&gw, true, Message::text("x".repeat(70_000))).await;
    for frames in broken_frames() {
        raw_probe(&gw, true, &frames).await;
        raw_probe(&gw, false, &frames).await;
    }
    // A frame header that announces 2^63 bytes.
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.stream
        .write_all(&[
            0x81, 0xFF, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
        ])
        .await
        .unwrap();
    let _ = raw.try_read_frame(DEADLINE).await;

    // Broken HTTP on the client listener.
    let addr = gw.client_addr;
    let requests: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .into_bytes(),
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: a\r\nSec-WebSocket-Version: 99\r\n\r\n"
            .to_vec(),
        b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            .to_vec(),
    ];
    for request in requests {
        let response = http_exchange(addr, &request).await;
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 4"),
            "{response}"
        );
    }
    // A request cut in the middle, and a socket that says nothing.
    let mut cut = TcpStream::connect(addr).await.unwrap();
    cut.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpg")
        .await
        .unwrap();
    drop(cut);
    drop(TcpStream::connect(addr).await.unwrap());

    // Broken requests to the admin listener.
    let admin = gw.admin_addr;
    assert_eq!(http_raw(admin, "NOT HTTP AT ALL\r\n\r\n").await.0, 400);
    for body in [
        &b"{\"channel\":\"x\",\"data\":\"\xff\"}"[..],
        &b"{\"channel\":\"x\",\"data\":\"\\ud800\"}"[..],
        &b"\x00\x01\x02"[..],
    ] {
        let mut request = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let mut stream = TcpStream::connect(admin).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(
            DEADLINE,
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response),
        )
        .await
        .expect("admin answer")
        .unwrap();
        assert!(response.starts_with(b"HTTP/1.1 "), "{response:?}");
    }
    let chunked = "POST /v1/publish HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
                   Connection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    assert_eq!(http_raw(admin, chunked).await.0, 400);

    // The node is up, and the client connected all along still gets its messages, in order.
    assert!(gw.running(), "the node exited:\n{}", gw.logs());
    gw.publish_ok(&news, r#"{"n":2}"#).await;
    let message = observer.recv_message().await;
    assert_eq!((message.seq, message.data.as_str()), (2, r#"{"n":2}"#));
    observer.ping().await;
    let (status, body) = gw.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    // Every probe's connection has ended: only the observer is left.
    gw.wait_metric_until("bgw_connections", |v| v == 1.0, "1")
        .await;
    let stats: Value = serde_json::from_str(&gw.get("/v1/stats").await.1).unwrap();
    assert_eq!(stats["connections"], 1);
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}
