//! The least a client needs of RFC 6455 to hold a subscription: the upgrade request, masked
//! text and pong frames out, and the server's unmasked frames in. A million of these share the
//! machine with the gateway, so a connection owns no buffer while it is idle: frames are parsed
//! from a scratch buffer that all the connections of a worker share, and only a frame split
//! across reads leaves its bytes behind.

/// The upgrade request for `/ws` on `host` (`127.0.0.1:port`). The key is fixed: the client
/// has no use for checking `Sec-WebSocket-Accept`.
pub fn upgrade_request(host: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: bgw.v1\r\n\r\n"
    )
}

/// Where the upgrade answer ends, once `buf` holds all of it: `Ok(Some(len))` for a 101,
/// `Err(status line)` for any other status.
pub fn upgrade_response(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let status = buf[..end].split(|&b| b == b'\r').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status).into_owned();
    if status.starts_with("HTTP/1.1 101") {
        Ok(Some(end + 4))
    } else {
        Err(status)
    }
}

pub const TEXT: u8 = 0x1;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A client frame: FIN, `opcode`, masked with `mask` as RFC 6455 requires of clients.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// One server frame at the start of `buf`: `Ok(Some((opcode, payload range, frame length)))`,
/// `Ok(None)` when `buf` does not hold all of it yet, `Err` for what a server must not send
/// (a masked frame, a fragment: the gateway sends neither).
pub fn server_frame(buf: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (first, second) = (buf[0], buf[1]);
    if first & 0x80 == 0 || first & 0x0F == 0 {
        return Err("a fragmented frame".into());
    }
    if second & 0x80 != 0 {
        return Err("a masked frame from the server".into());
    }
    let (len, header) = match second & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some((first & 0x0F, header..header + len, header + len)))
}

/// The number after `key` in `text` (`"seq":` → 42), without parsing the JSON around it.
pub fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&text[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

/// The string after `key` in `text` (`"epoch":"` → `k3f9`), up to the closing quote.
pub fn string_after<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let start = text.windows(key.len()).position(|w| w == key)? + key.len();
    let len = text[start..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&text[start..start + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_client_frames() {
        let frame = client_frame(TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        // RFC 6455, 5.7: a single-frame masked text message.
        assert_eq!(
            frame,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let long = client_frame(TEXT, &[b'x'; 300], [0; 4]);
        assert_eq!(long[..4], [0x81, 0x80 | 126, 1, 44]);
        assert_eq!(long.len(), 4 + 4 + 300);
    }

    #[test]
    fn reads_server_frames_whole_or_not_yet() {
        let mut buf = vec![0x81, 0x03, b'a', b'b', b'c', 0x89, 0x00];
        assert_eq!(server_frame(&buf), Ok(Some((TEXT, 2..5, 5))));
        assert_eq!(server_frame(&buf[5..]), Ok(Some((PING, 2..2, 2))));
        assert_eq!(server_frame(&buf[..4]), Ok(None));
        buf = vec![0x81, 126, 0x01];
        assert_eq!(server_frame(&buf), Ok(None));
        buf.extend_from_slice(&[0x00]);
        buf.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(server_frame(&buf), Ok(Some((TEXT, 4..260, 260))));
        assert!(server_frame(&[0x01, 0x00]).is_err());
        assert!(server_frame(&[0x81, 0x80]).is_err());
    }

    #[test]
    fn reads_the_upgrade_answer() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81";
        assert_eq!(upgrade_response(ok), Ok(Some(ok.len() - 1)));
        assert_eq!(upgrade_response(&ok[..20]), Ok(None));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\ncapacity\n";
        assert_eq!(
            upgrade_response(busy),
            Err("HTTP/1.1 503 Service Unavailable".into())
        );
    }

    #[test]
    fn finds_numbers_and_strings_in_frames() {
        let text = br#"{"type":"message","channel":"s.0","seq":42,"data":{"t":17000,"r":3}}"#;
        assert_eq!(number_after(text, br#""seq":"#), Some(42));
        assert_eq!(number_after(text, br#""r":"#), Some(3));
        assert_eq!(number_after(text, br#""nope":"#), None);
        let welcome = br#"{"type":"welcome","session":"ab12","resumed":true}"#;
        assert_eq!(string_after(welcome, br#""session":""#), Some("ab12"));
    }
}
