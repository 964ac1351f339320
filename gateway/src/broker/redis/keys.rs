//! The key schema in Redis, and the payloads of its pub/sub topics.
//!
//! Every key of a channel carries the hash tag `{channel}`, so that a cluster keeps them, and
//! the channel's topic, on one shard:
//! - `bgw:{ch}:seq`: the channel's last seq; `bgw:{ch}:epoch`: the name of its sequence. Both
//!   live for [`CHANNEL_TTL`](crate::broker::CHANNEL_TTL) after the last publish or read.
//! - `bgw:{ch}:hist`: a stream of the retained messages, entry id `<seq>-0`, fields `d` (data)
//!   and `t` (publish time, ms); capped by `--history-size`, expires `--history-ttl` after the
//!   last publish, and entries older than that are not replayed.
//! - `bgw:{ch}:line` (behind Sentinel only): the replication id of the master that numbered
//!   the channel's last message; see `scripts.rs`.
//! - `bgw:{ch}:once:<key>`: an idempotent publish's `<seq>:<epoch>`, for its window.
//! - `bgw:{ch}:presence`: a sorted set of the members of a presence channel (each a connection's
//!   presence id), scored by when each expires unless reported again (ms since the epoch);
//!   `bgw:{ch}:presence:who`: a hash of their records (JSON).
//! - `bgw:{ch}:msg`: the pub/sub topic, payload `<seq>:<epoch>:<data>` for a message, and
//!   `j:<count>:<record>` or `l:<count>:<record>` for a member that joined or left a presence
//!   channel (`count`: its members after that).
//! - `bgw:session:{id}`: a hash with `record` (JSON) and `owner` (JSON), expiring after the
//!   session TTL.
//! - `bgw:node:{node}`: a node's control topic, for session takeovers.
//! - `bgw:positions:{node}`: a hash of the node's positions (`c:<channel>` to a JSON position,
//!   `run` to `<instance>:<tick>`), replaced at each save of its sessions and expiring after
//!   the session TTL.
//! - `bgw:nodes`: a sorted set of node ids, scored by when their last report expires (ms since
//!   the epoch); `bgw:channels:{node}`: a hash of the node's channels and their local subscriber
//!   counts, replaced at each report and expiring with it.
//! - `bgw:user:{sub}:conns`: a sorted set of a user's connections (`<node>/<conn>`), scored
//!   by when each expires unless refreshed (ms since the epoch), for
//!   `--max-connections-per-user`.
//! - `bgw:control`: the topic every node subscribes to, for what back ends ask of connections
//!   anywhere (disconnect, unsubscribe, subscribe): a JSON [`Control`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::broker::{Control, Delivery, Event};
use crate::presence::Member;

/// The topic of [`Control`]s, which every node subscribes to.
pub const CONTROL_TOPIC: &str = "bgw:control";

/// The keys of a channel, in the order the scripts take them.
pub fn channel_keys(channel: &str) -> [String; 4] {
    [
        format!("bgw:{{{channel}}}:seq"),
        format!("bgw:{{{channel}}}:epoch"),
        format!("bgw:{{{channel}}}:hist"),
        format!("bgw:{{{channel}}}:line"),
    ]
}

/// The record of an idempotent publish: on the channel's shard, so that one script checks it
/// and publishes.
pub fn once_key(channel: &str, key: &str) -> String {
    format!("bgw:{{{channel}}}:once:{key}")
}

pub fn presence_keys(channel: &str) -> [String; 2] {
    [
        format!("bgw:{{{channel}}}:presence"),
        format!("bgw:{{{channel}}}:presence:who"),
    ]
}

pub fn channel_topic(channel: &str) -> String {
    format!("bgw:{{{channel}}}:msg")
}

pub fn control_topic(node: &str) -> String {
    format!("bgw:node:{{{node}}}")
}

/// The set of nodes that report their channels.
pub const NODES_KEY: &str = "bgw:nodes";

/// A node's report of its channels; the next one is written beside it and renamed over it (the
/// same hash tag keeps both on one shard).
pub fn node_channels_keys(node: &str) -> [String; 2] {
    [
        format!("bgw:channels:{{{node}}}"),
        format!("bgw:channels:{{{node}}}:next"),
    ]
}

