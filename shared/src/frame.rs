//! Frames: one JSON object in a text frame, with a string field `type`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A request id: any JSON value, echoed verbatim in the reply.
pub type Id = Box<RawValue>;

/// A place in a channel's sequence. `epoch` names the sequence; `seq` 0 (with or without an
/// epoch) means "before the first message", so it asks for all that is retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// A frame from a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Hello {
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        since: BTreeMap<String, Position>,
    },
    Subscribe {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Position>,
        /// Asks for the channel's `join` and `leave` frames (a channel that keeps presence).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        presence: bool,
    },
    Unsubscribe {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
    },
    Publish {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
        data: Box<RawValue>,
    },
    Ping {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    Refresh {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        token: String,
    },
}

/// Why a client frame was refused.
#[derive(Debug)]
pub enum FrameError {
    /// Not a JSON object: the connection is closed with 1007.
    NotObject,
    /// A JSON object that is not a valid request: an `error` reply with code 400.
    BadRequest { id: Option<Id>, message: String },
}

/// Every field a client frame may carry, unparsed, so that a wrongly typed field is a 400 reply
/// rather than a broken frame, and `data` keeps its bytes.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
    #[serde(borrow, default)]
    session: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence: Option<&'a RawValue>,
}

impl ClientFrame {
    /// Parses one text frame from a client.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        // serde would also read a struct from a JSON array; the contract wants an object.
        if !text.trim_start().starts_with('{') {
            return Err(FrameError::NotObject);
        }
        let fields: Fields = serde_json::from_str(text).map_err(|e| match e.classify() {
            // serde reports a duplicate field as soon as it reads the key, before the parser
            // has seen the rest: only a text that is JSON is a bad request.
            serde_json::error::Category::Data
                if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() =>
            {
                FrameError::BadRequest {
                    id: None,
                    message: e.to_string(),
                }
            }
            _ => FrameError::NotObject,
        })?;
        let id = fields
            .id
            .filter(|raw| raw.get() != "null")
            .map(|raw| raw.to_owned());
        fields
            .build(id.clone())
            .map_err(|message| FrameError::BadRequest { id, message })
    }

    /// The request id, where the frame has one.
    pub fn id(&self) -> Option<&Id> {
        match self {
            Self::Hello { .. } => None,
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id }
            | Self::Refresh { id, .. } => id.as_ref(),
        }
    }
}

impl Fields<'_> {
    fn build(&self, id: Option<Id>) -> Result<ClientFrame, String> {
        let kind: String = required(self.kind, "type")?;
        Ok(match kind.as_str() {
            "hello" => ClientFrame::Hello {
                token: optional(self.token, "token")?,
                session: optional(self.session, "session")?,
                since: optional(self.since, "since")?.unwrap_or_default(),
            },
            "subscribe" => ClientFrame::Subscribe {
                id,
                channel: required(self.channel, "channel")?,
                since: optional(self.since, "since")?,
                presence: optional(self.presence, "presence")?.unwrap_or(false),
            },
            "unsubscribe" => ClientFrame::Unsubscribe {
                id,
                channel: required(self.channel, "channel")?,
            },
            "publish" => ClientFrame::Publish {
                id,
                channel: required(self.channel, "channel")?,
                data: self.data.ok_or("missing field `data`")?.to_owned(),
            },
            "ping" => ClientFrame::Ping { id },
            "refresh" => ClientFrame::Refresh {
                id,
                token: required(self.token, "token")?,
            },
            other => return Err(format!("unknown frame type `{other}`")),
        })
    }
}

fn optional<T: DeserializeOwned>(raw: Option<&RawValue>, name: &str) -> Result<Option<T>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|e| format!("field `{name}`: {e}")),
    }
}

fn required<T: DeserializeOwned>(raw: Option<&RawValue>, name: &str) -> Result<T, String> {
    optional(raw, name)?.ok_or_else(|| format!("missing field `{name}`"))
}

/// Where a restored subscription stands, in `welcome.channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    pub seq: u64,
    pub epoch: String,
    pub recovered: bool,
}

/// A frame from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    Welcome {
        session: String,
        node: String,
        resumed: bool,
        heartbeat: u64,
        channels: BTreeMap<String, ChannelState>,
    },
    Subscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
        seq: u64,
        epoch: String,
        recovered: bool,
    },
    Unsubscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
    },
    Message {
        channel: String,
        seq: u64,
        data: Box<RawValue>,
    },
    Published {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        channel: String,
        seq: u64,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
    },
    Refreshed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        expires: Option<u64>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Id>,
        code: u16,
        message: String,
    },
    /// A subscription of a presence channel started, for the subscribers that asked for these.
    Join(Presence),
    /// A subscription of a presence channel ended.
    Leave(Presence),
}

/// Who joined or left a presence channel: never a session id, which is the credential of an
/// anonymous client (PROTOCOL.md, section 14).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub channel: String,
    /// The token's `sub`; empty for an anonymous client.
    pub user: String,
    /// The connection's id for presence: the same in its `join` and its `leave`.
    pub client: String,
    /// The channel's members after this change, across the cluster.
    pub count: u64,
}

