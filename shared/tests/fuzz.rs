//! Property tests of the protocol types: the client frame parser takes whatever a socket
//! delivers and must never panic, and must classify every text the way PROTOCOL.md says (not a
//! JSON object: close 1007; an object: a request, or an `error` reply with code 400).
//!
//! Each property runs proptest's default 256 cases, which takes well under a second. For a
//! longer hunt: `PROPTEST_CASES=100000 cargo test --release -p shared --test fuzz`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::value::RawValue;
use serde_json::Value;
use shared::frame::{encode_message, ChannelState, Id, Presence};
use shared::{valid_channel, ChannelPattern, ClientFrame, FrameError, Position, ServerFrame};

// ---------------------------------------------------------------------------------------------
// Strategies

/// Any JSON value serde_json can represent, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| {
            serde_json::Number::from_f64(f).map(Value::Number)
        }),
        any::<String>().prop_map(Value::String),
        "[a-z.]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}|.{0,6}", inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn raw(value: &Value) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("a Value serialises to JSON")
}

/// A request id as a client would send it: a number or a string (never `null`, which means no
/// id).
fn id() -> impl Strategy<Value = Id> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        json_value().prop_filter("not null", |v| !v.is_null()),
    ]
    .prop_map(|v| raw(&v))
}

fn channel() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:@/-]{1,16}",
        Just("news".to_owned()),
        any::<String>(),
    ]
}

fn position() -> impl Strategy<Value = Position> {
    (any::<u64>(), proptest::option::of(any::<String>()))
        .prop_map(|(seq, epoch)| Position { seq, epoch })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let opt_id = || proptest::option::of(id());
    prop_oneof![
        (
            proptest::option::of(any::<String>()),
            proptest::option::of(any::<String>()),
            prop::collection::btree_map(channel(), position(), 0..4),
        )
            .prop_map(|(token, session, since)| ClientFrame::Hello {
                token,
                session,
                since
            }),
        (
            opt_id(),
            channel(),
            proptest::option::of(position()),
            any::<bool>()
        )
            .prop_map(|(id, channel, since, presence)| ClientFrame::Subscribe {
                id,
                channel,
                since,
                presence
            }),
        (opt_id(), channel()).prop_map(|(id, channel)| ClientFrame::Unsubscribe { id, channel }),
        (opt_id(), channel(), json_value()).prop_map(|(id, channel, data)| {
            ClientFrame::Publish {
                id,
                channel,
                data: raw(&data),
            }
        }),
        opt_id().prop_map(|id| ClientFrame::Ping { id }),
        (opt_id(), any::<String>()).prop_map(|(id, token)| ClientFrame::Refresh { id, token }),
    ]
}

fn channel_state() -> impl Strategy<Value = ChannelState> {
    (any::<u64>(), any::<String>(), any::<bool>()).prop_map(|(seq, epoch, recovered)| {
        ChannelState {
            seq,
            epoch,
            recovered,
        }
    })
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let opt_id = || proptest::option::of(id());
    prop_oneof![
        (
            any::<String>(),
            any::<String>(),
            any::<bool>(),
            any::<u64>(),
            prop::collection::btree_map(channel(), channel_state(), 0..4),
        )
            .prop_map(|(session, node, resumed, heartbeat, channels)| {
                ServerFrame::Welcome {
                    session,
                    node,
                    resumed,
                    heartbeat,
                    channels,
                }
            }),
        (
            opt_id(),
            channel(),
            any::<u64>(),
            any::<String>(),
            any::<bool>()
        )
            .prop_map(|(id, channel, seq, epoch, recovered)| {
                ServerFrame::Subscribed {
                    id,
                    channel,
                    seq,
                    epoch,
                    recovered,
                }
            }),
        (opt_id(), channel()).prop_map(|(id, channel)| ServerFrame::Unsubscribed { id, channel }),
        (channel(), any::<u64>(), json_value()).prop_map(|(channel, seq, data)| {
            ServerFrame::Message {
                channel,
                seq,
                data: raw(&data),
            }
        }),
        (opt_id(), channel(), any::<u64>()).prop_map(|(id, channel, seq)| ServerFrame::Published {
            id,
            channel,
            seq
        }),
        opt_id().prop_map(|id| ServerFrame::Pong { id }),
        (opt_id(), proptest::option::of(any::<u64>()))
            .prop_map(|(id, expires)| ServerFrame::Refreshed { id, expires }),
        (opt_id(), any::<u16>(), any::<String>())
            .prop_map(|(id, code, message)| { ServerFrame::Error { id, code, message } }),
        (
            any::<bool>(),
            channel(),
            any::<String>(),
            any::<String>(),
            any::<u64>()
        )
            .prop_map(|(joined, channel, user, client, count)| {
                let presence = Presence {
                    channel,
                    user,
                    client,
                    count,
                };
                if joined {
                    ServerFrame::Join(presence)
                } else {
                    ServerFrame::Leave(presence)
                }
            }),
    ]
}

