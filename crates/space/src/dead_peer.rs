//! Noticing a TCP peer that went silent (a host that crashed, a link that went down, a
//! partition): without this a connection whose peer vanished looks alive until the kernel
//! gives up retransmitting, about 15 minutes later, and the planner keeps waiting on the steps
//! of a worker it cannot reach. Both ends of a TCP connection (the host's accepted ones and a
//! joining client's) send keepalive probes when idle and drop the connection once the peer has
//! acknowledged nothing for [`DEAD_PEER_TIMEOUT`], probes and data alike (`TCP_USER_TIMEOUT`);
//! the usual reconnecting then takes over.

use std::os::fd::AsFd;
use std::time::Duration;

use rustix::net::sockopt;

/// How long a TCP peer may acknowledge nothing before the connection is dropped.
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a connection is idle before the first keepalive probe, and between probes.
const PROBE_EVERY: Duration = Duration::from_secs(3);

/// Make the TCP connection `socket` end once its peer has been silent for
/// [`DEAD_PEER_TIMEOUT`].
pub fn drop_when_silent(socket: impl AsFd) -> std::io::Result<()> {
    let fd = socket.as_fd();
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, PROBE_EVERY)?;
    sockopt::set_tcp_keepintvl(fd, PROBE_EVERY)?;
    // With a user timeout set, it (not the probe count) decides when the probes failed.
    let probes = DEAD_PEER_TIMEOUT.as_secs() / PROBE_EVERY.as_secs();
    sockopt::set_tcp_keepcnt(fd, probes as u32)?;
    sockopt::set_tcp_user_timeout(fd, DEAD_PEER_TIMEOUT.as_millis() as u32)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_socket_takes_the_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop_when_silent(&client).unwrap();
        assert!(sockopt::socket_keepalive(&client).unwrap());
        assert_eq!(
            sockopt::tcp_user_timeout(&client).unwrap(),
            DEAD_PEER_TIMEOUT.as_millis() as u32
        );
        assert_eq!(sockopt::tcp_keepidle(&client).unwrap(), PROBE_EVERY);
    }
}