/// Every field a server frame may carry. `serde` cannot read borrowed raw values through an
/// internally tagged enum, so frames are read through this flat record.
#[derive(Deserialize)]
struct ServerFields<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw_present")]
    data: Option<&'a RawValue>,
    session: Option<String>,
    node: Option<String>,
    resumed: Option<bool>,
    heartbeat: Option<u64>,
    channels: Option<BTreeMap<String, ChannelState>>,
    channel: Option<String>,
    seq: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    expires: Option<Option<u64>>,
    code: Option<u16>,
    message: Option<String>,
    user: Option<String>,
    client: Option<String>,
    count: Option<u64>,
}

/// Keeps a raw field that is `null` (`data` may be any JSON value, `null` too), where serde
/// would read it as absent.
fn raw_present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Tells a field that is `null` from one that is absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = ServerFields::deserialize(d)?;
        fn need<T, E: Error>(v: Option<T>, name: &'static str) -> Result<T, E> {
            v.ok_or_else(|| E::missing_field(name))
        }
        let id = f.id.map(|raw| raw.to_owned());
        Ok(match f.kind.as_str() {
            "welcome" => Self::Welcome {
                session: need(f.session, "session")?,
                node: need(f.node, "node")?,
                resumed: need(f.resumed, "resumed")?,
                heartbeat: need(f.heartbeat, "heartbeat")?,
                channels: need(f.channels, "channels")?,
            },
            "subscribed" => Self::Subscribed {
                id,
                channel: need(f.channel, "channel")?,
                seq: need(f.seq, "seq")?,
                epoch: need(f.epoch, "epoch")?,
                recovered: need(f.recovered, "recovered")?,
            },
            "unsubscribed" => Self::Unsubscribed {
                id,
                channel: need(f.channel, "channel")?,
            },
            "message" => Self::Message {
                channel: need(f.channel, "channel")?,
                seq: need(f.seq, "seq")?,
                data: need(f.data, "data")?.to_owned(),
            },
            "published" => Self::Published {
                id,
                channel: need(f.channel, "channel")?,
                seq: need(f.seq, "seq")?,
            },
            "pong" => Self::Pong { id },
            "refreshed" => Self::Refreshed {
                id,
                expires: need(f.expires, "expires")?,
            },
            "error" => Self::Error {
                id,
                code: need(f.code, "code")?,
                message: need(f.message, "message")?,
            },
            "join" | "leave" => {
                let presence = Presence {
                    channel: need(f.channel, "channel")?,
                    user: need(f.user, "user")?,
                    client: need(f.client, "client")?,
                    count: need(f.count, "count")?,
                };
                if f.kind == "join" {
                    Self::Join(presence)
                } else {
                    Self::Leave(presence)
                }
            }
            other => return Err(D::Error::unknown_variant(other, &[])),
        })
    }
}

impl ServerFrame {
    pub fn error(id: Option<Id>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            id,
            code: code as u16,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }
}

/// Builds the text of a `message` frame around `data`, which must be valid JSON: the payload is
/// copied as it was published, never re-parsed, so that one encoding serves every subscriber.
pub fn encode_message(channel: &str, seq: u64, data: &[u8]) -> Vec<u8> {
    let channel = serde_json::to_string(channel).expect("a str always serialises");
    let mut out = Vec::with_capacity(48 + channel.len() + data.len());
    out.extend_from_slice(br#"{"type":"message","channel":"#);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(br#","seq":"#);
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data);
    out.push(b'}');
    out
}

/// The codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    BadRequest = 400,
    Unauthorized = 401,
    Forbidden = 403,
    NotSubscribed = 404,
    TooLarge = 413,
    TooMany = 429,
    Unavailable = 503,
}

