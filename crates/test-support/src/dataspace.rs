//! Talking to a real `nixspace up` from a test: an in-process Syndicate client
//! that sees everything its capability lets it observe ([`Session`]: every record its
//! role may observe, `space::policy::observable`), a raw
//! socket peer that writes Syndicate packets by hand ([`RawPeer`]), for what a
//! well-behaved client never sends, and a NAR receiver that grants credit only
//! when told ([`NarFetch`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixspace_nix_formats::hash::{HashAlgo, Hasher};
use nixspace_protocol::build;
use nixspace_protocol::store::{NarCredit, NarReply, NarRequest, NarStart};
use nixspace_space::policy::observable;
use nixspace_space::{Role, Route};
use preserves::{NoEmbeddedDomainCodec, TextWriter};
use preserves_schema::{Parse, Unparse};
use syndicate::actor::{
    Account, Activation, ActorHandle, ActorResult, AnyValue, Cap, Entity, FacetRef, Handle,
};
use syndicate::schemas::dataspace::Observe;
use syndicate::schemas::dataspace_patterns as dp;

/// How long a test waits for the dataspace to answer.
pub const ANSWER: Duration = Duration::from_secs(10);

/// The route of `role` in `space`'s runtime directory.
pub fn route(space: &crate::space::Space, role: Role) -> Route {
    Route::read(&role.route_file(&space.dir())).expect("route file")
}

/// A runtime for the in-process clients of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A derivation path that names no real derivation.
pub fn fake_drv(name: &str) -> String {
    format!("/nix/store/{}-{name}.drv", "0".repeat(32))
}

fn test_step() -> build::StepInfo {
    build::StepInfo {
        system: "test-system".to_owned(),
        features: vec![],
        input_drvs: vec![],
        settings: nixspace_protocol::BuildSettings::default().to_wire(),
        outputs: vec![],
        memory: 0.into(),
    }
}

/// A demand of `drv` for a system no worker has.
pub fn demand(drv: &str) -> AnyValue {
    demand_by(drv, "security-test")
}

/// Like [`demand`], by the frontend named `requester`.
pub fn demand_by(drv: &str, requester: &str) -> AnyValue {
    demand_record(drv, requester).unparse()
}

/// The demand [`demand_by`] asserts, as a record to put in a `<demands …>` record.
pub fn demand_record(drv: &str, requester: &str) -> build::Demand {
    build::Demand {
        drv: drv.to_owned(),
        step: test_step(),
        requester: requester.to_owned(),
        priority: 0.into(),
        depth: 0.into(),
        derivation: Vec::new(),
    }
}

/// The demands of a chain of `steps` fake steps named `name`, each depending on the one
/// before, for a system no real worker has; and their derivation paths, the base first.
pub fn chain_demands(name: &str, steps: usize) -> (Vec<String>, Vec<AnyValue>) {
    let drvs: Vec<String> = (0..steps)
        .map(|i| format!("/nix/store/{i:032}-{name}.drv"))
        .collect();
    let demands = drvs
        .iter()
        .enumerate()
        .map(|(i, drv)| {
            build::Demand {
                drv: drv.clone(),
                step: build::StepInfo {
                    input_drvs: i
                        .checked_sub(1)
                        .map(|j| drvs[j].clone())
                        .into_iter()
                        .collect(),
                    ..test_step()
                },
                requester: "chain-test".to_owned(),
                priority: 0.into(),
                depth: 0.into(),
                derivation: Vec::new(),
            }
            .unparse()
        })
        .collect();
    (drvs, demands)
}

/// A worker named `id` for the system of [`demand`]'s steps, with one slot.
pub fn test_worker(id: &str) -> AnyValue {
    test_worker_process(id, "test")
}

/// Like [`test_worker`], the process of session `session`.
pub fn test_worker_process(id: &str, session: &str) -> AnyValue {
    worker_record(id, session, &test_step().system, 1, 0)
}

