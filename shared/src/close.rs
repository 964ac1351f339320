//! The close codes of PROTOCOL.md.

/// A close code the server sends, with the reason it gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    Normal = 1000,
    /// The node is draining or shutting down, or the peer stopped answering heartbeats.
    GoingAway = 1001,
    ProtocolError = 1002,
    Unsupported = 1003,
    InvalidPayload = 1007,
    TooBig = 1009,
    Internal = 1011,
    Unauthorized = 4001,
    ProtocolViolation = 4002,
    /// A back end disconnected the client (admin API): it may reconnect, after a delay.
    Disconnected = 4003,
    /// A back end ended the client's access for good (admin API): it should not reconnect.
    Terminated = 4004,
    HelloTimeout = 4008,
    /// The user holds `--max-connections-per-user` connections already, across the cluster.
    TooManyConnections = 4013,
    TakenOver = 4009,
    RateLimited = 4029,
    SlowConsumer = 4030,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<Self> {
        use CloseCode::*;
        [
            Normal,
            GoingAway,
            ProtocolError,
            Unsupported,
            InvalidPayload,
            TooBig,
            Internal,
            Unauthorized,
            ProtocolViolation,
            Disconnected,
            Terminated,
            HelloTimeout,
            TooManyConnections,
            TakenOver,
            RateLimited,
            SlowConsumer,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }
}
