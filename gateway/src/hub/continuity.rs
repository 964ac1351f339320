//! A channel's continuity: each message from the broker is the next one, a repeat to drop, a
//! gap to repair from history, or the start of a new epoch; and after a broker outage, every
//! channel repaired from history.

use std::sync::Arc;

use shared::ServerFrame;
use tracing::warn;

use super::{Channel, Hub};
use crate::broker::Delivery;
use crate::fanout::{Command, Fanout};
use crate::metrics::InProgress;
use crate::wire;

impl Hub {
    /// After a broker outage: links every channel again and repairs each from history, so that
    /// what was published while the link was down reaches subscribers without a new message.
    pub async fn resync(self: &Arc<Self>) {
        let _resyncing = InProgress::start(&self.metrics.resyncs_in_progress);
        let names: Vec<Arc<str>> = self.channels.lock().keys().cloned().collect();
        for name in names {
            {
                let _link = self.links.lock().await;
                if let Err(e) = self.broker.subscribe(&name).await {
                    warn!(channel = %name, error = %e, "resubscribe failed");
                    continue;
                }
            }
            let after = {
                let mut channels = self.channels.lock();
                let Some(channel) = channels.get_mut(&name) else {
                    continue;
                };
                if channel.repairing.is_some() || channel.epoch.is_none() {
                    continue;
                }
                channel.repairing = Some(Vec::new());
                channel.last_seq
            };
            self.metrics.repairs.inc();
            self.clone().repair(name, after).await;
        }
    }

    /// Fills a gap after `after` from history, then passes on what was held meanwhile. What
    /// history no longer has is lost: subscribers are told with `recovered: false`.
    pub(super) async fn repair(self: Arc<Self>, name: Arc<str>, after: u64) {
        let _repairing = InProgress::start(&self.metrics.repairs_in_progress);
        let history = self.broker.history(&name, after).await;
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&name) else {
            return;
        };
        let held = channel.repairing.take().unwrap_or_default();
        if let Ok(history) = history {
            if channel.epoch.as_deref() == Some(&*history.epoch) {
                for (seq, data) in history.messages {
                    let delivery = Delivery {
                        channel: name.clone(),
                        seq,
                        epoch: history.epoch.clone(),
                        data,
                    };
                    if channel.continuity(&delivery) == Continuity::Next {
                        channel.pass_on(&delivery, &self.fanout, &self.metrics);
                    }
                }
            }
        }
        for delivery in held {
            match channel.continuity(&delivery) {
                Continuity::Next => {}
                Continuity::Repeat => continue,
                Continuity::Gap | Continuity::NewEpoch => {
                    warn!(channel = %name, last = channel.last_seq, seq = delivery.seq, "history could not repair the gap");
                    self.metrics
                        .drops
                        .with_label_values(&["unrecoverable_gap"])
                        .inc();
                    channel.restart(
                        &delivery.epoch,
                        delivery.seq.saturating_sub(1),
                        &self.fanout,
                    );
                }
            }
            channel.pass_on(&delivery, &self.fanout, &self.metrics);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Continuity {
    Next,
    Repeat,
    Gap,
    NewEpoch,
}

impl Channel {
    pub(super) fn continuity(&self, delivery: &Delivery) -> Continuity {
        match &self.epoch {
            // Nothing passed on yet: the first message sets where the channel stands.
            None => Continuity::Next,
            Some(epoch) if **epoch != *delivery.epoch => Continuity::NewEpoch,
            Some(_) if delivery.seq <= self.last_seq => Continuity::Repeat,
            Some(_) if delivery.seq == self.last_seq + 1 => Continuity::Next,
            Some(_) => Continuity::Gap,
        }
    }

    /// Continuity is lost: every live subscriber is told where the channel stands now, before
    /// its next message.
    pub(super) fn restart(&mut self, epoch: &Arc<str>, seq: u64, fanout: &Fanout) {
        self.epoch = Some(epoch.clone());
        self.last_seq = seq;
        let frame = wire::text(
            ServerFrame::Subscribed {
                id: None,
                channel: self.name.to_string(),
                seq,
                epoch: epoch.to_string(),
                recovered: false,
            }
            .to_json()
            .as_bytes(),
        );
        for shard in self.shards() {
            fanout.send(
                shard,
                Command::Restart {
                    channel: self.name.clone(),
                    epoch: epoch.clone(),
                    seq,
                    frame: frame.clone(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn delivery(epoch: &str, seq: u64) -> Delivery {
        Delivery {
            channel: Arc::from("news"),
            seq,
            epoch: Arc::from(epoch),
            data: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn continuity_of_a_channel() {
        let mut channel = Channel::new(Arc::from("news"), 2);
        // Nothing passed on yet: whatever comes first is where the channel stands.
        assert_eq!(channel.continuity(&delivery("a", 7)), Continuity::Next);
        channel.epoch = Some(Arc::from("a"));
        channel.last_seq = 7;
        assert_eq!(channel.continuity(&delivery("a", 8)), Continuity::Next);
        assert_eq!(channel.continuity(&delivery("a", 7)), Continuity::Repeat);
        assert_eq!(channel.continuity(&delivery("a", 1)), Continuity::Repeat);
        assert_eq!(channel.continuity(&delivery("a", 10)), Continuity::Gap);
        // A new epoch restarts the sequence, whatever its seq.
        assert_eq!(channel.continuity(&delivery("b", 1)), Continuity::NewEpoch);
        assert_eq!(channel.continuity(&delivery("b", 9)), Continuity::NewEpoch);
    }
}
