//! The publish connection: a few multiplexed connections that every publish in flight shares.
//!
//! A pooled connection per request costs Redis a read and a write (two system calls, and a
//! wake of its event loop) per publish, and the node one round trip per HTTP request. On a
//! shared multiplexed connection, the requests that are queued while one write is in progress
//! go out in the next write, and their replies come back in one read: concurrent publishes
//! become one pipeline, with no waiting added (a lone publish is written at once). Redis runs
//! them in order, each script still atomic. A few connections rather than one, so that the
//! node's side of the work (encoding, parsing replies) spreads over its worker threads.
//!
//! Connections follow the link like the pool's: one made before the link reconnected (after
//! a Sentinel failover it would still reach the old master) is replaced, and so is one on which
//! a command failed for want of Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use redis::{ErrorKind, RedisError};

use super::endpoint::Connection;
use super::link::LinkState;

/// Shared connections. Two keep both cores of a small node busy on a burst; more only splits
/// the pipelines and gives Redis more, smaller reads.
pub const CONNECTIONS: usize = 2;

pub struct Shared {
    link: Arc<LinkState>,
    slots: [Slot; CONNECTIONS],
    /// Round robin over the slots.
    next: AtomicUsize,
}

/// One shared connection, made on first use; its creation is serialized so that a burst of
/// publishes after a reconnect makes one connection, not one each.
#[derive(Default)]
struct Slot {
    made: Mutex<Option<Made>>,
    making: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Made {
    conn: Connection,
    generation: u64,
    /// Tells this connection from its successor in the slot, for [`Lease::broken`].
    serial: u64,
}

/// A connection taken from a slot, to report it broken.
pub struct Lease<'a> {
    pub conn: Connection,
    slot: &'a Slot,
    serial: u64,
}

impl Shared {
    pub fn new(link: Arc<LinkState>) -> Self {
        Self {
            link,
            slots: Default::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// A connection of the link's current generation, made if need be.
    pub async fn get(&self) -> Result<Lease<'_>, RedisError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS];
        let generation = self.link.generation();
        if let Some(lease) = slot.fresh(generation) {
            return Ok(lease);
        }
        let _making = slot.making.lock().await;
        // Another publish may have made it while this one waited.
        if let Some(lease) = slot.fresh(generation) {
            return Ok(lease);
        }
        let Some(current) = self.link.current() else {
            return Err(RedisError::from((ErrorKind::Io, "not connected to Redis")));
        };
        let no_pushes = None::<fn(redis::PushInfo) -> Result<(), redis::aio::SendError>>;
        let conn = current.endpoint.connect(no_pushes).await?;
        let mut made = slot.made.lock();
        let serial = made.as_ref().map_or(0, |m| m.serial + 1);
        *made = Some(Made {
            conn: conn.clone(),
            generation: current.generation,
            serial,
        });
        Ok(Lease { conn, slot, serial })
    }
}

impl Slot {
    fn fresh(&self, generation: u64) -> Option<Lease<'_>> {
        let made = self.made.lock();
        let made = made.as_ref().filter(|m| m.generation == generation)?;
        Some(Lease {
            conn: made.conn.clone(),
            slot: self,
            serial: made.serial,
        })
    }
}

impl Lease<'_> {
    /// A command on this connection failed for want of Redis: the next publish makes another
    /// (unless another publish already did).
    pub fn broken(self) {
        let mut made = self.slot.made.lock();
        if made.as_ref().is_some_and(|m| m.serial == self.serial) {
            if let Some(m) = made.as_mut() {
                // Keep the serial, so that the successor's differs; generation 0 is never fresh.
                m.generation = 0;
            }
        }
    }
}
