//! The test harness: starts real `gateway` and `redis-server` processes on loopback ports and
//! drives them over real sockets, with the `shared` protocol types.
//!
//! - [`gateway`]: one node process ([`Gateway`]), killed by its pid when dropped (its logs are
//!   printed when the test failed);
//! - [`redis`]: `redis-server` standalone, as a cluster, over TLS, and behind Sentinels;
//! - [`client`]: a WebSocket client that speaks the protocol, every read with a deadline;
//! - [`raw`]: a hand-made WebSocket and raw HTTP over TCP, for what no library client sends;
//! - [`admin`]: a keep-alive HTTP client of the admin listener;
//! - [`tokens`]: HS256, RS256 and ES256 JWTs signed with the keys of `tests/keys/`;
//! - [`wait`]: the deadline of every wait.
// Each test file is a crate of its own that compiles this whole harness and uses its own part
// of it: what one file leaves unused is not dead in the others.
#![allow(dead_code)]

pub mod admin;
pub mod client;
pub mod gateway;
pub mod raw;
pub mod redis;
pub mod tokens;
pub mod wait;

// The same for the re-exports: each file imports what it uses.
#[allow(unused_imports)]
pub use self::{admin::*, client::*, gateway::*, raw::*, redis::*, tokens::*, wait::*};