/// One edit of a frame's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    /// Copies a slice of the text to another place (unbalanced brackets and quotes).
    Duplicate(Index, Index, Index),
}

/// Bytes that mean something to a JSON parser, and a few that do not.
const JSON_BYTES: &[u8] = b"{}[]\",:\\0123456789.eE+-tfnul \t\n\r\x00\x7f\xc3\xff";

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = || prop_oneof![prop::sample::select(JSON_BYTES), any::<u8>()];
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1..=255u8).prop_map(|(i, mask)| Mutation::Flip(i, mask)),
        (any::<Index>(), byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(a, b, c)| Mutation::Duplicate(a, b, c)),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Mutation::Flip(i, mask) if len > 0 => bytes[i.index(len)] ^= mask,
            Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), b),
            Mutation::Delete(i) if len > 0 => {
                bytes.remove(i.index(len));
            }
            Mutation::Duplicate(a, b, at) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                let slice = bytes[a.min(b)..a.max(b)].to_vec();
                let at = at.index(len + 1);
                bytes.splice(at..at, slice);
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The classification oracle

#[derive(Debug, PartialEq)]
enum Class {
    NotObject,
    /// `Ok` or `BadRequest`.
    Object,
}

fn class_of(result: &Result<ClientFrame, FrameError>) -> Class {
    match result {
        Err(FrameError::NotObject) => Class::NotObject,
        Ok(_) | Err(FrameError::BadRequest { .. }) => Class::Object,
    }
}

/// What a text is, decided without the parser under test. serde_json's `Value` parser is
/// stricter than the JSON grammar (it refuses nesting deeper than 128, numbers beyond f64 and
/// lone surrogates in `\u` escapes); where it refuses a text, serde_json's grammar check
/// (`IgnoredAny`, which scans without building values or recursing) decides.
fn expected_class(text: &str) -> Class {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => Class::Object,
        Ok(_) => Class::NotObject,
        Err(_) => {
            let grammatical = serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            let first = text
                .trim_start_matches([' ', '\t', '\n', '\r'])
                .chars()
                .next();
            if grammatical && first == Some('{') {
                Class::Object
            } else {
                Class::NotObject
            }
        }
    }
}

