//! A TCP proxy for network faults: it passes bytes both ways between its clients and a
//! target, except that it cuts the first connection (both directions, at once) once a given
//! number of bytes has gone from the target to the client. Later connections pass. And a
//! proxy that records what crosses it, for tests of what the wire shows.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// What the proxy has seen so far.
#[derive(Debug, Default, Clone)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: usize,
    /// Connections the proxy cut.
    pub cuts: usize,
    /// Bytes passed from the target to clients, all connections together.
    pub bytes_down: u64,
}

/// A running proxy on 127.0.0.1 (its threads live as long as the test process).
pub struct CuttingProxy {
    addr: SocketAddr,
    stats: Arc<Mutex<ProxyStats>>,
}

impl CuttingProxy {
    /// Proxy to `target`, cutting the first connection after `cut_after` bytes downstream.
    pub fn start(target: SocketAddr, cut_after: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let shared = Arc::clone(&stats);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let first = {
                    let mut s = shared.lock().expect("proxy stats");
                    s.connections += 1;
                    s.connections == 1
                };
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let budget = first.then_some(cut_after);
                pump(client, upstream, budget, Arc::clone(&shared));
            }
        });
        CuttingProxy { addr, stats }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The figures so far.
    pub fn stats(&self) -> ProxyStats {
        self.stats.lock().expect("proxy stats").clone()
    }
}

/// Copy bytes both ways between `client` and `upstream` on two threads; downstream, cut
/// both sockets once `budget` bytes (if any) have passed.
fn pump(
    client: TcpStream,
    upstream: TcpStream,
    budget: Option<u64>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let sockets = || {
        (
            client.try_clone().expect("clone socket"),
            upstream.try_clone().expect("clone socket"),
        )
    };
    let (mut from_client, mut to_upstream) = sockets();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_upstream);
        let _ = to_upstream.shutdown(Shutdown::Write);
    });
    let (mut to_client, mut from_upstream) = sockets();
    std::thread::spawn(move || {
        let mut left = budget;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_upstream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let pass = left.map_or(n, |l| n.min(l as usize));
            if to_client.write_all(&buf[..pass]).is_err() {
                break;
            }
            stats.lock().expect("proxy stats").bytes_down += pass as u64;
            if let Some(l) = left.as_mut() {
                *l -= pass as u64;
                if *l == 0 {
                    stats.lock().expect("proxy stats").cuts += 1;
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = upstream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        let _ = to_client.shutdown(Shutdown::Write);
    });
}

/// One direction of one connection, as it crossed a [`RecordingProxy`].
type Stream = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy on 127.0.0.1 that passes every connection to a target unchanged and records
/// the bytes that crossed it, each direction of each connection in order (what an
/// eavesdropper on the link sees).
pub struct RecordingProxy {
    addr: SocketAddr,
    streams: Arc<Mutex<Vec<Stream>>>,
}

impl RecordingProxy {
    /// Proxy to `target`, recording.
    pub fn start(target: SocketAddr) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let streams = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&streams);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let clone = |s: &TcpStream| s.try_clone().expect("clone socket");
                for (from, to) in [(clone(&client), clone(&upstream)), (upstream, client)] {
                    let stream = Stream::default();
                    shared
                        .lock()
                        .expect("proxy capture")
                        .push(Arc::clone(&stream));
                    record(from, to, stream);
                }
            }
        });
        RecordingProxy { addr, streams }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether `needle` crossed the proxy so far, in one direction of one connection.
    pub fn saw(&self, needle: &[u8]) -> bool {
        let streams = self.streams.lock().expect("proxy capture");
        streams.iter().any(|s| {
            let s = s.lock().expect("proxy capture");
            !needle.is_empty() && s.windows(needle.len()).any(|w| w == needle)
        })
    }

    /// How many bytes crossed the proxy so far.
    pub fn bytes(&self) -> usize {
        let streams = self.streams.lock().expect("proxy capture");
        streams
            .iter()
            .map(|s| s.lock().expect("proxy capture").len())
            .sum()
    }
}

/// Copy `from` to `to` on a thread, appending what passes to `seen`.
fn record(mut from: TcpStream, mut to: TcpStream, seen: Stream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            seen.lock()
                .expect("proxy capture")
                .extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// The TCP address `route` lists (for a proxy in front of it).
pub fn tcp_address(route: &nixspace_space::Route) -> SocketAddr {
    route
        .transports
        .iter()
        .find_map(|t| match t {
            nixspace_space::Transport::Tcp(host, port) => format!("{host}:{port}").parse().ok(),
            nixspace_space::Transport::Unix(_) => None,
        })
        .expect("a TCP transport")
}
