//! A test bed of hosts on one machine: each [`Host`] is a network namespace of its own with
//! one address (`10.77.0.N/24` on a TUN device `tun0`), and the [`TestBed`] is the switch
//! between them: a thread per host reads the IP packets its host sends and hands each, after
//! half the round-trip time, to the host it is addressed to. So every TCP connection between
//! hosts is the real one, end to end (the kernel of this machine has no `netem` to delay
//! packets), and each direction is delayed by half the round-trip time with packets in flight
//! side by side, not one at a time.
//!
//! A process is started on a host by starting it from a thread inside the host's namespace
//! ([`Host::on`], [`Host::enter`]: a child starts in its parent thread's namespace); a host's link can be taken down and up again
//! ([`Host::partition`], [`Host::heal`]). Dropping the bed (also when the test panics) stops
//! the switch and deletes the namespaces.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::process::run;

/// The first three octets of every host's address.
const NETWORK: [u8; 3] = [10, 77, 0];

/// The largest IP packet the TUN devices carry (their MTU is 1500).
const PACKET: usize = 65536;

/// How often a switch thread looks whether the bed is being dropped.
const POLL: Duration = Duration::from_millis(100);

/// A packet on its way, with the time it is due at its destination.
type Delayed = (Instant, Vec<u8>);

/// The hosts' delay lines, by the last octet of each host's address.
type Lines = Arc<Mutex<BTreeMap<u8, mpsc::Sender<Delayed>>>>;

/// The hosts of one test and the switch between them.
pub struct TestBed {
    /// How long each packet waits in the switch: half the round-trip time.
    one_way: Duration,
    /// Each host's delay line, by the last octet of its address.
    lines: Lines,
    /// Set when the bed is dropped: the switch threads end.
    stopping: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    hosts: Vec<Host>,
}

/// One host: a network namespace with an address.
#[derive(Clone)]
pub struct Host {
    /// The namespace's name (as `ip netns` lists it).
    namespace: String,
    address: Ipv4Addr,
    /// The namespace itself, to move threads into.
    handle: Arc<File>,
}

impl TestBed {
    /// A bed whose switch delays packets so that a round trip between two hosts takes `rtt`
    /// (plus what the machine takes).
    pub fn new(rtt: Duration) -> TestBed {
        TestBed {
            one_way: rtt / 2,
            lines: Arc::default(),
            stopping: Arc::default(),
            threads: Vec::new(),
            hosts: Vec::new(),
        }
    }

    /// A new host on the switch, with the next address (`10.77.0.1` first).
    pub fn host(&mut self) -> Host {
        let octet = u8::try_from(self.hosts.len() + 1).expect("at most 254 hosts");
        let namespace = crate::unique("nixspace-host");
        ip(&["netns", "add", &namespace]);
        let handle = File::open(format!("/run/netns/{namespace}")).expect("the new namespace");
        let host = Host {
            namespace,
            address: Ipv4Addr::new(NETWORK[0], NETWORK[1], NETWORK[2], octet),
            handle: Arc::new(handle),
        };
        // Registered before anything can fail, so that dropping the bed deletes it.
        self.hosts.push(host.clone());
        let tun = Arc::new(host.on(open_tun));
        let address = format!("{}/24", host.address);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &address, "dev", "tun0"],
            vec!["link", "set", "tun0", "up"],
        ] {
            host.ip(&args);
        }
        let (line, packets) = mpsc::channel();
        self.lines.lock().expect("switch table").insert(octet, line);
        self.threads.push(self.spawn_reader(Arc::clone(&tun)));
        self.threads.push(self.spawn_writer(tun, packets));
        host
    }

    /// The thread that reads what a host sends and puts it on its destination's delay line.
    fn spawn_reader(&self, tun: Arc<OwnedFd>) -> std::thread::JoinHandle<()> {
        let (lines, stopping, one_way) = (
            Arc::clone(&self.lines),
            Arc::clone(&self.stopping),
            self.one_way,
        );
        std::thread::spawn(move || {
            let mut buf = vec![0u8; PACKET];
            while !stopping.load(Ordering::Relaxed) {
                if !readable(&tun) {
                    continue;
                }
                // A host whose link is down reads nothing; an error is the same.
                let Ok(n) = rustix::io::read(&tun, &mut buf) else {
                    std::thread::sleep(POLL);
                    continue;
                };
                let Some(to) = ipv4_destination(&buf[..n]) else {
                    continue;
                };
                let line = lines.lock().expect("switch table").get(&to).cloned();
                if let Some(line) = line {
                    let _ = line.send((Instant::now() + one_way, buf[..n].to_vec()));
                }
            }
        })
    }

    /// The thread that hands a host the packets addressed to it, each once its time came.
    fn spawn_writer(
        &self,
        tun: Arc<OwnedFd>,
        packets: mpsc::Receiver<Delayed>,
    ) -> std::thread::JoinHandle<()> {
        let stopping = Arc::clone(&self.stopping);
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((due, packet)) = packets.recv_timeout(POLL) else {
                    continue;
                };
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                // A host whose link is down refuses the packet: it is lost, as on a wire.
                let _ = rustix::io::write(&tun, &packet);
            }
        })
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.lines.lock().map(|mut l| l.clear()).unwrap_or_default();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        for host in &self.hosts {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "delete", &host.namespace]);
            let _ = run(c, Duration::from_secs(30));
        }
    }
}

