//! The one task per node that tells the broker of its members: each change as it comes, in
//! order, and every `--node-report-interval` every member the node holds.
//!
//! The broker sends a `join` or `leave` only for a real change (a member added that was
//! absent, removed that was present), so the order of a node's calls decides its frames. One
//! task makes them all: the report scans the node's sessions only after the changes queued
//! before it went out, and a change made after the scan is queued after the report. A report
//! therefore never adds back a member whose leave went out, nor removes one whose join did.
//! Within a batch only each member's last change counts: a join and a leave that meet there
//! cancel out. The broker keeps each channel's changes in their order, since the member count
//! after each decides whether it is announced (`--presence-max-join-leave`).
//!
//! The report puts the broker right when a change was lost (the queue was full, or the broker
//! failed the call): a missed join is added and announced then, a missed leave removed and
//! announced, and it pushes back the expiry of the node's members. A leave lost by a node that
//! then died is the broker's to notice: the member expires.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{now_millis, Change, Member, Request};
use crate::node::Node;

/// Requests taken from the queue at once.
const BATCH: usize = 1024;

/// A member in one channel: the channel and the connection's presence id.
type Key = (Arc<str>, String);

/// Runs until `stop`; what is queued then still goes to the broker (the drain's leaves).
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let Some(mut inbox) = node.presence.inbox.lock().take() else {
        return;
    };
    if !node.presence.enabled() {
        return;
    }
    let interval = node.config.node_report_interval;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announcer = Announcer {
        node,
        reported: HashMap::new(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                take_queued(&mut inbox, &mut batch);
                announcer.apply(&mut batch).await;
                return;
            }
            received = inbox.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return;
                }
                announcer.apply(&mut batch).await;
            }
            _ = ticks.tick() => {
                take_queued(&mut inbox, &mut batch);
                announcer.apply(&mut batch).await;
                announcer.report().await;
            }
        }
    }
}

fn take_queued(inbox: &mut mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
    while let Ok(request) = inbox.try_recv() {
        batch.push(request);
    }
}

struct Announcer {
    node: Arc<Node>,
    /// The members the broker has from this node, as far as the node knows: with their
    /// `since`, and for the next report to tell which left.
    reported: HashMap<Key, Member>,
}

impl Announcer {
    /// Sends the changes of `batch` and answers its flushes.
    async fn apply(&mut self, batch: &mut Vec<Request>) {
        let mut changes = Vec::new();
        let mut flushes = Vec::new();
        for request in batch.drain(..) {
            match request {
                Request::Change(change) => changes.push(change),
                Request::Flush(done) => flushes.push(done),
            }
        }
        let changes = last_of_each(changes);
        let told = self.tell(&changes).await;
        for change in &changes {
            let key = (change.channel.clone(), change.member.client.clone());
            if change.joined {
                self.reported
                    .entry(key)
                    .or_insert_with(|| change.member.clone());
            } else if told {
                self.reported.remove(&key);
            }
            // A leave that failed stays reported: the next report finds it gone, and removes
            // it then.
        }
        for done in flushes {
            let _ = done.send(());
        }
    }

    /// Every member the node holds now (each pushed back from expiry, and added where the
    /// broker lacks it), and those reported before that are gone.
    async fn report(&mut self) {
        if !self.node.broker.available() {
            return;
        }
        let presence = &self.node.presence;
        let now = now_millis();
        let mut current = HashMap::new();
        for session in self.node.sessions.live() {
            let mut client = None;
            for channel in session.positions.channels() {
                if !presence.covers(&channel) {
                    continue;
                }
                let client = client
                    .get_or_insert_with(|| presence.client_id(session.owner.conn))
                    .clone();
                let key = (channel, client);
                let since = self.reported.get(&key).map_or(now, |member| member.since);
                current.insert(key, presence.member(&session, since));
            }
        }
        let left: Vec<(Key, Member)> = self
            .reported
            .iter()
            .filter(|(key, _)| !current.contains_key(*key))
            .map(|(key, member)| (key.clone(), member.clone()))
            .collect();
        let change = |(channel, _): &Key, member: &Member, joined| Change {
            channel: channel.clone(),
            member: member.clone(),
            joined,
        };
        let mut changes: Vec<Change> = left.iter().map(|(k, m)| change(k, m, false)).collect();
        changes.extend(current.iter().map(|(k, m)| change(k, m, true)));
        self.reported = current;
        if !self.tell(&changes).await {
            // Their leaves go with the next report.
            self.reported.extend(left);
        }
    }

    /// Sends `changes` to the broker; whether it took them.
    async fn tell(&self, changes: &[Change]) -> bool {
        if changes.is_empty() {
            return true;
        }
        let config = &self.node.config;
        let ttl = config.node_report_interval * 3;
        let max = config.presence_max_join_leave;
        match self.node.broker.change_presence(changes, ttl, max).await {
            Ok(()) => true,
            Err(e) => {
                debug!(changes = changes.len(), error = %e, "presence changes failed; the next report repairs them");
                false
            }
        }
    }
}

/// Each member's last change, in the order of those: what a batch comes to.
fn last_of_each(changes: Vec<Change>) -> Vec<Change> {
    let key = |change: &Change| (change.channel.clone(), change.member.client.clone());
    let mut last: HashMap<Key, usize> = HashMap::with_capacity(changes.len());
    for (i, change) in changes.iter().enumerate() {
        last.insert(key(change), i);
    }
    changes
        .into_iter()
        .enumerate()
        .filter(|(i, change)| last[&key(change)] == *i)
        .map(|(_, change)| change)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(channel: &str, client: &str, joined: bool) -> Change {
        Change {
            channel: Arc::from(channel),
            member: Member {
                session: "s".into(),
                user: "u".into(),
                node: "n".into(),
                client: client.into(),
                since: 0,
            },
            joined,
        }
    }

    #[test]
    fn a_batch_keeps_each_members_last_change() {
        let batch = vec![
            change("a", "1", true),
            change("a", "2", true),
            change("a", "1", false),
            change("b", "1", true),
            change("a", "2", false),
            change("a", "2", true),
        ];
        let kept: Vec<(String, String, bool)> = last_of_each(batch)
            .into_iter()
            .map(|c| (c.channel.to_string(), c.member.client, c.joined))
            .collect();
        assert_eq!(
            kept,
            vec![
                ("a".into(), "1".into(), false),
                ("b".into(), "1".into(), true),
                ("a".into(), "2".into(), true),
            ]
        );
    }
}
