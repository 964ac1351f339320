//! The data segments a TCP socket has received, from the kernel's `TCP_INFO`. On loopback,
//! with Nagle's algorithm off on the sender (the gateway's and the floor's), each `write(2)` of
//! a small frame leaves as one segment, unless it queues behind an earlier one (the sender
//! falling behind, or the kernel corking): so segments per delivery show how many deliveries
//! the server put in one write.

use std::mem::{offset_of, size_of, MaybeUninit};
use std::os::fd::AsRawFd;

/// `tcpi_data_segs_in` of `socket`, or `None` where the kernel (before 4.6) does not count it.
pub fn data_segments_in(socket: &impl AsRawFd) -> Option<u64> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is `len` writable bytes; the kernel writes at most `len` bytes of its own
    // `struct tcp_info` there and sets `len` to what it wrote.
    let status = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let counted = offset_of!(libc::tcp_info, tcpi_data_segs_in) + size_of::<u32>();
    if status != 0 || (len as usize) < counted {
        return None;
    }
    // SAFETY: zeroed, then partly written by the kernel: every byte is initialised, and
    // `tcp_info` holds integers only.
    let info = unsafe { info.assume_init() };
    Some(u64::from(info.tcpi_data_segs_in))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counts_each_write_of_an_idle_sender() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        sender.set_nodelay(true).unwrap();
        let (mut receiver, _) = listener.accept().unwrap();
        let before = super::data_segments_in(&receiver).unwrap();
        for _ in 0..3 {
            // Each write is read before the next: none can share a segment with another.
            sender.write_all(b"frame").unwrap();
            receiver.read_exact(&mut [0; 5]).unwrap();
        }
        assert_eq!(super::data_segments_in(&receiver).unwrap() - before, 3);
    }
}