/// A node's positions; the next save is written beside them and renamed over them.
pub fn node_positions_keys(node: &str) -> [String; 2] {
    [
        format!("bgw:positions:{{{node}}}"),
        format!("bgw:positions:{{{node}}}:next"),
    ]
}

pub fn user_connections_key(user: &str) -> String {
    format!("bgw:user:{{{user}}}:conns")
}

pub fn session_key(id: &str) -> String {
    format!("bgw:session:{{{id}}}")
}

/// What a node's control topic carries: one of its connections lost its session to another.
#[derive(Serialize, Deserialize)]
pub struct TakeoverNotice {
    pub session: String,
    pub conn: u64,
}

/// The event a pub/sub message stands for; `None` for a malformed one.
pub fn parse_push(topic: &[u8], payload: &[u8]) -> Option<Event> {
    let topic = std::str::from_utf8(topic).ok()?;
    if topic == CONTROL_TOPIC {
        let control: Control = serde_json::from_slice(payload).ok()?;
        return Some(Event::Control(control));
    }
    if topic.starts_with("bgw:node:") {
        let notice: TakeoverNotice = serde_json::from_slice(payload).ok()?;
        return Some(Event::TakenOver {
            session: notice.session,
            conn: notice.conn,
        });
    }
    let channel = topic.strip_prefix("bgw:{")?.strip_suffix("}:msg")?;
    if let [kind @ (b'j' | b'l'), b':', rest @ ..] = payload {
        return parse_presence(channel, *kind == b'j', rest);
    }
    let mut parts = payload.splitn(3, |b| *b == b':');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let data = parts.next()?;
    Some(Event::Message(Delivery {
        channel: channel.into(),
        seq,
        epoch: epoch.into(),
        data: Bytes::copy_from_slice(data),
    }))
}

/// A member that joined or left `channel`: `<count>:<record>`.
fn parse_presence(channel: &str, joined: bool, payload: &[u8]) -> Option<Event> {
    let (count, record) = payload.split_at(payload.iter().position(|b| *b == b':')?);
    let count = std::str::from_utf8(count).ok()?.parse().ok()?;
    let member: Member = serde_json::from_slice(&record[1..]).ok()?;
    // Only what a client may see: never the session.
    Some(Event::Presence {
        joined,
        presence: shared::frame::Presence {
            channel: channel.to_owned(),
            user: member.user,
            client: member.client,
            count,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_parse() {
        let Some(Event::Message(d)) = parse_push(b"bgw:{news}:msg", b"42:ab12:{\"x\":\"a:b\"}")
        else {
            panic!()
        };
        assert_eq!(
            (&*d.channel, d.seq, &*d.epoch, &d.data[..]),
            ("news", 42, "ab12", &b"{\"x\":\"a:b\"}"[..])
        );
        assert!(matches!(
            parse_push(b"bgw:node:{n1}", br#"{"session":"s","conn":3}"#),
            Some(Event::TakenOver { conn: 3, .. })
        ));
        assert!(matches!(
            parse_push(
                b"bgw:control",
                br#"{"op":"unsubscribe","target":{"user":"alice"},"channel":"news"}"#
            ),
            Some(Event::Control(Control::Unsubscribe { .. }))
        ));
        let record = br#"{"session":"s1","user":"alice","node":"n","client":"c1","since":1}"#;
        let joined = parse_push(b"bgw:{room}:msg", &[b"j:3:".as_slice(), record].concat());
        let Some(Event::Presence { joined, presence }) = joined else {
            panic!()
        };
        assert!(joined);
        assert_eq!(
            (
                &*presence.channel,
                &*presence.user,
                &*presence.client,
                presence.count
            ),
            ("room", "alice", "c1", 3)
        );
        assert!(matches!(
            parse_push(b"bgw:{room}:msg", &[b"l:0:".as_slice(), record].concat()),
            Some(Event::Presence { joined: false, .. })
        ));
        assert!(parse_push(b"bgw:{room}:msg", b"j:x:{}").is_none());
        assert!(parse_push(b"bgw:control", b"{}").is_none());
        assert!(parse_push(b"bgw:{news}:msg", b"x:ab:1").is_none());
        assert!(parse_push(b"other", b"1:a:1").is_none());
    }
}
