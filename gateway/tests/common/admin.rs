//! A keep-alive HTTP/1.1 client of the admin listener.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::wait::DEADLINE;

/// A keep-alive HTTP/1.1 connection to the admin listener.
pub struct Admin {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub epoch: String,
}

impl Admin {
    pub async fn connect(addr: SocketAddr) -> Admin {
        let stream = TcpStream::connect(addr).await.expect("connect to admin");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("admin HTTP handshake");
        tokio::spawn(connection);
        Admin { addr, sender }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("a valid request");
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        timeout(DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path} timed out"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&mut self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"").await
    }

    /// `POST /v1/publish` with `data` as raw JSON text.
    pub async fn publish(&mut self, channel: &str, data: &str) -> (u16, String) {
        let body = publish_body(channel, data);
        self.request(
            "POST",
            "/v1/publish",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    pub async fn publish_ok(&mut self, channel: &str, data: &str) -> Published {
        let (status, body) = self.publish(channel, data).await;
        assert_eq!(status, 200, "publish to {channel}: {body}");
        let reply: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(reply["channel"], channel, "{body}");
        Published {
            seq: reply["seq"].as_u64().expect("seq"),
            epoch: reply["epoch"].as_str().expect("epoch").to_owned(),
        }
    }
}

/// The body of an admin publish, with `data` copied verbatim.
pub fn publish_body(channel: &str, data: &str) -> String {
    format!(
        r#"{{"channel":{},"data":{data}}}"#,
        serde_json::to_string(channel).unwrap()
    )
}