impl Host {
    /// The host's address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Run `f` with the current thread in this host's network namespace (so every process it
    /// starts, and every socket it opens, is on this host), then move the thread back, also
    /// when `f` panics.
    pub fn on<T>(&self, f: impl FnOnce() -> T) -> T {
        let _back = self.enter();
        f()
    }

    /// Move the current thread into this host's network namespace until the returned guard
    /// is dropped (a test thread that plays this host: what it starts meanwhile runs here).
    pub fn enter(&self) -> Entered {
        let back =
            Entered(File::open("/proc/thread-self/ns/net").expect("this thread's namespace"));
        move_into_link_name_space(self.handle.as_fd(), Some(LinkNameSpaceType::Network))
            .expect("into the host's network namespace");
        back
    }

    /// Take the host's link down: nothing reaches it or leaves it until [`Host::heal`]
    /// (connections stay open on both sides, their packets lost).
    pub fn partition(&self) {
        self.ip(&["link", "set", "tun0", "down"]);
    }

    /// Bring the host's link up again, with its address and route.
    pub fn heal(&self) {
        self.ip(&["link", "set", "tun0", "up"]);
    }

    /// Run `ip -n NAMESPACE ARGS…`, failing the test if it fails.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
}

/// A thread inside a host's namespace ([`Host::enter`]); dropping it moves the thread back
/// to the namespace it came from.
pub struct Entered(File);

impl Drop for Entered {
    fn drop(&mut self) {
        move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
            .expect("back to the thread's network namespace");
    }
}

/// Run `ip ARGS…`, failing the test if it fails.
fn ip(args: &[&str]) {
    let mut c = std::process::Command::new("ip");
    c.args(args);
    let done = run(c, Duration::from_secs(30));
    assert!(done.status.success(), "ip {args:?}: {done:?}");
}

/// The TUN device `tun0` in the current thread's network namespace (IP packets without a
/// header of their own); it goes away when the returned descriptor is closed.
fn open_tun() -> OwnedFd {
    use rustix::ioctl::{ioctl, opcode, Setter};
    const TUNSETIFF: rustix::ioctl::Opcode = opcode::write::<std::ffi::c_int>(b'T', 202);
    const IFF_TUN: u16 = 0x0001;
    const IFF_NO_PI: u16 = 0x1000;
    // `struct ifreq`: the name (16 bytes), then a union whose first member is the flags.
    let mut request = [0u8; 40];
    request[..4].copy_from_slice(b"tun0");
    request[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    let tun: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun")
        .into();
    // SAFETY: TUNSETIFF reads a `struct ifreq`, which is 40 bytes on 64-bit Linux.
    unsafe { ioctl(&tun, Setter::<TUNSETIFF, [u8; 40]>::new(request)) }.expect("TUNSETIFF");
    tun
}

/// Whether `fd` has something to read within [`POLL`].
fn readable(fd: &OwnedFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: POLL.as_nanos() as i64,
    };
    poll(&mut fds, Some(&timeout)).is_ok_and(|n| n > 0)
}

/// The last octet of an IPv4 packet's destination, if it is on the bed's network.
fn ipv4_destination(packet: &[u8]) -> Option<u8> {
    let header = packet.get(..20)?;
    (header[0] >> 4 == 4 && header[16..19] == NETWORK).then_some(header[19])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_packets_to_the_bed_are_switched() {
        let mut packet = [0u8; 20];
        packet[0] = 0x45;
        packet[16..20].copy_from_slice(&[10, 77, 0, 3]);
        assert_eq!(ipv4_destination(&packet), Some(3));
        packet[16] = 192;
        assert_eq!(ipv4_destination(&packet), None);
        packet[16] = 10;
        packet[0] = 0x60;
        assert_eq!(ipv4_destination(&packet), None);
        assert_eq!(ipv4_destination(&packet[..19]), None);
    }
}
