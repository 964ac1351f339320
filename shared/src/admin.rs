//! A client of a node's admin API (`gateway/ADMIN-API.md`; feature `admin`): one keep-alive
//! HTTP/1.1 connection to the admin listener, the API key sent as `Authorization: Bearer`, JSON
//! in and out. The gateway's CLI subcommands, `loadtest` and the integration tests all reach the
//! admin listener through it.
//!
//! The key is kept as a sensitive header value: neither [`AdminClient`]'s `Debug` nor any
//! [`AdminError`] shows it.
//!
//! ```no_run
//! # async fn run() -> Result<(), shared::admin::AdminError> {
//! use serde_json::value::RawValue;
//! use shared::admin::AdminClient;
//! let mut admin = AdminClient::connect("http://127.0.0.1:9090", Some("s3cret")).await?;
//! let data = RawValue::from_string(r#"{"hello":"world"}"#.to_owned()).unwrap();
//! let published = admin.publish("news", &data, None).await?;
//! println!("seq {}", published.seq);
//! # Ok(()) }
//! ```

use std::fmt;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpStream;

/// One keep-alive connection to a node's admin listener.
pub struct AdminClient {
    /// `host:port` of the listener: the `Host` header of every request, and what errors name.
    authority: String,
    /// `Bearer <key>`, marked sensitive; `None` for a node without `--api-key`.
    authorization: Option<HeaderValue>,
    sender: SendRequest<Full<Bytes>>,
}

