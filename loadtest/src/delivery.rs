//! What one delivery of `fanout` puts on the wire: the data it publishes, and the WebSocket
//! frame the gateway writes to each subscriber for it. `floor` writes frames of exactly these
//! sizes, so that the two count the same bytes.

use shared::frame::encode_message;

/// Digits of a time in microseconds since the epoch (from 2001 to 2286).
const TIME_DIGITS: usize = 16;

/// `{"t":` + the time + `,"p":"` + `"}`: the bytes of the data besides its padding.
pub const MIN_PAYLOAD: usize = 5 + TIME_DIGITS + 6 + 2;

/// The padding that makes data `payload` bytes long (at least [`MIN_PAYLOAD`]).
pub fn padding(payload: usize) -> String {
    "x".repeat(payload.saturating_sub(MIN_PAYLOAD))
}

/// The data of one message: its send time, then the padding, `{"t":1700000000123456,"p":"xx"}`.
pub fn data(sent_micros: u64, padding: &str) -> String {
    format!(r#"{{"t":{sent_micros},"p":"{padding}"}}"#)
}

/// The name of channel `i` of a fan-out run.
pub fn channel(run: u32, i: usize) -> String {
    format!("fan.{run:08x}.{i}")
}

/// The bytes the gateway writes for message `seq` of `channel`: a server's text frame (FIN,
/// unmasked) around `{"type":"message","channel":..,"seq":..,"data":..}`.
pub fn frame(channel: &str, seq: u64, data: &str) -> Vec<u8> {
    let text = encode_message(channel, seq, data.as_bytes());
    let mut frame = Vec::with_capacity(text.len() + 10);
    frame.push(0x81);
    match text.len() {
        len @ 0..=125 => frame.push(len as u8),
        len @ 126..=0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&text);
    frame
}

/// The frame of message `seq` of a fan-out run with data of `payload` bytes on one channel.
pub fn fanout_frame(seq: u64, payload: usize) -> Vec<u8> {
    let time = 10u64.pow(TIME_DIGITS as u32 - 1);
    frame(&channel(0, 0), seq, &data(time, &padding(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_as_long_as_asked() {
        let now = crate::socket::now_micros();
        assert_eq!(now.to_string().len(), TIME_DIGITS);
        assert_eq!(data(now, &padding(100)).len(), 100);
        assert_eq!(data(now, &padding(10)).len(), MIN_PAYLOAD);
    }

    /// The gateway's frames are tungstenite's (a server's: unmasked).
    #[test]
    fn frames_are_those_tungstenite_writes() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        for payload in [MIN_PAYLOAD, 64, 100, 1000, 70_000] {
            let data = data(crate::socket::now_micros(), &padding(payload));
            let text = encode_message(&channel(7, 0), 12, data.as_bytes());
            let mut written = Vec::new();
            Frame::message(text, OpCode::Data(Data::Text), true)
                .format(&mut written)
                .unwrap();
            assert_eq!(frame(&channel(7, 0), 12, &data), written, "{payload}");
        }
    }

    #[test]
    fn frames_carry_the_header_of_their_length() {
        // 60 bytes of text around the data and a 1-digit seq: a 2-byte header below 126.
        let short = fanout_frame(7, 64);
        assert_eq!(short.len(), 2 + 60 + 1 + 64);
        assert_eq!(short[..2], [0x81, 125]);
        let long = fanout_frame(7, 100);
        assert_eq!(long.len(), 4 + 60 + 1 + 100);
        assert_eq!(long[..4], [0x81, 126, 0, 161]);
        let tail = format!(r#""p":"{}"}}}}"#, "x".repeat(100 - MIN_PAYLOAD));
        assert!(long.ends_with(tail.as_bytes()));
    }
}
