//! The wire contract of the broadcast gateway (`PROTOCOL.md`, version 1), as types.
//!
//! The gateway, `loadtest` and the Rust clients all speak through these types, so that a change
//! of the contract is a change in one place.
//!
//! Feature `client`: an async client of the protocol that reconnects and resumes
//! (`shared::client`). Feature `admin`: a client of a node's admin API (`shared::admin`).
#![forbid(unsafe_code)]

#[cfg(feature = "admin")]
pub mod admin;
pub mod channel;
#[cfg(feature = "client")]
pub mod client;
pub mod close;
pub mod frame;

pub use channel::{valid_channel, ChannelPattern};
pub use close::CloseCode;
pub use frame::{ClientFrame, ErrorCode, FrameError, Position, ServerFrame};

/// The subprotocol a client offers in `Sec-WebSocket-Protocol`.
pub const SUBPROTOCOL: &str = "bgw.v1";
