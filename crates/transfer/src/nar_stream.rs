//! A NAR as a stream of dataspace messages, with credit-based flow control.
//!
//! The sending side is an [`AsyncWrite`] ([`NarSender`]): it asserts `<nar-start credit>` at
//! the requester's sink, then sends `<nar-chunk>` messages, never more than [`WINDOW`] beyond
//! those the receiver acknowledged with `<nar-credit n>` messages to `credit`; when no credit
//! comes for its idle time it gives up. The receiving side is a [`NarSink`] entity feeding a
//! channel bounded by the window and an [`AsyncRead`] ([`NarReceiver`]) that acknowledges
//! chunks as they are read on (into the store), and checks size and hash before it ends.
//! Neither side ever holds more than a window of a NAR, nor do the relays between them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nixspace_nix_formats::hash::{Hash, Hasher};
use nixspace_protocol::store::{NarCredit, NarReply, NarStart};
use preserves_schema::Parse;
use syndicate::actor::{Account, Activation, ActorResult, AnyValue, Cap, Entity, FacetRef, Handle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::node::account;

/// Bytes per `<nar-chunk>` message.
pub const CHUNK: usize = 64 * 1024;

/// Chunks a sender may have sent beyond those the receiver acknowledged (64 × 64 KiB = 4 MiB:
/// a stream moves at most a window per round trip, 80 MiB/s at 50 ms).
pub const WINDOW: u64 = 64;

/// Chunks a receiver acknowledges at once.
const CREDIT_BATCH: u64 = WINDOW / 4;

/// How long a NAR stream may stall (a sender without credit, a receiver without data) before
/// it is abandoned, unless configured otherwise.
pub const STREAM_IDLE: Duration = Duration::from_secs(60);

fn withdrawn() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the NAR request was withdrawn")
}

/// Writes a NAR as `<nar-chunk>` messages to `sink`, sent from `facet`, as the receiver's
/// credit allows.
pub struct NarSender {
    facet: FacetRef,
    account: Arc<Account>,
    sink: Arc<Cap>,
    buf: Vec<u8>,
    /// Chunks the receiver acknowledged, as they arrive.
    credit: mpsc::UnboundedReceiver<u64>,
    sent: u64,
    acked: u64,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether `timer` runs: the window is full and no credit came since.
    waiting: bool,
    stalled: bool,
}

impl NarSender {
    /// A sender to `sink`, sending from `facet`: asserts `<nar-start credit>` at the sink
    /// (withdrawn with `facet`) and gives up when the window stays full for `idle`.
    pub fn new(facet: FacetRef, sink: Arc<Cap>, idle: Duration) -> NarSender {
        let (grants, credit) = mpsc::unbounded_channel();
        let account = account("nar-send");
        facet.activate(&account, None, |t| {
            let credit = t.create_cap(CreditGrants(grants));
            sink.assert(t, &NarStart { credit });
            Ok(())
        });
        NarSender {
            facet,
            account,
            sink,
            buf: Vec::with_capacity(CHUNK),
            credit,
            sent: 0,
            acked: 0,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            stalled: false,
        }
    }

    /// Send one reply; false if the facet is gone (the request was withdrawn).
    fn send(&self, reply: &NarReply) -> bool {
        self.facet.activate(&self.account, None, |t| {
            self.sink.message(t, reply);
            Ok(())
        })
    }

    /// Send the buffered chunk as soon as the window allows it.
    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        loop {
            match self.credit.poll_recv(cx) {
                // Nobody can acknowledge chunks not sent yet: early credit is capped.
                Poll::Ready(Some(n)) => {
                    self.acked = self.acked.saturating_add(n).min(self.sent);
                    self.waiting = false;
                }
                Poll::Ready(None) => return Poll::Ready(Err(withdrawn())),
                Poll::Pending => break,
            }
        }
        if self.sent - self.acked < WINDOW {
            let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            if !self.send(&NarReply::Chunk { data }) {
                return Poll::Ready(Err(withdrawn()));
            }
            self.sent += 1;
            return Poll::Ready(Ok(()));
        }
        if !self.waiting {
            self.timer.as_mut().reset(Instant::now() + self.idle);
            self.waiting = true;
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = true;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    self.stall().unwrap_or_default(),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Why the stream stopped, if the receiver stopped granting credit.
    pub fn stall(&self) -> Option<String> {
        self.stalled.then(|| {
            format!(
                "the receiver granted no credit for {:?} ({} of {} chunks acknowledged)",
                self.idle, self.acked, self.sent
            )
        })
    }

    /// Send what is buffered (once the window allows it), then the end of the stream.
    pub async fn finish(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_send_buffered(cx)).await?;
        if self.send(&NarReply::End) {
            Ok(())
        } else {
            Err(withdrawn())
        }
    }

