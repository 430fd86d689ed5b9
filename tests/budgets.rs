//! Budgets on what one connection can make `nixspace up` hold: an unauthenticated flooder
//! announcing a huge packet and sending 1 GiB leaves `up` under a stated memory bound (while an
//! authenticated client's large packet, under its cap, is seen to grow it: the measure works),
//! and a connection that resolves no capability in time is closed (while one that resolved
//! stays). See `docs/RELIABILITY.md`.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nixspace_space::Role;
use nixspace_test_support::dataspace::{route, runtime, RawPeer, Session, ANSWER};
use nixspace_test_support::{peak_rss, Space};

/// What the flooder sends in all.
const FLOOD: usize = 1 << 30;
/// The most `up`'s peak resident memory may reach during the flood.
const FLOOD_BOUND: u64 = 64 << 20;
/// The authenticated control's packet: under `up`'s packet cap, over what the flood may add.
const LARGE: usize = 32 << 20;

/// A packed Preserves varint.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return out;
        }
        out.push(low | 0x80);
    }
}

/// The start of the packet `[[oid <A #[…declared bytes…] …`, up to the byte string's bytes.
fn assertion_of_bytes(oid: u8, declared: u64) -> Vec<u8> {
    let mut packet = vec![0xb5, 0xb5, 0xb0, 0x01, oid, 0xb4, 0xb3, 0x01, b'A', 0xb2];
    packet.extend(varint(declared));
    packet
}

#[test]
fn an_unauthenticated_flood_leaves_up_under_its_memory_bound() {
    let space = Space::start();
    let socket = space.dir().join("nixspace.sock");
    let pid = space.up_pid();
    let baseline = peak_rss(pid);

    let mut flooder = RawPeer::connect(&socket).expect("connect");
    flooder
        .send(&assertion_of_bytes(0, 1 << 34))
        .expect("the header is taken");
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < FLOOD && flooder.send(&chunk).is_ok() {
        sent += chunk.len();
    }
    let peak = peak_rss(pid);
    assert!(sent < FLOOD, "up read the whole GiB");
    assert!(
        peak < FLOOD_BOUND,
        "up's peak RSS went from {} to {} MiB during the flood (bound {} MiB)",
        baseline >> 20,
        peak >> 20,
        FLOOD_BOUND >> 20
    );

    // Positive control: an authenticated client's packet of 32 MiB (under the packet cap) is
    // taken, and the same measure sees `up` grow by at least that much.
    let mut client = RawPeer::connect(&socket).expect("connect");
    let oid = client
        .resolve(&route(&space, Role::Submit))
        .expect("resolved");
    let mut packet = assertion_of_bytes(u8::try_from(oid).expect("a small oid"), LARGE as u64);
    packet.extend(vec![0u8; LARGE]);
    packet.extend([0xb0, 0x01, 0x01, 0x84, 0x84, 0x84]);
    client
        .send(&packet)
        .expect("a large packet under the cap is taken");
    let deadline = Instant::now() + ANSWER;
    while peak_rss(pid) < peak + LARGE as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak_rss(pid) >= peak + LARGE as u64,
        "the measure did not see a 32 MiB packet: {} MiB before, {} MiB after",
        peak >> 20,
        peak_rss(pid) >> 20
    );
    assert!(
        !client.closed_within(Duration::from_millis(500)),
        "the authenticated client was closed"
    );
    // And a normal client still joins.
    let rt = runtime();
    rt.block_on(async {
        let session = Session::join(&route(&space, Role::Submit), vec![])
            .await
            .expect("a normal client joins after the flood");
        session.leave();
    });
}

#[test]
fn a_connection_that_resolves_nothing_is_closed_after_the_time_limit() {
    let space = Space::start_with(&["--resolve-timeout", "2"]);
    let socket = space.dir().join("nixspace.sock");
    let started = Instant::now();
    let mut silent = RawPeer::connect(&socket).expect("connect");
    let mut resolved = RawPeer::connect(&socket).expect("connect");
    resolved
        .resolve(&route(&space, Role::Submit))
        .expect("resolved");
    assert!(
        silent.closed_within(ANSWER),
        "a silent connection stayed open"
    );
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1900),
        "closed after {closed_after:?}, before the time limit"
    );
    // Positive control: the connection that resolved a capability stays, well past the limit.
    assert!(
        !resolved.closed_within(Duration::from_secs(4)),
        "a connection that resolved a capability was closed"
    );
}