/// What went wrong with a request to the admin API, by cause. None carries the API key.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin URL is not `http://host[:port]`.
    #[error("admin URL `{url}`: {problem}")]
    Url { url: String, problem: &'static str },
    /// The API key cannot be sent in a header (a control character, say).
    #[error("the API key is not a valid HTTP header value")]
    ApiKey,
    /// No TCP connection to the listener.
    #[error("connecting to the admin API at {authority}: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    /// The method, path or a header of a request is not valid HTTP.
    #[error("{method} {path}: not a valid request: {source}")]
    Request {
        method: Method,
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    /// A body to send as JSON does not serialise.
    #[error("{method} {path}: the body does not serialise: {source}")]
    Encode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The HTTP exchange failed: the connection broke, or the answer was not HTTP. `what` is
    /// the request (`POST /v1/publish`), or the connection's handshake.
    #[error("{what} at {authority}: {source}")]
    Http {
        what: String,
        authority: String,
        #[source]
        source: hyper::Error,
    },
    /// The node answered with another status than 200.
    #[error("{method} {path} answered {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    /// The node answered 200 with a body that is not the JSON expected.
    #[error("{method} {path}: the answer is not the JSON expected: {source}")]
    Json {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A node's answer: its status and its body, whatever the status.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The body of `POST /v1/publish`.
#[derive(Debug, Serialize)]
pub struct PublishRequest<'a> {
    pub channel: &'a str,
    /// Sent as it is: subscribers get these exact bytes.
    pub data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<&'a str>,
}

/// The answer to a publish: the message's place in its channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Published {
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
}

impl AdminClient {
    /// Connects to the admin listener at `url` (`http://host:port`); every request carries
    /// `api_key`, when given, as a bearer token.
    pub async fn connect(url: &str, api_key: Option<&str>) -> Result<Self, AdminError> {
        let authority = authority(url)?;
        let authorization = api_key
            .map(|key| {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| AdminError::ApiKey)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let connect = |source| AdminError::Connect {
            authority: authority.clone(),
            source,
        };
        let stream = TcpStream::connect(&authority).await.map_err(connect)?;
        // Requests are small and each waits for its answer: Nagle would only delay them.
        stream.set_nodelay(true).map_err(connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| AdminError::Http {
                what: "the HTTP/1.1 handshake".into(),
                authority: authority.clone(),
                source,
            })?;
        tokio::spawn(connection);
        Ok(Self {
            authority,
            authorization,
            sender,
        })
    }

    /// `host:port` of the listener.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one request with `headers` (besides `Host` and the key's) and `body`, and returns
    /// the answer whatever its status.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Answer, AdminError> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.authority);
        if let Some(authorization) = &self.authorization {
            builder = builder.header(AUTHORIZATION, authorization);
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request =
            builder
                .body(Full::new(body.into()))
                .map_err(|source| AdminError::Request {
                    method: method.clone(),
                    path: path.to_owned(),
                    source,
                })?;
        let http = |source| AdminError::Http {
            what: format!("{method} {path}"),
            authority: self.authority.clone(),
            source,
        };
        self.sender.ready().await.map_err(http)?;
        let response = self.sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(http)?;
        Ok(Answer {
            status,
            body: body.to_bytes(),
        })
    }

    /// `GET path`, whatever the status.
    pub async fn get(&mut self, path: &str) -> Result<Answer, AdminError> {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    /// `POST path` with a JSON `body` (sent as it is), whatever the status.
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> Result<Answer, AdminError> {
        self.request(Method::POST, path, &[JSON], body).await
    }

    /// `DELETE path`, whatever the status.
    pub async fn delete(&mut self, path: &str) -> Result<Answer, AdminError> {
        self.request(Method::DELETE, path, &[], Bytes::new()).await
    }

    /// `GET path`, which must answer 200 with JSON of type `T`.
    pub async fn get_json<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, AdminError> {
        let answer = self.get(path).await?;
        parse(Method::GET, path, answer)
    }

    /// `POST path` with `body` as JSON, which must answer 200 with JSON of type `T`.
    pub async fn post_json<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, AdminError> {
        let json = serde_json::to_vec(body).map_err(|source| AdminError::Encode {
            method: Method::POST,
            path: path.to_owned(),
            source,
        })?;
        let answer = self.post(path, json).await?;
        parse(Method::POST, path, answer)
    }

    /// Publishes `data` to `channel` (once per key within the node's window, with
    /// `idempotency_key`).
    pub async fn publish(
        &mut self,
        channel: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<Published, AdminError> {
        let request = PublishRequest {
            channel,
            data,
            idempotency_key,
        };
        self.post_json("/v1/publish", &request).await
    }
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("authority", &self.authority)
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// `host:port` of an `http://host[:port]` URL (port 80 when it has none).
fn authority(url: &str) -> Result<String, AdminError> {
    // The URL is named in errors: one with credentials in it is refused without being shown.
    if url.contains('@') {
        return Err(AdminError::Url {
            url: "<hidden: it has credentials>".into(),
            problem: "credentials go in the API key, not in the URL",
        });
    }
    let problem = |problem| AdminError::Url {
        url: url.to_owned(),
        problem,
    };
    let uri: Uri = url.parse().map_err(|_| problem("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(problem("only http:// is supported"));
    }
    let authority = uri.authority().ok_or_else(|| problem("no host"))?;
    Ok(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    ))
}

fn parse<T: DeserializeOwned>(method: Method, path: &str, answer: Answer) -> Result<T, AdminError> {
    if answer.status != StatusCode::OK {
        return Err(AdminError::Status {
            method,
            path: path.to_owned(),
            status: answer.status,
            body: answer.text(),
        });
    }
    serde_json::from_slice(&answer.body).map_err(|source| AdminError::Json {
        method,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const KEY: &str = "k3y-never-shown";

    /// A listener that answers each request on its one connection with `answers`, in order, and
    /// hands back the heads of the requests it read.
    async fn node(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut heads = Vec::new();
            let mut buf = Vec::new();
            for (status, body) in answers {
                let end = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                    let mut chunk = [0u8; 1024];
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "the client closed its keep-alive connection");
                    buf.extend_from_slice(&chunk[..n]);
                };
                let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|n| n.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                while buf.len() < length {
                    let mut chunk = [0u8; 1024];
                    let n = socket.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                buf.drain(..length);
                heads.push(head);
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
            heads
        });
        (url, served)
    }

    #[tokio::test]
    async fn requests_share_one_connection_and_carry_the_key() {
        let (url, served) = node(vec![
            (200, r#"{"channel":"news","seq":7,"epoch":"e1"}"#),
            (200, r#"{"connections":3}"#),
        ])
        .await;
        let mut admin = AdminClient::connect(&url, Some(KEY)).await.unwrap();
        let data = RawValue::from_string("{\"a\": [1, 2]}".into()).unwrap();
        let published = admin.publish("news", &data, Some("once")).await.unwrap();
        assert_eq!(
            published,
            Published {
                channel: "news".into(),
                seq: 7,
                epoch: "e1".into()
            }
        );
        let stats: serde_json::Value = admin.get_json("/v1/stats").await.unwrap();
        assert_eq!(stats["connections"], 3);
        let heads = served.await.unwrap();
        assert!(
            heads[0].starts_with("POST /v1/publish HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].starts_with("GET /v1/stats HTTP/1.1\r\n"),
            "{}",
            heads[1]
        );
        for head in &heads {
            let head = head.to_ascii_lowercase();
            assert!(
                head.contains(&format!(
                    "authorization: bearer {}",
                    KEY.to_ascii_lowercase()
                )),
                "{head}"
            );
            assert!(
                head.contains(&format!("host: {}", admin.authority())),
                "{head}"
            );
        }
    }

    #[tokio::test]
    async fn the_key_is_in_no_error_and_no_debug_output() {
        let (url, _served) = node(vec![(401, r#"{"error":"missing or wrong API key"}"#)]).await;
        let mut admin = AdminClient::connect(&url, Some(KEY)).await.unwrap();
        assert!(!format!("{admin:?}").contains(KEY), "{admin:?}");
        let refused = admin
            .get_json::<serde_json::Value>("/v1/stats")
            .await
            .unwrap_err();
        assert!(matches!(&refused, AdminError::Status { status, .. } if *status == 401));
        // The exchange is over: the next request finds the connection closed.
        let broken = admin.get("/v1/stats").await.unwrap_err();
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let unreachable = AdminClient::connect(&closed, Some(KEY)).await.unwrap_err();
        let bad_key = AdminClient::connect(&url, Some("a\nkey"))
            .await
            .unwrap_err();
        let credentials = AdminClient::connect(&format!("http://me:{KEY}@127.0.0.1:1"), None)
            .await
            .unwrap_err();
        for error in [refused, broken, unreachable, bad_key, credentials] {
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains(KEY) && !shown.contains("a\nkey"), "{shown}");
        }
    }

    #[test]
    fn admin_urls_are_http_with_a_host() {
        assert_eq!(
            authority("http://127.0.0.1:9090").unwrap(),
            "127.0.0.1:9090"
        );
        assert_eq!(authority("http://node-1/").unwrap(), "node-1:80");
        assert_eq!(authority("http://[::1]:9090").unwrap(), "[::1]:9090");
        for bad in ["https://node:9090", "node:9090", "", "http://"] {
            assert!(
                matches!(authority(bad), Err(AdminError::Url { .. })),
                "{bad}"
            );
        }
    }
}
