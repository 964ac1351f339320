//! The admin listener through `shared`'s admin client, with the deadline and the panics of a
//! test: every request answers within [`DEADLINE`], or the test fails saying which.

use std::net::SocketAddr;

use hyper::Method;
use serde_json::value::RawValue;
use serde_json::Value;
pub use shared::admin::Published;
use shared::admin::{AdminClient, AdminError};
use tokio::time::timeout;

use super::wait::DEADLINE;

/// A keep-alive HTTP/1.1 connection to the admin listener.
pub struct Admin {
    client: AdminClient,
}

impl Admin {
    pub async fn connect(addr: SocketAddr) -> Admin {
        Self::connect_with(addr, None).await
    }

    /// A connection whose every request carries `key` as its bearer token.
    pub async fn with_key(addr: SocketAddr, key: &str) -> Admin {
        Self::connect_with(addr, Some(key)).await
    }

    async fn connect_with(addr: SocketAddr, key: Option<&str>) -> Admin {
        let client = within("connecting to the admin listener", async {
            AdminClient::connect(&format!("http://{addr}"), key).await
        })
        .await;
        Admin { client }
    }

    /// Any request, with `headers` as they are: the status and the body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let method = Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let what = format!("{method} {path}");
        let request = self.client.request(method, path, headers, body.to_vec());
        let answer = within(&what, request).await;
        (answer.status.as_u16(), answer.text())
    }

    pub async fn get(&mut self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"").await
    }

    /// A call of the server API with a JSON body (none for `null`); the answer, JSON too.
    pub async fn call(&mut self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (status, answer) = self.request(method, path, &[], &body).await;
        let answer = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{method} {path}: `{answer}` is not JSON: {e}"));
        (status, answer)
    }

    /// `POST /v1/publish` with `data` as raw JSON text, sent as it is (valid or not).
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

    /// Publishes `data` (JSON text) and expects `200` for `channel`.
    pub async fn publish_ok(&mut self, channel: &str, data: &str) -> Published {
        let data = RawValue::from_string(data.to_owned()).expect("the data is JSON");
        let what = format!("publish to {channel}");
        let published = within(&what, self.client.publish(channel, &data, None)).await;
        assert_eq!(published.channel, channel);
        published
    }
}

/// The body of an admin publish, with `data` copied verbatim.
pub fn publish_body(channel: &str, data: &str) -> String {
    format!(
        r#"{{"channel":{},"data":{data}}}"#,
        serde_json::to_string(channel).unwrap()
    )
}

/// Awaits `request` up to the deadline; panics with `what` when it fails or takes longer.
async fn within<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, AdminError>>,
) -> T {
    timeout(DEADLINE, request)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}