/// Like [`test_worker`], saying it holds `hold` steps beyond its one slot.
pub fn holding_worker(id: &str, hold: i64) -> AnyValue {
    worker_record(id, "test", &test_step().system, 1, hold)
}

/// Like [`test_worker`], building up to `jobs` steps at once for `system`.
pub fn worker_building(id: &str, system: &str, jobs: i64) -> AnyValue {
    worker_record(id, "test", system, jobs, 0)
}

fn worker_record(id: &str, session: &str, system: &str, jobs: i64, hold: i64) -> AnyValue {
    build::Worker {
        id: id.to_owned(),
        session: session.to_owned(),
        host: "test".to_owned(),
        systems: vec![system.to_owned()],
        features: vec![],
        max_jobs: jobs.into(),
        hold: hold.into(),
        speed: 1.0.into(),
        memory: 0.into(),
        build_memory: 0.into(),
        cpus: 1.into(),
    }
    .unparse()
}

/// What the planner asserts when it gives step `drv` to `worker` (default settings).
pub fn assigned(drv: &str, worker: &str) -> AnyValue {
    build::Assigned {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        settings: nixspace_protocol::BuildSettings::default().to_wire(),
        derivation: Vec::new(),
    }
    .unparse()
}

/// Worker `worker`'s claim of step `drv`.
pub fn claim(drv: &str, worker: &str) -> AnyValue {
    build::Claim {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
    }
    .unparse()
}

/// What worker `worker` asserts to offer `free_slots` free build slots.
pub fn offer(worker: &str, free_slots: i64) -> AnyValue {
    build::Offer {
        worker: worker.to_owned(),
        free_slots: free_slots.into(),
    }
    .unparse()
}

/// What the planner asserts once it took `worker`'s report that it built `drv` with `outputs`.
pub fn built(drv: &str, worker: &str, outputs: &[&str]) -> AnyValue {
    build::Built {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        outputs: outputs.iter().map(|o| (*o).to_owned()).collect(),
    }
    .unparse()
}

/// What worker `worker` sends to report that it built `drv` (the fake steps name no outputs).
pub fn reported_built(drv: &str, worker: &str) -> AnyValue {
    build::ReportBuilt {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        outputs: vec![],
        realisations: vec![],
        usage: vec![],
    }
    .unparse()
}

/// What worker `worker` sends to report that its build of `drv` failed for good (the
/// builder exited non-zero). The one place tests write a worker's failure report.
pub fn reported_failed_for_good(drv: &str, worker: &str) -> AnyValue {
    build::ReportFailed {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        reason: "builder failed with exit code 1".to_owned(),
        kind: build::FailureKind::Permanent,
        cause: build::FailureCause::Build,
    }
    .unparse()
}

/// What the planner asserts for [`demand`]`(drv)` while no worker is connected: it planned
/// the step, which is ready and waits for a worker.
pub fn unschedulable(drv: &str) -> AnyValue {
    build::Unschedulable {
        drv: drv.to_owned(),
        reason: nixspace_planner::matching::unschedulable_reason(&[], &test_step().system),
    }
    .unparse()
}

/// What the planner asserts on its tick while `steps` of the frontend `requester`'s wait for
/// a worker with room.
pub fn queued(requester: &str, steps: u64) -> AnyValue {
    build::Queued {
        requester: requester.to_owned(),
        steps: steps.into(),
    }
    .unparse()
}