/// Makes a request id from a number, for clients.
pub fn numeric_id(n: u64) -> Id {
    RawValue::from_string(n.to_string()).expect("a number is JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(text: &str) -> (Option<String>, String) {
        match ClientFrame::parse(text) {
            Err(FrameError::BadRequest { id, message }) => {
                (id.map(|i| i.get().to_owned()), message)
            }
            other => panic!("{text}: expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn parses_every_client_frame() {
        let hello = ClientFrame::parse(
            r#"{"type":"hello","token":"t","session":"s","since":{"news":{"seq":41,"epoch":"k3f9"}},"extra":1}"#,
        )
        .unwrap();
        let ClientFrame::Hello {
            token,
            session,
            since,
        } = hello
        else {
            panic!()
        };
        assert_eq!(token.as_deref(), Some("t"));
        assert_eq!(session.as_deref(), Some("s"));
        assert_eq!(
            since["news"],
            Position {
                seq: 41,
                epoch: Some("k3f9".into())
            }
        );

        let sub = ClientFrame::parse(
            r#"{"type":"subscribe","id":"a","channel":"news","since":{"seq":0}}"#,
        )
        .unwrap();
        assert_eq!(sub.id().unwrap().get(), r#""a""#);
        let ClientFrame::Subscribe {
            channel,
            since,
            presence,
            ..
        } = sub
        else {
            panic!()
        };
        assert!(!presence, "no presence unless asked for");
        assert_eq!(
            (channel.as_str(), since),
            (
                "news",
                Some(Position {
                    seq: 0,
                    epoch: None
                })
            )
        );

        let watch = ClientFrame::parse(r#"{"type":"subscribe","channel":"room","presence":true}"#);
        assert!(matches!(
            watch,
            Ok(ClientFrame::Subscribe { presence: true, .. })
        ));
        assert!(bad(r#"{"type":"subscribe","channel":"room","presence":1}"#)
            .1
            .contains("presence"));

        let publish = ClientFrame::parse(
            r#"{"type":"publish","id":7,"channel":"c","data": {"a" : [1, 2]} }"#,
        )
        .unwrap();
        let ClientFrame::Publish { data, .. } = publish else {
            panic!()
        };
        assert_eq!(data.get(), r#"{"a" : [1, 2]}"#, "data keeps its bytes");

        assert!(matches!(
            ClientFrame::parse(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping { id: None })
        ));
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"unsubscribe","channel":"x"}"#),
            Ok(ClientFrame::Unsubscribe { .. })
        ));
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"refresh","token":"x"}"#),
            Ok(ClientFrame::Refresh { .. })
        ));
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        for text in [
            "",
            "[]",
            "[1]",
            "42",
            "\"x\"",
            "{",
            "{\"type\":\"ping\"} x",
            "null",
            "{\"a\":}",
            // A duplicate key is seen before the broken rest.
            "{\"type\":\"ping\",\"type\" x",
        ] {
            assert!(
                matches!(ClientFrame::parse(text), Err(FrameError::NotObject)),
                "{text}"
            );
        }
    }

    #[test]
    fn null_is_data_like_any_other_value() {
        let publish = ClientFrame::parse(r#"{"type":"publish","channel":"c","data":null}"#);
        assert!(matches!(publish, Ok(ClientFrame::Publish { data, .. }) if data.get() == "null"));
        let message: ServerFrame =
            serde_json::from_slice(&encode_message("c", 1, b"null")).unwrap();
        assert!(matches!(message, ServerFrame::Message { data, .. } if data.get() == "null"));
        assert!(bad(r#"{"type":"publish","channel":"c"}"#)
            .1
            .contains("data"));
    }

    #[test]
    fn bad_requests_keep_their_id() {
        assert_eq!(bad(r#"{"type":"nope","id":3}"#).0.as_deref(), Some("3"));
        assert!(bad(r#"{"id":1}"#).1.contains("type"));
        assert!(bad(r#"{"type":5}"#).1.contains("type"));
        assert!(bad(r#"{"type":"subscribe","id":"x"}"#)
            .1
            .contains("channel"));
        assert!(bad(r#"{"type":"subscribe","channel":7}"#)
            .1
            .contains("channel"));
        assert!(
            bad(r#"{"type":"subscribe","channel":"a","since":{"seq":-1}}"#)
                .1
                .contains("since")
        );
        assert!(bad(r#"{"type":"publish","channel":"a"}"#)
            .1
            .contains("data"));
        assert!(bad(r#"{"type":"ping","type":"ping"}"#)
            .1
            .contains("duplicate"));
    }

    #[test]
    fn encodes_messages_once() {
        let text = encode_message("news", 42, br#"{"x": 1}"#);
        let frame: ServerFrame = serde_json::from_slice(&text).unwrap();
        let ServerFrame::Message { channel, seq, data } = frame else {
            panic!()
        };
        assert_eq!(
            (channel.as_str(), seq, data.get()),
            ("news", 42, r#"{"x": 1}"#)
        );
    }

    #[test]
    fn server_frames_round_trip() {
        let frame = ServerFrame::Refreshed {
            id: Some(numeric_id(1)),
            expires: None,
        };
        assert_eq!(
            frame.to_json(),
            r#"{"type":"refreshed","id":1,"expires":null}"#
        );
        let back: ServerFrame = serde_json::from_str(&frame.to_json()).unwrap();
        assert!(matches!(
            back,
            ServerFrame::Refreshed {
                expires: None,
                id: Some(_)
            }
        ));
        let join = ServerFrame::Join(Presence {
            channel: "room".into(),
            user: "alice".into(),
            client: "9f3c".into(),
            count: 2,
        });
        let text = r#"{"type":"join","channel":"room","user":"alice","client":"9f3c","count":2}"#;
        assert_eq!(join.to_json(), text);
        let back: ServerFrame = serde_json::from_str(&text.replace("join", "leave")).unwrap();
        assert!(matches!(back, ServerFrame::Leave(p) if p.client == "9f3c" && p.count == 2));
        let error = ServerFrame::error(None, ErrorCode::NotSubscribed, "not subscribed");
        assert_eq!(
            error.to_json(),
            r#"{"type":"error","code":404,"message":"not subscribed"}"#
        );
    }
}
