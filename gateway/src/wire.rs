//! WebSocket frames as the server writes them (RFC 6455 §5.2): final, unmasked, and encoded once
//! into the exact bytes that go on the wire. A message costs one encoding however many sockets it
//! is written to; what reads client frames is tungstenite's parser, not this module.

use bytes::{BufMut, Bytes, BytesMut};

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// A text frame around `payload`, which must be UTF-8 (the caller's JSON).
pub fn text(payload: &[u8]) -> Bytes {
    let mut out = with_header(TEXT, payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// The frame of a `message`: `{"type":"message","channel":..,"seq":..,"data":..}` with `data`
/// copied as published, built straight into the frame's buffer. `channel_json` is the channel
/// name already encoded as a JSON string.
pub fn message(channel_json: &str, seq: u64, data: &[u8]) -> Bytes {
    const HEAD: &[u8] = br#"{"type":"message","channel":"#;
    const SEQ: &[u8] = br#","seq":"#;
    const DATA: &[u8] = br#","data":"#;
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq).as_bytes();
    let len = HEAD.len() + channel_json.len() + SEQ.len() + seq.len() + DATA.len() + data.len() + 1;
    let mut out = with_header(TEXT, len);
    out.extend_from_slice(HEAD);
    out.extend_from_slice(channel_json.as_bytes());
    out.extend_from_slice(SEQ);
    out.extend_from_slice(seq);
    out.extend_from_slice(DATA);
    out.extend_from_slice(data);
    out.put_u8(b'}');
    out.freeze()
}

/// The heartbeat's ping, without payload.
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | PING, 0])
}

/// A close frame with its code and reason; the reason is cut to fit a control frame's 125 bytes.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = with_header(CLOSE, 2 + reason.len());
    out.put_u16(code);
    out.extend_from_slice(reason);
    out.freeze()
}

fn with_header(opcode: u8, len: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(10 + len);
    out.put_u8(FIN | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read, Write};

    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    /// What a client (tungstenite in the client role) reads from `bytes`.
    fn read_as_client(bytes: &[u8]) -> Vec<Message> {
        struct Input<'a>(&'a [u8]);
        impl Read for Input<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl Write for Input<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut ws = WebSocket::from_raw_socket(Input(bytes), Role::Client, None);
        let mut out = Vec::new();
        while let Ok(message) = ws.read() {
            let closed = message.is_close();
            out.push(message);
            if closed {
                break;
            }
        }
        out
    }

    #[test]
    fn frames_read_back_as_tungstenite_reads_them() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x10000, 200_000] {
            let payload = "x".repeat(len);
            let read = read_as_client(&text(payload.as_bytes()));
            assert_eq!(read, vec![Message::text(payload)], "length {len}");
        }
        let mut stream = ping().to_vec();
        stream.extend_from_slice(&close(4030, "slow consumer"));
        let read = read_as_client(&stream);
        assert!(matches!(&read[0], Message::Ping(p) if p.is_empty()));
        let Message::Close(Some(frame)) = &read[1] else {
            panic!("not a close: {read:?}");
        };
        assert_eq!(
            (u16::from(frame.code), frame.reason.as_str()),
            (4030, "slow consumer")
        );
    }

    #[test]
    fn message_frames_match_the_shared_encoding() {
        for (channel, seq, data) in [("news", 1, "{}"), ("a.b", u64::MAX, r#"{"k":[1,2]}"#)] {
            let json = serde_json::to_string(channel).unwrap();
            let frame = message(&json, seq, data.as_bytes());
            let expected = shared::frame::encode_message(channel, seq, data.as_bytes());
            let read = read_as_client(&frame);
            assert_eq!(
                read,
                vec![Message::text(String::from_utf8(expected).unwrap())]
            );
        }
        let long = "d".repeat(300);
        let frame = message("\"c\"", 7, format!("\"{long}\"").as_bytes());
        assert_eq!(read_as_client(&frame).len(), 1);
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let reason = "é".repeat(100);
        let frame = close(1001, &reason);
        assert!(frame.len() <= 2 + 125);
        let read = read_as_client(&frame);
        assert!(matches!(&read[0], Message::Close(Some(_))));
    }
}