/// Check on a running `space` (its planner logging to `up.log`) that a demand
/// asserted with the worker capability is refused, logged, and never reaches
/// the planner, while the same demand through the submit capability is planned.
/// Positive control: the same connection then claims a control step, and the
/// planner's answer to that claim is seen first.
pub fn assert_a_worker_cannot_demand(space: &crate::space::Space) {
    let drv = fake_drv("worker-demand");
    let control = fake_drv("worker-demand-control");
    runtime().block_on(async {
        let observer = Session::join(&route(space, Role::Submit), vec![demand(&control)])
            .await
            .expect("join as submit");
        assert!(observer.wait_until(&unschedulable(&control), true).await);
        let w = Session::join(
            &route(space, Role::Worker),
            vec![demand(&drv), claim(&control, "w-control")],
        )
        .await
        .expect("join as worker");
        // A connection's assertions reach the planner in the order sent, and the observer
        // sees the planner's answers in order: had the demand been planned, its `unschedulable`
        // would have come before this.
        assert!(
            observer
                .wait_until(&assigned(&control, "w-control"), true)
                .await,
            "the control claim, sent after the demand, was never granted"
        );
        assert!(!observer.sees(&demand(&drv)));
        assert!(
            !observer.sees(&unschedulable(&drv)),
            "the planner saw the demand"
        );
        space.wait_for_log("up", "refused an assertion the role may not make", ANSWER);
        assert!(
            space.log("up").contains("role=worker"),
            "{}",
            space.log("up")
        );
        w.leave();
        // The same demand through the submit capability is planned.
        let s = Session::join(&route(space, Role::Submit), vec![demand(&drv)])
            .await
            .expect("join as submit");
        assert!(
            s.wait_until(&unschedulable(&drv), true).await,
            "never ready"
        );
    });
}

/// The role a route's capability is for (its sturdy ref's oid; a narrowed worker route keeps
/// the oid `worker`). Anything else observes as a submitter.
fn role_of(route: &Route) -> Role {
    let oid = &route.sturdy_ref.parameters.oid;
    Role::ALL
        .into_iter()
        .find(|role| string_of(oid).as_deref() == Some(role.name()))
        .unwrap_or(Role::Submit)
}

/// A joined client that observes every assertion and message it may see.
pub struct Session {
    actor: ActorHandle,
    seen: Arc<Mutex<Vec<AnyValue>>>,
    messages: Arc<Mutex<Vec<AnyValue>>>,
}

impl Session {
    /// Join with `route`, assert `asserts`, observe everything, and return
    /// once a probe of ours came back (so the dataspace has processed our
    /// assertions and sent us every match so far).
    pub async fn join(route: &Route, asserts: Vec<AnyValue>) -> anyhow::Result<Session> {
        Session::join_within(route, asserts, ANSWER).await
    }

    /// Like [`Session::join`], waiting up to `patience` for the probe (many assertions take
    /// a while).
    pub async fn join_within(
        route: &Route,
        asserts: Vec<AnyValue>,
        patience: Duration,
    ) -> anyhow::Result<Session> {
        Session::join_sending(route, asserts, Vec::new(), patience).await
    }

    /// Like [`Session::join_within`], also sending `messages` (after the assertions, before
    /// the probe: when this returns the dataspace has handled them all).
    pub async fn join_sending(
        route: &Route,
        asserts: Vec<AnyValue>,
        messages: Vec<AnyValue>,
        patience: Duration,
    ) -> anyhow::Result<Session> {
        let watch = Watch::Role(role_of(route));
        Session::start(route, asserts, messages, patience, watch).await
    }

    /// Join with `route` only to send `messages` (a worker's reports, …): returns once the
    /// dataspace has handled them.
    pub async fn send(route: &Route, messages: Vec<AnyValue>) -> anyhow::Result<Session> {
        Session::join_sending(route, Vec::new(), messages, ANSWER).await
    }

    /// Like [`Session::join_within`], observing only field `field` of the `<label …>` records:
    /// what it sees are those fields' values (e.g. the `drv` of every `failed`). Only the
    /// field travels, so it keeps up with a hundred thousand assertions.
    pub async fn join_watching(
        route: &Route,
        asserts: Vec<AnyValue>,
        (label, field): (&str, usize),
        patience: Duration,
    ) -> anyhow::Result<Session> {
        let watch = Watch::Field(label.to_owned(), field);
        Session::start(route, asserts, Vec::new(), patience, watch).await
    }