    /// Tell the receiver the stream failed.
    pub fn fail(self, reason: String) {
        self.send(&NarReply::Error { reason });
    }
}

impl AsyncWrite for NarSender {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() == CHUNK {
            std::task::ready!(self.poll_send_buffered(cx))?;
        }
        let n = (CHUNK - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    /// Data goes out in whole chunks; [`NarSender::finish`] sends the rest.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The sender's `credit` entity: hands the receiver's acknowledgements to the [`NarSender`].
struct CreditGrants(mpsc::UnboundedSender<u64>);

impl Entity<AnyValue> for CreditGrants {
    fn message(&mut self, _t: &mut Activation, m: AnyValue) -> ActorResult {
        let chunks = NarCredit::parse(&m)
            .ok()
            .and_then(|c| i64::try_from(&c.chunks).ok())
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0);
        match chunks {
            Some(n) => {
                let _ = self.0.send(n);
            }
            None => tracing::warn!(?m, "ignoring a malformed NAR credit"),
        }
        Ok(())
    }
}

/// What reaches a [`NarReceiver`] from its sink, in order.
enum Incoming {
    /// The sender started: acknowledge chunks to this entity.
    Start(Arc<Cap>),
    Reply(NarReply),
    /// The sender withdrew its `nar-start`: it left.
    SenderGone,
}

/// Room for a window of chunks, the start, the end (or error) and the sender leaving.
const CHANNEL: usize = WINDOW as usize + 3;

/// The entity a NAR request names as its sink: passes what arrives to its [`NarReceiver`].
pub struct NarSink {
    tx: Option<mpsc::Sender<Incoming>>,
    start: Option<Handle>,
    overrun: Arc<AtomicBool>,
}

impl NarSink {
    fn push(&mut self, item: Incoming) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(item) {
            tracing::warn!("the sending store sent more than its window: stream dropped");
            self.overrun.store(true, Ordering::Relaxed);
            self.tx = None;
        }
    }
}

impl Entity<AnyValue> for NarSink {
    fn assert(&mut self, _t: &mut Activation, a: AnyValue, handle: Handle) -> ActorResult {
        match NarStart::parse(&a) {
            Ok(start) if self.start.is_none() => {
                self.start = Some(handle);
                self.push(Incoming::Start(start.credit));
            }
            _ => tracing::warn!(?a, "ignoring an unexpected assertion at a NAR sink"),
        }
        Ok(())
    }

    fn retract(&mut self, _t: &mut Activation, handle: Handle) -> ActorResult {
        if self.start == Some(handle) {
            self.push(Incoming::SenderGone);
        }
        Ok(())
    }

    fn message(&mut self, _t: &mut Activation, m: AnyValue) -> ActorResult {
        match NarReply::parse(&m) {
            Ok(reply) => self.push(Incoming::Reply(reply)),
            Err(_) => tracing::warn!(?m, "ignoring a malformed NAR reply"),
        }
        Ok(())
    }
}

/// A sink for one NAR request and the receiver reading what it gets: a NAR of `size` bytes
/// hashing to `hash`, acknowledged from `facet`, failing if no data arrives for `idle`.
pub fn receive(facet: FacetRef, hash: Hash, size: u64, idle: Duration) -> (NarSink, NarReceiver) {
    let (tx, replies) = mpsc::channel(CHANNEL);
    let overrun = Arc::new(AtomicBool::new(false));
    let sink = NarSink {
        tx: Some(tx),
        start: None,
        overrun: Arc::clone(&overrun),
    };
    let receiver = NarReceiver {
        replies,
        overrun,
        facet,
        account: account("nar-credit"),
        credit: None,
        unacked: 0,
        pending: Vec::new(),
        offset: 0,
        hasher: Some(Hasher::new(hash.algo())),
        received: 0,
        expected: (hash, size),
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
        ended: false,
    };
    (sink, receiver)
}

/// Reads a NAR from what its [`NarSink`] receives, acknowledging each chunk once it has been
/// read on. Ends (EOF) only after `<nar-end>` and only if exactly the expected size and hash
/// arrived; any other ending is an error, so whoever consumes the stream never sees a
/// complete but wrong NAR.
pub struct NarReceiver {
    replies: mpsc::Receiver<Incoming>,
    overrun: Arc<AtomicBool>,
    facet: FacetRef,
    account: Arc<Account>,
    /// The sender's credit entity, once it started.
    credit: Option<Arc<Cap>>,
    /// Chunks read on and not acknowledged yet.
    unacked: u64,
    pending: Vec<u8>,
    offset: usize,
    hasher: Option<Hasher>,
    received: u64,
    expected: (Hash, u64),
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    ended: bool,
}

