//! The admin API from the command line: `gateway publish` and `gateway health`.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends one request to a node's admin listener and returns the status and body.
pub async fn request(
    base: &str,
    method: Method,
    path: &str,
    body: Option<String>,
    api_key: Option<&str>,
) -> anyhow::Result<(StatusCode, String)> {
    let base: Uri = base
        .parse()
        .with_context(|| format!("admin URL `{base}`"))?;
    if base.scheme_str() != Some("http") {
        bail!("admin URL `{base}`: only http:// is supported");
    }
    let authority = base.authority().context("admin URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, authority.as_str())
        .header(CONTENT_TYPE, "application/json");
    if let Some(key) = api_key {
        builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