    async fn start(
        route: &Route,
        asserts: Vec<AnyValue>,
        messages: Vec<AnyValue>,
        patience: Duration,
        watch: Watch,
    ) -> anyhow::Result<Session> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let messages_seen = Arc::new(Mutex::new(Vec::new()));
        let heard = Arc::clone(&messages_seen);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let probe_id = format!("test-probe-{}", crate::nix_files::nonce());
        let collected = Arc::clone(&seen);
        let actor = nixspace_space::join::join(route, move |t, ds| {
            for a in &asserts {
                ds.assert(t, a);
            }
            for m in &messages {
                ds.message(t, m);
            }
            let observer = t.create_cap(syndicate::during::entity(collected).on_asserted(
                |seen: &mut Arc<Mutex<Vec<AnyValue>>>, _t, captures: Vec<AnyValue>| {
                    let Some(value) = captures.into_iter().next() else {
                        return Ok(None);
                    };
                    seen.lock().map_err(|_| "poisoned")?.push(value.clone());
                    Ok(Some(Box::new(
                        move |seen: &mut Arc<Mutex<Vec<AnyValue>>>, _t| {
                            let mut seen = seen.lock().map_err(|_| "poisoned")?;
                            if let Some(i) = seen.iter().position(|v| *v == value) {
                                seen.remove(i);
                            }
                            Ok(())
                        },
                    )))
                },
            ));
            // One observation per record the role may see: a pattern that matched anything
            // would match `Observe` assertions too, and is refused.
            let records = |label: &str| dp::Pattern::Bind {
                pattern: Box::new(dp::Pattern::Group {
                    type_: dp::GroupType::Rec {
                        label: AnyValue::symbol(label.to_owned()),
                    },
                    entries: Default::default(),
                }),
            };
            let listener = t.create_cap(syndicate::during::entity(heard).on_message(
                |heard: &mut Arc<Mutex<Vec<AnyValue>>>, _t, captures: Vec<AnyValue>| {
                    heard.lock().map_err(|_| "poisoned")?.extend(captures);
                    Ok(())
                },
            ));
            match &watch {
                Watch::Role(role) => {
                    for label in observable(*role) {
                        for observer in [&observer, &listener] {
                            ds.assert(
                                t,
                                &Observe {
                                    pattern: records(&label),
                                    observer: Arc::clone(observer),
                                },
                            );
                        }
                    }
                }
                Watch::Field(label, field) => {
                    ds.assert(
                        t,
                        &Observe {
                            pattern: field_of(label, *field),
                            observer: Arc::clone(&observer),
                        },
                    );
                }
            }
            let mut tx = Some(tx);
            let id = probe_id.clone();
            let echo = t.create_cap(syndicate::during::entity(()).on_message(
                move |_, _t, captures: Vec<AnyValue>| {
                    if captures.first().and_then(string_of).as_deref() == Some(id.as_str()) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(())
                },
            ));
            ds.assert(
                t,
                &Observe {
                    pattern: field_of("probe", 0),
                    observer: echo,
                },
            );
            ds.message(t, &nixspace_protocol::build::Probe { id: probe_id });
            Ok(())
        })
        .await?;
        tokio::time::timeout(patience, rx)
            .await
            .map_err(|_| anyhow::anyhow!("our probe did not come back within {patience:?}"))??;
        Ok(Session {
            actor,
            seen,
            messages: messages_seen,
        })
    }

    /// Every value seen now (for [`Session::join_watching`]: every field value).
    pub fn seen(&self) -> Vec<AnyValue> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Every assertion seen now whose label is the symbol `label`.
    pub fn with_label(&self, label: &str) -> Vec<AnyValue> {
        labelled(&self.seen, label)
    }

    /// Every message received so far whose label is the symbol `label`.
    pub fn messages_with_label(&self, label: &str) -> Vec<AnyValue> {
        labelled(&self.messages, label)
    }

    /// Whether `value` is asserted now.
    pub fn sees(&self, value: &AnyValue) -> bool {
        self.seen.lock().map(|s| s.contains(value)).unwrap_or(false)
    }

    /// Wait until `value` is asserted (or not, with `present = false`).
    pub async fn wait_until(&self, value: &AnyValue, present: bool) -> bool {
        poll_until(ANSWER, || self.sees(value) == present).await
    }

    /// Leave: the connection closes and our assertions are withdrawn.
    pub fn leave(self) {
        self.actor.abort();
    }
}