impl NarReceiver {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// One more chunk was read on: acknowledge a batch of them.
    fn consumed(&mut self) {
        self.unacked += 1;
        if self.unacked < CREDIT_BATCH {
            return;
        }
        let Some(credit) = &self.credit else { return };
        let chunks = std::mem::take(&mut self.unacked);
        self.facet.activate(&self.account, None, |t| {
            credit.message(
                t,
                &NarCredit {
                    chunks: (chunks as i64).into(),
                },
            );
            Ok(())
        });
    }

    fn check_end(&mut self) -> io::Result<()> {
        let (hash, size) = &self.expected;
        if self.received != *size {
            return Err(invalid(format!(
                "NAR size mismatch: expected {size} bytes, got {}",
                self.received
            )));
        }
        let got = self
            .hasher
            .take()
            .map(Hasher::finish)
            .ok_or_else(|| invalid("NAR stream ended twice".to_owned()))?;
        if &got != hash {
            return Err(invalid(format!(
                "NAR hash mismatch: expected {}, got {}",
                hash.to_prefixed_nixbase32(),
                got.to_prefixed_nixbase32()
            )));
        }
        Ok(())
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl AsyncRead for NarReceiver {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.offset < this.pending.len() {
                let n = out.remaining().min(this.pending.len() - this.offset);
                out.put_slice(&this.pending[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.pending.len() {
                    this.consumed();
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            let reply = match this.replies.poll_recv(cx) {
                Poll::Ready(Some(Incoming::Reply(reply))) => reply,
                Poll::Ready(Some(Incoming::Start(credit))) => {
                    this.credit = Some(credit);
                    continue;
                }
                Poll::Ready(Some(Incoming::SenderGone)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the sending store left before the end of the NAR",
                    )))
                }
                Poll::Ready(None) if this.overrun.load(Ordering::Relaxed) => {
                    return Poll::Ready(Err(invalid(format!(
                        "the sending store sent more than its window of {WINDOW} chunks"
                    ))))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the transfer was interrupted",
                    )))
                }
                Poll::Pending => {
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no NAR data for {:?}", this.idle),
                        ))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            };
            match reply {
                NarReply::Chunk { .. } if this.credit.is_none() => {
                    return Poll::Ready(Err(invalid("NAR data before <nar-start>".to_owned())))
                }
                NarReply::Chunk { data } => {
                    this.received += data.len() as u64;
                    if this.received > this.expected.1 {
                        return Poll::Ready(Err(invalid(format!(
                            "NAR larger than the announced {} bytes",
                            this.expected.1
                        ))));
                    }
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(&data);
                    }
                    if data.is_empty() {
                        this.consumed();
                    }
                    this.pending = data;
                    this.offset = 0;
                    this.timer.as_mut().reset(Instant::now() + this.idle);
                }
                NarReply::End => {
                    this.check_end()?;
                    this.ended = true;
                }
                NarReply::Error { reason } => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "the sending store failed: {reason}"
                    ))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use syndicate::actor::Actor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A facet of a fresh actor to send from, and a credit entity in it whose grants arrive
    /// on the returned channel (the actor lives while one of its entities is referenced).
    async fn actor() -> (FacetRef, Arc<Cap>, mpsc::UnboundedReceiver<u64>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        Actor::top(None, move |t| {
            let _ = t.prevent_inert_check();
            let (grants, credit) = mpsc::unbounded_channel();
            let cap = t.create_cap(CreditGrants(grants));
            let _ = tx.send((t.facet_ref(), cap, credit));
            Ok(())
        });
        rx.await.unwrap()
    }

    /// A receiver of `nar` that already got `replies` after the sender's start.
    async fn receiver(nar: &[u8], replies: Vec<NarReply>) -> NarReceiver {
        let (facet, credit, _) = actor().await;
        let (mut sink, r) = receive(
            facet,
            Hash::sha256(nar),
            nar.len() as u64,
            Duration::from_millis(200),
        );
        sink.push(Incoming::Start(credit));
        for reply in replies {
            sink.push(Incoming::Reply(reply));
        }
        // The sink's channel outlives this function only inside the receiver.
        drop(sink);
        r
    }

    fn chunk(data: &[u8]) -> NarReply {
        NarReply::Chunk {
            data: data.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_whole_nar_reads_through_and_every_chunk_is_acknowledged_in_batches() {
        let (facet, credit, mut grants) = actor().await;
        // Two batches and one chunk more.
        let chunks = 2 * CREDIT_BATCH + 1;
        let nar: Vec<u8> = (0..chunks as u8).collect();
        let (mut sink, mut r) = receive(facet, Hash::sha256(&nar), chunks, Duration::from_secs(5));
        sink.push(Incoming::Start(credit));
        for piece in nar.chunks(1) {
            sink.push(Incoming::Reply(chunk(piece)));
        }
        sink.push(Incoming::Reply(NarReply::End));
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, nar);
        // Every chunk read on: two batches acknowledged, the last chunk needs no credit.
        assert_eq!(grants.recv().await, Some(CREDIT_BATCH));
        assert_eq!(grants.recv().await, Some(CREDIT_BATCH));
        assert!(grants.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_corrupted_nar_never_ends_cleanly() {
        let mut r = receiver(b"abcdef", vec![chunk(b"abc"), chunk(b"deX"), NarReply::End]).await;
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
    }

    #[tokio::test]
    async fn short_long_failed_cut_and_silent_streams_are_errors() {
        let cases = [
            (vec![chunk(b"abc"), NarReply::End], "size mismatch"),
            (vec![chunk(b"abcdefg")], "larger"),
            (
                vec![NarReply::Error {
                    reason: "gone".into(),
                }],
                "gone",
            ),
            // The sink was dropped: the request ended.
            (vec![chunk(b"abc")], "interrupted"),
        ];
        for (replies, expect) in cases {
            let err = receiver(b"abcdef", replies)
                .await
                .read_to_end(&mut Vec::new())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
        }
        // The sender is silent.
        let (facet, credit, _) = actor().await;
        let (mut sink, mut r) = receive(facet, Hash::sha256(b""), 0, Duration::from_millis(50));
        sink.push(Incoming::Start(credit));
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_sender_that_leaves_or_ignores_the_window_is_an_error() {
        let (facet, credit, _) = actor().await;
        let (mut sink, mut r) = receive(facet, Hash::sha256(b"ab"), 2, Duration::from_secs(5));
        sink.push(Incoming::Start(credit));
        sink.push(Incoming::Reply(chunk(b"a")));
        sink.push(Incoming::SenderGone);
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("left"), "{err}");

        let (facet, credit, _) = actor().await;
        let (mut sink, mut r) = receive(facet, Hash::sha256(b""), 1000, Duration::from_secs(5));
        sink.push(Incoming::Start(credit));
        for _ in 0..CHANNEL {
            sink.push(Incoming::Reply(chunk(b"x")));
        }
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("more than its window"), "{err}");

        let (facet, _, _) = actor().await;
        let (mut sink, mut r) = receive(facet, Hash::sha256(b"x"), 1, Duration::from_secs(5));
        sink.push(Incoming::Reply(chunk(b"x")));
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("before <nar-start>"), "{err}");
    }

    /// A sender and a receiver in one actor, the sink a real entity between them.
    async fn pair(nar: &[u8], idle: Duration) -> (NarSender, NarReceiver) {
        // The actor stops when its last entity is dropped: keep this one until the sink is made.
        let (facet, _keep, _) = actor().await;
        let (sink, r) = receive(facet.clone(), Hash::sha256(nar), nar.len() as u64, idle);
        let mut cap = None;
        facet.activate(&account("test"), None, |t| {
            cap = Some(t.create_cap(sink));
            Ok(())
        });
        (NarSender::new(facet, cap.unwrap(), idle), r)
    }

    #[tokio::test]
    async fn a_sender_waits_for_credit_and_a_slow_reader_gets_the_whole_nar() {
        let nar: Vec<u8> = (0..(3 * WINDOW as usize + 1) * CHUNK)
            .map(|i| (i % 251) as u8)
            .collect();
        let (mut sender, mut r) = pair(&nar, Duration::from_secs(5)).await;
        let writer = tokio::spawn({
            let nar = nar.clone();
            async move {
                sender.write_all(&nar).await?;
                sender.finish().await
            }
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            tokio::task::yield_now().await;
        }
        writer.await.unwrap().unwrap();
        assert!(got == nar, "the NAR arrived changed");
    }

    #[tokio::test]
    async fn a_sender_stops_at_the_window_and_gives_up_without_credit() {
        let nar = vec![7u8; 2 * WINDOW as usize * CHUNK];
        let (mut sender, r) = pair(&nar, Duration::from_millis(300)).await;
        let err = sender.write_all(&nar).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(sender.sent, WINDOW);
        let stall = sender.stall().unwrap();
        assert!(stall.contains("no credit"), "{stall}");
        drop(r);
    }
}
