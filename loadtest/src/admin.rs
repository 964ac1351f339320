//! The admin API of a node over one keep-alive connection: publishes and stats.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

pub struct Admin {
    authority: String,
    /// `Bearer <key>` where the node has an API key.
    authorization: Option<String>,
    sender: SendRequest<Full<Bytes>>,
}

impl Admin {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_with_key(url, None).await
    }

    pub async fn connect_with_key(url: &str, api_key: Option<String>) -> anyhow::Result<Self> {
        let authority = url
            .strip_prefix("http://")
            .context("an http:// admin URL")?
            .trim_end_matches('/')
            .to_owned();
        let stream = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            authority,
            authorization: api_key.map(|key| format!("Bearer {key}")),
            sender,
        })
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &self.authority)
            .header(CONTENT_TYPE, "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let response = self
            .sender
            .send_request(request.body(Full::new(body))?)
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }

    /// Publishes `data` (raw JSON) and returns its seq.
    pub async fn publish(&mut self, channel: &str, data: &str) -> anyhow::Result<u64> {
        let body = format!(
            r#"{{"channel":{},"data":{data}}}"#,
            serde_json::to_string(channel)?
        );
        let (status, reply) = self
            .request(Method::POST, "/v1/publish", body.into())
            .await?;
        if status != 200 {
            bail!(
                "publish answered {status}: {}",
                String::from_utf8_lossy(&reply)
            );
        }
        let reply: Value = serde_json::from_slice(&reply)?;
        reply["seq"].as_u64().context("a seq in the publish reply")
    }

    /// The node's `/v1/stats`.
    pub async fn stats(&mut self) -> anyhow::Result<Value> {
        let (status, body) = self.request(Method::GET, "/v1/stats", Bytes::new()).await?;
        if status != 200 {
            bail!("/v1/stats answered {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// The summed resident memory and connections of every node.
pub async fn total_stats(admins: &[String]) -> anyhow::Result<(u64, u64)> {
    let (mut rss, mut connections) = (0, 0);
    for url in admins {
        let stats = Admin::connect(url).await?.stats().await?;
        rss += stats["rss_bytes"].as_u64().unwrap_or(0);
        connections += stats["connections"].as_u64().unwrap_or(0);
    }
    Ok((rss, connections))
}