/// What a [`Session`] observes.
enum Watch {
    /// Every record the role may observe, whole.
    Role(Role),
    /// One field (by position) of one record.
    Field(String, usize),
}

/// A pattern capturing field `field` of every `<label …>`.
fn field_of(label: &str, field: usize) -> dp::Pattern {
    dp::Pattern::Group {
        type_: dp::GroupType::Rec {
            label: AnyValue::symbol(label.to_owned()),
        },
        entries: [(
            AnyValue::new(field as i64),
            dp::Pattern::Bind {
                pattern: Box::new(dp::Pattern::Discard),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// The values in `values` whose label is the symbol `label`.
fn labelled(values: &Mutex<Vec<AnyValue>>, label: &str) -> Vec<AnyValue> {
    let label = AnyValue::symbol(label.to_owned());
    values
        .lock()
        .map(|values| {
            values
                .iter()
                .filter(|v| label_of(v).as_ref() == Some(&label))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Check `done` every 20 ms for up to `limit`; whether it came true.
pub async fn poll_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The label of a record (`ValueImpl` is imported only here: it shadows
/// `Vec`'s methods).
fn label_of(v: &AnyValue) -> Option<AnyValue> {
    use preserves::ValueImpl;
    v.is_record().then(|| v.label())
}

/// The contents of a string value.
pub fn string_of(v: &AnyValue) -> Option<String> {
    use preserves::ValueImpl;
    v.as_string().map(|s| s.into_owned())
}

/// The Preserves text of a value without embedded references.
pub fn text(v: &AnyValue) -> String {
    TextWriter::encode(&mut NoEmbeddedDomainCodec, v).unwrap_or_default()
}

/// The text of `<resolve <ref …> #:[0 0]>` for `route`'s sturdy ref: a
/// capability request whose answer goes to our object 0.
pub fn resolve_text(route: &Route) -> String {
    format!("<resolve {} #:[0 0]>", text(&route.sturdy_ref.unparse()))
}

/// A packed Preserves varint (a length prefix).
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

/// The start of the packed packet `[[oid <A #[…declared bytes…] …`, up to the byte string's
/// bytes.
pub fn assertion_of_bytes(oid: u8, declared: u64) -> Vec<u8> {
    let mut packet = vec![0xb5, 0xb5, 0xb0, 0x01, oid, 0xb4, 0xb3, 0x01, b'A', 0xb2];
    packet.extend(varint(declared));
    packet
}

/// A positive control for memory bounds on `up`: a client resolving the submit capability
/// asserts one byte string of `size` bytes (under `up`'s packet cap); `up`'s peak resident
/// memory, `before` until now, must be seen to grow by at least `size`, and the client stays
/// connected.
pub fn assert_up_is_seen_holding_a_large_packet(
    space: &crate::space::Space,
    before: u64,
    size: usize,
) {
    let pid = space.up_pid();
    let mut client = RawPeer::connect(&space.dir().join("nixspace.sock")).expect("connect");
    let oid = client
        .resolve(&route(space, Role::Submit))
        .expect("resolved");
    let mut packet = assertion_of_bytes(u8::try_from(oid).expect("a small oid"), size as u64);
    packet.extend(vec![0u8; size]);
    // Handle 1, then the ends of the record, the event, the turn.
    packet.extend([0xb0, 0x01, 0x01, 0x84, 0x84, 0x84]);
    client
        .send(&packet)
        .expect("a large packet under the cap is taken");
    let deadline = Instant::now() + ANSWER;
    while crate::peak_rss(pid) < before + size as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        crate::peak_rss(pid) >= before + size as u64,
        "the measure did not see a {} MiB packet: {} MiB before, {} MiB after",
        size >> 20,
        before >> 20,
        crate::peak_rss(pid) >> 20
    );
    assert!(
        !client.closed_within(Duration::from_millis(500)),
        "the authenticated client was closed"
    );
}

/// A hand-written Syndicate peer on a raw unix socket.
pub struct RawPeer {
    stream: UnixStream,
    received: Vec<u8>,
}

impl RawPeer {
    /// Connect to the socket at `path`.
    pub fn connect(path: &Path) -> std::io::Result<RawPeer> {
        let stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(ANSWER))?;
        Ok(RawPeer {
            stream,
            received: Vec::new(),
        })
    }

    /// Send raw bytes (a write error means the host closed the connection).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Read for at most `wait`, or until the text received so far contains
    /// `needle`. Returns everything received on this connection so far.
    pub fn read_until(&mut self, needle: &str, wait: Duration) -> String {
        self.read_until_after(0, needle, wait)
    }

    /// Like [`RawPeer::read_until`], looking for `needle` only in what arrived after the
    /// first `start` bytes, and returning only that.
    fn read_until_after(&mut self, start: usize, needle: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 65536];
        while !String::from_utf8_lossy(&self.received[start..]).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .is_err()
            {
                break;
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&self.received[start..]).into_owned()
    }

    /// Stop sending and wait for the host to close the connection. Whether
    /// it did within `wait`.
    pub fn finish(&mut self, wait: Duration) -> bool {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        self.closed_within(wait)
    }

    /// Whether the host closes the connection within `wait` (what it sends
    /// meanwhile is read and dropped).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return false;
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }

    /// Resolve `route`'s capability over text packets and return the oid
    /// under which the host exports the dataspace to us; what we received
    /// if it did not answer ok.
    pub fn resolve(&mut self, route: &Route) -> Result<u64, String> {
        self.resolve_as(route, 0)
    }

    /// Like [`RawPeer::resolve`], asserting the request under `handle` (one this connection
    /// has not used).
    pub fn resolve_as(&mut self, route: &Route, handle: u64) -> Result<u64, String> {
        let packet = format!("[[0 <A {} {handle}>]]", resolve_text(route));
        // An earlier answer on this connection is not this one's.
        let start = self.received.len();
        self.send(packet.as_bytes()).map_err(|e| e.to_string())?;
        // The answer looks like `[[0, <A <ok #:[0, 1]> 523>]]`.
        let got = self.read_until_after(start, "<ok #:[0", ANSWER);
        got.find("<ok #:[0")
            .and_then(|at| {
                got[at + "<ok #:[0".len()..]
                    .trim_start_matches([',', ' '])
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .ok_or(got)
    }
}

/// What a test's NAR request received so far.
pub struct NarArrivals {
    /// The sender's credit entity, once it asserted `<nar-start>`.
    pub credit: Option<Arc<Cap>>,
    /// `<nar-chunk>`s received.
    pub chunks: u64,
    /// NAR bytes received.
    pub bytes: u64,
    hasher: Option<Hasher>,
    /// How the stream ended: the NAR's hash (`sha256:` nixbase32) after `<nar-end>`, or the
    /// reason of a `<nar-error>`.
    pub ended: Option<Result<String, String>>,
}

/// A NAR requested from a store of a real dataspace, received by the test, which decides
/// when to grant credit.
pub struct NarFetch {
    actor: ActorHandle,
    facet: FacetRef,
    arrivals: Arc<Mutex<NarArrivals>>,
}

impl NarFetch {
    /// Join with `route` and ask store `store` for the NAR of `path`. With `acknowledge`,
    /// every chunk is acknowledged as it arrives; else only [`NarFetch::grant`] grants credit.
    pub async fn request(
        route: &Route,
        path: &str,
        store: &str,
        acknowledge: bool,
    ) -> anyhow::Result<NarFetch> {
        let arrivals = Arc::new(Mutex::new(NarArrivals {
            credit: None,
            chunks: 0,
            bytes: 0,
            hasher: Some(Hasher::new(HashAlgo::Sha256)),
            ended: None,
        }));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = (path.to_owned(), store.to_owned());
        let sink = TestSink {
            arrivals: Arc::clone(&arrivals),
            acknowledge,
        };
        let actor = nixspace_space::join::join(route, move |t, ds| {
            let (path, store) = request;
            let sink = t.create_cap(sink);
            ds.assert(t, &NarRequest { path, store, sink });
            let _ = tx.send(t.facet_ref());
            Ok(())
        })
        .await?;
        let facet = tokio::time::timeout(ANSWER, rx).await??;
        Ok(NarFetch {
            actor,
            facet,
            arrivals,
        })
    }

    /// Acknowledge `chunks` chunks to the sender.
    pub fn grant(&self, chunks: u64) {
        let credit = self
            .arrivals
            .lock()
            .ok()
            .and_then(|a| a.credit.clone())
            .expect("the sender started");
        self.facet.activate(&Account::new(None, None), None, |t| {
            credit.message(t, &credit_of(chunks));
            Ok(())
        });
    }

    /// Chunks received so far, and how the stream ended if it did.
    pub fn arrived(&self) -> (u64, u64, Option<Result<String, String>>) {
        let a = self.arrivals.lock().expect("arrivals");
        (a.chunks, a.bytes, a.ended.clone())
    }

    /// Wait up to `limit` until `done` holds for what arrived; whether it did.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&NarArrivals) -> bool) -> bool {
        poll_until(limit, || self.arrivals.lock().is_ok_and(|a| done(&a))).await
    }

    /// Leave: the request is withdrawn with the connection.
    pub fn leave(self) {
        self.actor.abort();
    }
}

fn credit_of(chunks: u64) -> NarCredit {
    NarCredit {
        chunks: (chunks as i64).into(),
    }
}

/// The sink of a test's NAR request.
struct TestSink {
    arrivals: Arc<Mutex<NarArrivals>>,
    acknowledge: bool,
}

impl Entity<AnyValue> for TestSink {
    fn assert(&mut self, _t: &mut Activation, a: AnyValue, _h: Handle) -> ActorResult {
        let start = NarStart::parse(&a).map_err(|_| "not a <nar-start>")?;
        self.arrivals.lock().map_err(|_| "poisoned")?.credit = Some(start.credit);
        Ok(())
    }

    fn message(&mut self, t: &mut Activation, m: AnyValue) -> ActorResult {
        let reply = NarReply::parse(&m).map_err(|_| "not a NAR reply")?;
        let mut a = self.arrivals.lock().map_err(|_| "poisoned")?;
        match reply {
            NarReply::Chunk { data } => {
                a.chunks += 1;
                a.bytes += data.len() as u64;
                if let Some(h) = a.hasher.as_mut() {
                    h.update(&data);
                }
                if let (true, Some(credit)) = (self.acknowledge, &a.credit) {
                    credit.message(t, &credit_of(1));
                }
            }
            NarReply::End => {
                let hash = a.hasher.take().map(|h| h.finish().to_prefixed_nixbase32());
                a.ended = Some(hash.ok_or_else(|| "ended twice".to_owned()));
            }
            NarReply::Error { reason } => a.ended = Some(Err(reason)),
        }
        Ok(())
    }
}