fn check_classified(text: &str) -> Result<(), TestCaseError> {
    let result = ClientFrame::parse(text);
    prop_assert_eq!(
        class_of(&result),
        expected_class(text),
        "{:?} parsed as {:?}",
        text,
        result
    );
    // An id that comes back comes back with the bytes the client sent.
    let id = match &result {
        Ok(frame) => frame.id(),
        Err(FrameError::BadRequest { id, .. }) => id.as_ref(),
        Err(FrameError::NotObject) => None,
    };
    if let Some(id) = id {
        prop_assert!(text.contains(id.get()), "{:?} has no id {}", text, id.get());
        prop_assert_ne!(id.get(), "null");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties of the client frame parser

proptest! {
    #[test]
    fn arbitrary_strings_are_classified(text in any::<String>()) {
        check_classified(&text)?;
    }

    #[test]
    fn json_like_strings_are_classified(text in r#"[ {}\[\]",:0-9a-z\\.eE+-]{0,64}"#) {
        check_classified(&text)?;
        check_classified(&format!("{{{text}"))?;
    }

    #[test]
    fn arbitrary_bytes_are_classified(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_classified(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn valid_frames_round_trip(frame in client_frame()) {
        let text = serde_json::to_string(&frame).unwrap();
        let back = ClientFrame::parse(&text)
            .unwrap_or_else(|e| panic!("{text} did not parse: {e:?}"));
        // Debug is derived and shows every field (raw values as their text).
        prop_assert_eq!(format!("{back:?}"), format!("{frame:?}"));
    }

    #[test]
    fn mutated_frames_are_classified(
        frame in client_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let text = serde_json::to_string(&frame).unwrap();
        check_classified(&mutate(&text, &mutations))?;
    }

    #[test]
    fn publish_data_keeps_its_bytes(data in json_value(), pretty in any::<bool>()) {
        let data = if pretty {
            serde_json::to_string_pretty(&data).unwrap()
        } else {
            data.to_string()
        };
        let text = format!(r#"{{"type":"publish","channel":"news","data":{data}}}"#);
        match ClientFrame::parse(&text) {
            Ok(ClientFrame::Publish { data: got, .. }) => prop_assert_eq!(got.get(), data.as_str()),
            other => prop_assert!(false, "{} parsed as {:?}", text, other),
        }
    }

    /// Every field of every frame type, set to any JSON value: the frame is a request exactly
    /// when each field the type reads has the type PROTOCOL.md gives it, else a 400 that names
    /// the field.
    #[test]
    fn wrongly_typed_fields_are_bad_requests(
        kind in prop::sample::select(&["hello", "subscribe", "unsubscribe", "publish", "ping", "refresh", "nope"][..]),
        field in prop::sample::select(&["type", "id", "channel", "since", "data", "token", "session", "presence"][..]),
        value in prop_oneof![
            json_value(),
            (json_value(), json_value()).prop_map(|(seq, epoch)| serde_json::json!({"seq": seq, "epoch": epoch})),
            json_value().prop_map(|seq| serde_json::json!({"news": {"seq": seq}})),
        ],
    ) {
        let mut object = serde_json::json!({
            "type": kind, "id": 1, "channel": "news", "data": {"a": 1}, "token": "t",
        });
        object[field] = value.clone();
        let text = object.to_string();
        let result = ClientFrame::parse(&text);
        let is = |v: &Value, f: fn(Value) -> bool| f(v.clone());
        let string = |v: Value| serde_json::from_value::<String>(v).is_ok();
        let opt_string = |v: Value| serde_json::from_value::<Option<String>>(v).is_ok();
        let kind = object["type"].as_str().unwrap_or("");
        // (field that is wrong, when it is)
        let wrong: Option<&str> = match field {
            "type" if value.is_null() || !value.is_string() => Some("type"),
            "type" => None,
            "channel" if ["subscribe", "unsubscribe", "publish"].contains(&kind) && !is(&value, string) => Some("channel"),
            "token" if kind == "refresh" && !is(&value, string) => Some("token"),
            "token" | "session" if kind == "hello" && !is(&value, opt_string) => Some(field),
            "since" if kind == "subscribe"
                && serde_json::from_value::<Option<Position>>(value.clone()).is_err() => Some("since"),
            "since" if kind == "hello"
                && serde_json::from_value::<Option<BTreeMap<String, Position>>>(value.clone()).is_err() => Some("since"),
            "presence" if kind == "subscribe"
                && serde_json::from_value::<Option<bool>>(value.clone()).is_err() => Some("presence"),
            _ => None,
        };
        let known = ["hello", "subscribe", "unsubscribe", "publish", "ping", "refresh"].contains(&kind);
        match (&result, wrong) {
            (Err(FrameError::BadRequest { message, .. }), Some(name)) => {
                prop_assert!(message.contains(name), "{}: {}", text, message)
            }
            (Err(FrameError::BadRequest { message, .. }), None) if !known => {
                prop_assert!(message.contains("unknown frame type"), "{}: {}", text, message)
            }
            (Ok(frame), None) => {
                prop_assert!(known);
                // The id is echoed verbatim; `null` is no id. Hello has none.
                let id = frame.id().map(|id| id.get().to_owned());
                let sent = object["id"].clone();
                let expected = (!sent.is_null() && kind != "hello").then(|| sent.to_string());
                prop_assert_eq!(id, expected);
                if let ClientFrame::Publish { data, .. } = frame {
                    prop_assert_eq!(data.get(), object["data"].to_string());
                }
            }
            _ => prop_assert!(false, "{} parsed as {:?}, expected wrong field {:?}", text, result, wrong),
        }
    }

    /// `seq` of a position is a u64: a bigger, negative or fractional number is a 400.
    #[test]
    fn huge_numbers(
        seq in prop_oneof![
            "(0|[1-9][0-9]{0,24})",
            "-[1-9][0-9]{0,24}",
            "(0|[1-9][0-9]{0,400})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,4})?",
        ],
    ) {
        let text = format!(r#"{{"type":"subscribe","id":{seq},"channel":"a","since":{{"seq":{seq}}}}}"#);
        let result = ClientFrame::parse(&text);
        let fits = seq.bytes().all(|b| b.is_ascii_digit()).then(|| seq.parse::<u64>().ok()).flatten();
        match (fits, &result) {
            (Some(n), Ok(ClientFrame::Subscribe { id, since: Some(since), .. })) => {
                prop_assert_eq!(since.seq, n);
                prop_assert_eq!(id.as_ref().map(|id| id.get()), Some(seq.as_str()));
            }
            (None, Err(FrameError::BadRequest { id, message })) => {
                prop_assert!(message.contains("since"), "{}", message);
                // The id is any JSON number, echoed as it came, however large.
                prop_assert_eq!(id.as_ref().map(|id| id.get()), Some(seq.as_str()));
            }
            _ => prop_assert!(false, "{} parsed as {:?}", text, result),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deep nesting

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// serde_json stops at 128 levels when it builds values, with an error rather than a stack
/// overflow.
#[test]
fn serde_json_has_a_recursion_limit() {
    assert!(serde_json::from_str::<Value>(&nested(100)).is_ok());
    for depth in [128, 129, 10_000, 100_000] {
        let err = serde_json::from_str::<Value>(&nested(depth)).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        assert!(err.is_syntax());
    }
}

/// The frame parser never builds values from client input: `data`, `id` and unknown fields are
/// scanned (without recursion) and kept as raw text, and typed fields fail on the first
/// unexpected token. So deep nesting neither overflows the stack nor hits the recursion limit.
#[test]
fn deep_nesting_neither_overflows_nor_misclassifies() {
    for depth in [127, 128, 10_000, 100_000] {
        let deep = nested(depth);
        let open = "[".repeat(depth);

        assert!(matches!(
            ClientFrame::parse(&open),
            Err(FrameError::NotObject)
        ));
        assert!(matches!(
            ClientFrame::parse(&deep),
            Err(FrameError::NotObject)
        ));
        let unclosed = format!(r#"{{"type":"publish","channel":"a","data":{open}}}"#);
        assert!(matches!(
            ClientFrame::parse(&unclosed),
            Err(FrameError::NotObject)
        ));

        // A deep `data` is a valid publish, kept byte for byte (the hub never parses it).
        let publish = format!(r#"{{"type":"publish","id":{deep},"channel":"a","data":{deep}}}"#);
        match ClientFrame::parse(&publish) {
            Ok(ClientFrame::Publish { id, data, .. }) => {
                assert_eq!(data.get(), deep);
                assert_eq!(id.unwrap().get(), deep);
            }
            other => panic!("depth {depth}: {other:?}"),
        }
        let ping = format!(r#"{{"type":"ping","x":{deep}}}"#);
        assert!(matches!(
            ClientFrame::parse(&ping),
            Ok(ClientFrame::Ping { .. })
        ));

        // An object of objects is still an object: a 400 for its missing `type`.
        let objects = format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        match ClientFrame::parse(&objects) {
            Err(FrameError::BadRequest { message, .. }) => assert!(message.contains("type")),
            other => panic!("depth {depth}: {other:?}"),
        }

        for since in [
            format!(r#"{{"type":"subscribe","channel":"a","since":{deep}}}"#),
            format!(r#"{{"type":"subscribe","channel":"a","since":{{"seq":1,"epoch":{deep}}}}}"#),
            format!(r#"{{"type":"hello","since":{{"a":{deep}}}}}"#),
        ] {
            match ClientFrame::parse(&since) {
                Err(FrameError::BadRequest { message, .. }) => assert!(message.contains("since")),
                other => panic!("depth {depth}: {other:?}"),
            }
        }

        // And a client that reads a deep message does not overflow either.
        let message = encode_message("a", 1, deep.as_bytes());
        let frame: ServerFrame = serde_json::from_slice(&message).unwrap();
        assert!(matches!(frame, ServerFrame::Message { data, .. } if data.get() == deep));
    }
}

#[test]
fn frames_that_are_not_objects() {
    for text in [
        "\u{feff}{\"type\":\"ping\"}",
        "\u{a0}{\"type\":\"ping\"}",
        "{\"type\":\"ping\",}",
        "{\"type\":\"ping\"}{}",
        "{\"type\":\"ping\",\"x\":\"a\tb\"}",
        "{\"type\":\"ping\",\"x\":01}",
        "{'type':'ping'}",
        "{type:\"ping\"}",
        "[{\"type\":\"ping\"}]",
        "true",
        " ",
    ] {
        assert!(
            matches!(ClientFrame::parse(text), Err(FrameError::NotObject)),
            "{text:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Server frames

proptest! {
    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let text = frame.to_json();
        let back: ServerFrame = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{text} did not parse: {e}"));
        prop_assert_eq!(format!("{back:?}"), format!("{frame:?}"));
        prop_assert_eq!(back.to_json(), text);
    }

    /// Whatever a broken server or proxy sends, a client reading it gets an error, not a panic;
    /// what it does read writes back the same.
    #[test]
    fn mutated_server_frames_do_not_panic(
        frame in server_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let text = mutate(&frame.to_json(), &mutations);
        if let Ok(back) = serde_json::from_str::<ServerFrame>(&text) {
            let again: ServerFrame = serde_json::from_str(&back.to_json()).unwrap();
            prop_assert_eq!(format!("{again:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn encoded_messages_parse_back(channel in any::<String>(), seq in any::<u64>(), data in json_value()) {
        let data = data.to_string();
        let text = encode_message(&channel, seq, data.as_bytes());
        match serde_json::from_slice::<ServerFrame>(&text) {
            Ok(ServerFrame::Message { channel: c, seq: s, data: d }) => {
                prop_assert_eq!(c, channel);
                prop_assert_eq!(s, seq);
                prop_assert_eq!(d.get(), data);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Channel names and patterns

fn channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-_:@/".contains(&b)
}

/// Strings mostly of channel characters, with some of anything else.
fn channelish() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9._:@/-]{0,140}",
        1 => "[A-Za-z0-9._:@/* \"\\\\é\u{0}-]{0,140}",
        1 => any::<String>(),
    ]
}

proptest! {
    #[test]
    fn channel_names(name in channelish()) {
        let expected = (1..=128).contains(&name.len()) && name.bytes().all(channel_byte);
        prop_assert_eq!(valid_channel(&name), expected, "{:?}", name);
    }

    #[test]
    fn channel_patterns(name in "[A-Za-z0-9._:@/-]{1,40}", other in channelish(), cut in any::<Index>()) {
        let (starred_name, longer) = (format!("{name}*"), format!("{name}x"));
        prop_assert!(ChannelPattern::new(&name).matches(&name));
        prop_assert!(ChannelPattern::new("*").matches(&name));
        prop_assert!(ChannelPattern::new(&starred_name).matches(&name));
        prop_assert!(!ChannelPattern::new(&name).matches(&longer));
        // Every prefix of a name, starred, matches it.
        let prefix = &name[..cut.index(name.len() + 1)];
        let starred_prefix = format!("{prefix}*");
        prop_assert!(ChannelPattern::new(&starred_prefix).matches(&name));
        // A pattern matches nothing outside what it names.
        let exact = ChannelPattern::new(&other);
        prop_assert_eq!(exact.matches(&name), other == name || (other.ends_with('*') && name.starts_with(&other[..other.len() - 1])));
        // A `*` anywhere but at the end is literal: such a pattern matches no valid channel.
        let starred = format!("{prefix}*x");
        prop_assert!(!ChannelPattern::new(&starred).matches(&name));
    }
}
