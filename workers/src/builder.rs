//! The builder: a worker that builds the steps the planner gives it with the local Nix.
//!
//! Protocol, as seen from one worker W:
//! 1. W asserts `<worker W …>` (what it can build, how many at once) and
//!    `<offer W free-slots>` (none while draining).
//! 2. The planner gives W a ready step W can build: `<assigned drv W settings>`
//!    (how the client asked it built: build mode, time limits, …), and W
//!    builds it — but only once every input's outputs are valid in its store
//!    (W leaving, or another process of W joining, loses the step). Builds go
//!    to the local Nix daemon over a pool of reused connections (one per slot).
//!    With `hold` (`nixspace worker --hold`) W may be given steps beyond its
//!    slots: they wait in W, in the order given, and start as builds end.
//!    W asks for a step with `<claim drv W>` only when it was not given it: a
//!    step it is invited to steal, the steps it built while the dataspace was
//!    away, and a build whose assignment went away with the planner; the
//!    planner grants those claims. W withdraws a claim once the step's
//!    assignment is withdrawn (the planner takes a withdrawn claim of a step
//!    it gave W as W lost).
//! 4. W sends `<log drv W line>` messages while building, then the message
//!    `<report-built drv W outputs realisations>` or `<report-failed drv W reason kind cause>` (the cause: its
//!    own `build`, or the `infrastructure` around it). A report the planner
//!    missed (it went away) is sent again once a next planner grants W's claim.
//! 5. When the planner withdraws the assignment (outcome recorded, or the
//!    step is no longer wanted) W withdraws everything about the step; a
//!    build still running is killed.
//!
//! Observers only forward [`Event`]s to the [`Builder`] entity in the root
//! facet, so claims and the offer outlive the observer facets that caused
//! them. Each build runs in its own child facet: stopping it kills the build.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use nixspace_nix_formats::derivation::{BasicDerivation, Derivation};
use nixspace_nix_formats::signature::{realisation_fingerprint, sign, SecretKey};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_tools::build_activity;
use nixspace_nix_tools::build_cgroup::{BuildCgroups, BuildUsage, MIB};
use nixspace_nix_tools::{BuildLog, BuiltStep, DaemonPool, DaemonTarget, PoolConfig, StepError};
use nixspace_protocol::{build, on_retraction, BuildMode, BuildSettings, DrvPath, WorkerId};
use nixspace_transfer::{FetchError, StoreNode, Timeouts};
use preserves_schema::Parse;

use crate::ca_substitutes::realised_by_substituters;
use crate::detached::{BuildFailure, Builds, Grant, Outcome};
use syndicate::actor::{
    Account, Activation, ActorError, ActorResult, AnyValue, Cap, Entity, FacetId, Handle,
    LinkedTaskTermination, Ref,
};
use syndicate::enclose;
use syndicate_macros::during;

/// Store connections kept for transfers (serving paths to peers, fetching inputs).
const TRANSFER_CONNECTIONS: usize = 2;

/// What a builder offers.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// Unique name of this worker in the dataspace.
    pub id: WorkerId,
    /// The machine it runs on (informational).
    pub host: String,
    /// Platforms it builds for (`builtin` is always accepted).
    pub systems: Vec<String>,
    /// System features it supports.
    pub features: Vec<String>,
    /// How many steps it builds at once.
    pub max_jobs: u32,
    /// How many steps it keeps waiting beyond those, each started the moment a build ends
    /// (no round trip through the planner between one build and the next).
    pub hold: u32,
    /// Speed relative to a reference machine (1.0).
    pub speed: f64,
    /// Build through the Nix daemon listening on this socket instead of
    /// private `nix-daemon --stdio` children on the local store.
    pub daemon_socket: Option<PathBuf>,
    /// Signs the realisations of the content-addressed outputs this worker builds.
    pub signing_key: Option<SecretKey>,
    /// The file of a Nix secret key the worker's private daemon signs every output it builds
    /// with (`secret-key-files`), so that other stores trust them when they fetch them; a
    /// daemon behind `daemon_socket` signs as its own configuration says.
    pub signing_key_file: Option<PathBuf>,
    /// How long fetching an input waits for some store in the dataspace to have it; then the
    /// input is reported lost, and the step that made it is built again.
    pub fetch_patience: Duration,
    /// How long a NAR stream to or from this worker's store may stall (no credit from the
    /// receiver, no data from the sender) before it is abandoned.
    pub stream_idle: Duration,
    /// The most log bytes one build sends to the dataspace; the rest is dropped.
    pub max_log_bytes: u64,
    /// Where each build gets a control group of its own (measured, and limited to
    /// `memory_limit`); `None`: builds run unmeasured (no cgroup hierarchy, not root, or a
    /// daemon behind `daemon_socket`).
    pub cgroups: Option<BuildCgroups>,
    /// The most memory one build may use, in bytes (with `cgroups`).
    pub memory_limit: Option<u64>,
    /// The memory this worker offers its builds together, in bytes (0: not said): the
    /// planner gives it no more steps than their predicted memory fits in.
    pub memory: u64,
    /// The CPUs it offers its builds.
    pub cpus: u32,
}

impl BuilderConfig {
    /// The daemon connections this worker builds over: one per slot.
    fn pool(&self) -> DaemonPool {
        let mut pool = self.pool_config(self.max_jobs as usize);
        pool.cgroups = self.cgroups.clone();
        pool.memory_limit = self.memory_limit;
        DaemonPool::new(pool)
    }

    /// The worker's store in the dataspace: it serves the paths this worker has and fetches
    /// the inputs it lacks, over connections of its own. Make it once and pass it to every
    /// [`start`]: a fetch cut by a lost connection goes on over the next one.
    pub fn store(&self) -> StoreNode {
        StoreNode::with_timeouts(
            self.id.to_string(),
            DaemonPool::new(self.pool_config(TRANSFER_CONNECTIONS)),
            Timeouts {
                want: self.fetch_patience,
                stream_idle: self.stream_idle,
            },
        )
    }

    fn pool_config(&self, connections: usize) -> PoolConfig {
        let mut pool = PoolConfig::new(connections);
        pool.features = self.features.clone();
        pool.secret_key_files = self.signing_key_file.iter().cloned().collect();
        if let Some(socket) = &self.daemon_socket {
            pool.target = DaemonTarget::Socket(socket.clone());
        }
        pool
    }
}

/// What the builder's observers saw.
#[derive(Debug)]
pub enum Event {
    /// The planner gave this worker a step (pushed, or a claim granted).
    Assigned {
        /// The step.
        drv: DrvPath,
        /// How to build it.
        settings: BuildSettings,
        /// The text of a derivation the planner resolved (empty for any other step).
        derivation: Vec<u8>,
    },
    /// The planner withdrew this worker's assignment of a step.
    Unassigned {
        /// The step.
        drv: DrvPath,
    },
    /// The planner gave a step this worker claimed again after a reconnection to another
    /// worker.
    AssignedElsewhere {
        /// The step.
        drv: DrvPath,
    },
    /// The planner invites this worker to duplicate a step another worker is building.
    Steal {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        from: WorkerId,
    },
    /// The invitation to steal a step was withdrawn.
    StealWithdrawn {
        /// The step.
        drv: DrvPath,
    },
    /// Stop taking steps; report on `done` once running builds finished.
    Drain {
        /// Told when no build is left.
        done: DrainDone,
    },
    /// A planner is present.
    PlannerJoined {
        /// The planner's id.
        id: String,
    },
    /// A planner went away.
    PlannerLeft {
        /// The planner's id.
        id: String,
    },
    /// The assignment of a step this worker builds was withdrawn a turn ago: by a planner
    /// still here (stop the build), or with the planner itself (keep it).
    AssignmentGone {
        /// The step.
        drv: DrvPath,
    },
    /// The outcome of a build is reported: its slot is free for the next step.
    Finished {
        /// The step.
        drv: DrvPath,
    },
}

/// Told once a draining builder has no build left.
#[derive(Clone)]
pub struct DrainDone(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>);

impl DrainDone {
    /// A notifier and the receiver it completes.
    pub fn new() -> (DrainDone, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (DrainDone(Arc::new(std::sync::Mutex::new(Some(tx)))), rx)
    }

    fn notify(&self) {
        if let Some(tx) = self.0.lock().ok().and_then(|mut g| g.take()) {
            let _ = tx.send(());
        }
    }
}

impl std::fmt::Debug for DrainDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DrainDone")
    }
}

/// A step given to the worker and held until a slot frees.
struct HeldStep {
    drv: DrvPath,
    settings: BuildSettings,
    derivation: Vec<u8>,
}

struct Builder {
    ds: Arc<Cap>,
    config: Arc<BuilderConfig>,
    /// Connections to the Nix daemon, opened on demand.
    pool: DaemonPool,
    /// This worker's store in the dataspace.
    store: StoreNode,
    /// Set when the worker is leaving: take nothing new.
    draining: Option<DrainDone>,
    /// Steps this worker claimed (waiting for a grant, or building a step it claimed).
    claims: BTreeMap<DrvPath, Handle>,
    /// The facet of each build, until its assignment is withdrawn.
    building: BTreeMap<DrvPath, FacetId>,
    /// Builds whose outcome is reported (their slot is free again).
    finished: BTreeSet<DrvPath>,
    /// Steps given to it while every slot was busy, in the order they came: each starts
    /// when a slot frees.
    waiting: VecDeque<HeldStep>,
    /// The builds themselves, which outlive this connection.
    builds: Builds,
    offer: Option<Handle>,
    /// The planners present.
    planners: BTreeSet<String>,
    /// This entity's own reference, for messages to itself.
    me: Arc<OnceLock<Weak<Ref<Event>>>>,
}

impl Entity<Event> for Builder {
    fn message(&mut self, t: &mut Activation, event: Event) -> ActorResult {
        match event {
            // Given to us (pushed, or a claim granted). Even a draining worker builds a step
            // the planner gave it before it saw the drain.
            Event::Assigned {
                drv,
                settings,
                derivation,
            } => {
                let held = self.waiting.iter().any(|w| w.drv == drv);
                let step = HeldStep {
                    drv,
                    settings,
                    derivation,
                };
                if self.building.contains_key(&step.drv) || held {
                    // Given again (a claim granted anew): it is ours already.
                } else if self.builds.has(&step.drv) {
                    // Built, or building, while the dataspace was away: it has its slot.
                    self.start(t, step)?;
                } else {
                    tracing::debug!(drv = %step.drv, "given; it starts when a slot is free");
                    self.waiting.push_back(step);
                }
            }
            // Another worker got the step; unless we build it too (a steal), let go of it and
            // of what we did towards it while the dataspace was away.
            Event::AssignedElsewhere { drv } => {
                if !self.building.contains_key(&drv) {
                    self.builds.cancel(&drv);
                    self.release(t, &drv);
                }
            }
            // The planner's own retraction, if it went away, arrives with the assignment's:
            // decide once it has been handled, in a later turn.
            Event::Unassigned { drv } => match self.me.get().and_then(Weak::upgrade) {
                Some(me) => t.message(&me, Event::AssignmentGone { drv }),
                None => self.stop_build(t, &drv),
            },
            Event::AssignmentGone { drv } if self.planners.is_empty() => {
                // A step held and not started is the next planner's to give again.
                self.waiting.retain(|w| w.drv != drv);
                self.finished.remove(&drv);
                if let Some(facet) = self.building.remove(&drv) {
                    tracing::info!(%drv, "the planner went away; the build goes on and is claimed from the next planner");
                    t.stop_facet(facet);
                    if !self.claims.contains_key(&drv) {
                        self.claim(t, drv);
                    }
                }
            }
            Event::AssignmentGone { drv } => self.stop_build(t, &drv),
            Event::PlannerJoined { id } => {
                self.planners.insert(id);
            }
            Event::PlannerLeft { id } => {
                self.planners.remove(&id);
            }
            Event::Finished { drv } => {
                if self.building.contains_key(&drv) {
                    self.finished.insert(drv);
                }
            }
            Event::Steal { drv, from } => {
                let free = self.held() < self.config.max_jobs as usize;
                let holds_it = self.claims.contains_key(&drv) || self.building.contains_key(&drv);
                if self.draining.is_none() && free && !holds_it {
                    tracing::info!(%drv, %from, "stealing a step from a slower worker");
                    self.claim(t, drv);
                }
            }
            Event::StealWithdrawn { drv } => {
                if !self.building.contains_key(&drv) {
                    self.release(t, &drv);
                }
            }
            Event::Drain { done } => {
                tracing::info!(
                    building = self.building.len(),
                    "draining: taking no new steps"
                );
                let pending: Vec<DrvPath> = self
                    .claims
                    .keys()
                    .filter(|d| !self.building.contains_key(*d))
                    .cloned()
                    .collect();
                for drv in pending {
                    self.release(t, &drv);
                }
                self.draining = Some(done);
            }
        }
        self.start_waiting(t)?;
        self.update_offer(t);
        if let Some(done) = &self.draining {
            if self.building.is_empty() && self.waiting.is_empty() {
                done.notify();
            }
        }
        Ok(())
    }
}

impl Builder {
    /// The builds running (their outcome not yet reported).
    fn busy(&self) -> usize {
        self.building.len() - self.finished.len()
    }

    /// Start the steps held while a slot is free, oldest first (a draining worker too: the
    /// planner gave them before it saw the drain).
    fn start_waiting(&mut self, t: &mut Activation) -> ActorResult {
        while self.busy() < self.config.max_jobs as usize {
            let Some(step) = self.waiting.pop_front() else {
                break;
            };
            self.start(t, step)?;
        }
        Ok(())
    }

    /// Build a step given to this worker, in a facet of its own.
    fn start(&mut self, t: &mut Activation, step: HeldStep) -> ActorResult {
        let HeldStep {
            drv,
            settings,
            derivation,
        } = step;
        let this = &*self;
        let facet = t.facet(|t| {
            build_step(t, this, drv.clone(), settings, derivation);
            Ok(())
        })?;
        self.building.insert(drv, facet);
        Ok(())
    }

    /// Announce how many more steps this worker takes now, to build or to hold: none while
    /// draining.
    fn update_offer(&mut self, t: &mut Activation) {
        let free = if self.draining.is_some() {
            0
        } else {
            let taken = self.busy() + self.waiting.len();
            (self.config.max_jobs + self.config.hold) as i64 - taken as i64
        };
        let offer = build::Offer {
            worker: self.config.id.to_string(),
            free_slots: free.into(),
        };
        self.ds.update(t, &mut self.offer, Some(&offer));
    }

    /// How many steps this worker holds: given to it (building or waiting for a slot), or
    /// claimed.
    fn held(&self) -> usize {
        let claimed = self
            .claims
            .keys()
            .filter(|d| !self.building.contains_key(*d));
        self.building.len() + self.waiting.len() + claimed.count()
    }

    /// Ask to build a step.
    fn claim(&mut self, t: &mut Activation, drv: DrvPath) {
        let claim = build::Claim {
            drv: drv.to_string(),
            worker: self.config.id.to_string(),
        };
        if let Some(h) = self.ds.assert(t, &claim) {
            tracing::debug!(%drv, "claiming");
            self.claims.insert(drv, h);
        }
    }

    /// Stop building `drv` (or holding it) and let go of it (its assignment was withdrawn).
    fn stop_build(&mut self, t: &mut Activation, drv: &DrvPath) {
        self.waiting.retain(|w| &w.drv != drv);
        self.builds.cancel(drv);
        self.finished.remove(drv);
        if let Some(facet) = self.building.remove(drv) {
            tracing::info!(%drv, "assignment withdrawn; stopping its build");
            t.stop_facet(facet);
        }
        self.release(t, drv);
    }

    /// Withdraw our claim on a step (lost the race, finished, or cancelled).
    fn release(&mut self, t: &mut Activation, drv: &DrvPath) {
        if let Some(h) = self.claims.remove(drv) {
            tracing::debug!(%drv, "releasing claim");
            t.retract(h);
        }
    }
}

/// This worker process's session, as its `<worker>` record carries it: the same across its
/// reconnections, another after a restart.
fn process_session() -> &'static str {
    static SESSION: OnceLock<String> = OnceLock::new();
    SESSION.get_or_init(|| {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{started}", std::process::id())
    })
}

/// Start the builder in the current actor, on dataspace `ds`, serving and fetching through
/// `store` ([`BuilderConfig::store`]; the same across reconnections, like `builds`). Returns
/// the builder entity, to which [`Event::Drain`] can be sent.
pub fn start(
    t: &mut Activation,
    ds: Arc<Cap>,
    config: BuilderConfig,
    builds: Builds,
    store: StoreNode,
) -> Result<Arc<Ref<Event>>, ActorError> {
    let config = Arc::new(config);
    let me = config.id.clone();
    ds.assert(
        t,
        &build::Worker {
            id: config.id.to_string(),
            session: process_session().to_owned(),
            host: config.host.clone(),
            systems: config.systems.clone(),
            features: config.features.clone(),
            max_jobs: (config.max_jobs as i64).into(),
            hold: (config.hold as i64).into(),
            speed: config.speed.into(),
            memory: config.memory.into(),
            build_memory: config.memory_limit.unwrap_or(0).into(),
            cpus: config.cpus.into(),
        },
    );
    store.attach(t, Arc::clone(&ds));
    let mut builder = Builder {
        ds: Arc::clone(&ds),
        pool: config.pool(),
        store,
        config,
        draining: None,
        claims: BTreeMap::new(),
        building: BTreeMap::new(),
        finished: BTreeSet::new(),
        waiting: VecDeque::new(),
        builds,
        offer: None,
        planners: BTreeSet::new(),
        me: Arc::new(OnceLock::new()),
    };
    // Steps built (or building) while the dataspace was away: claim them again, so the
    // planner grants them back to us once they are demanded again.
    let pending = builder.builds.pending();
    for drv in &pending {
        tracing::info!(%drv, "claiming a step built while the dataspace was away");
        builder.claim(t, drv.clone());
    }
    builder.update_offer(t);
    let own_ref = Arc::clone(&builder.me);
    let builder: Arc<Ref<Event>> = t.create_ref(builder);
    let _ = own_ref.set(Arc::downgrade(&builder));

    enclose!((builder) during!(t, ds, <planner $id: String>, |t: &mut Activation| {
        t.message(&builder, Event::PlannerJoined { id: id.clone() });
        on_retraction(t, enclose!((builder, id) move |t| {
            t.message(&builder, Event::PlannerLeft { id });
            Ok(())
        }));
        Ok(())
    }));

    // Only what concerns this worker: the dataspace then sends it nothing about the steps of
    // the others (with many workers, most of the traffic).
    let literal = AnyValue::new(me.to_string());
    enclose!((builder) during!(t, ds, <steal $drv: String $from: String #(literal)>,
    |t: &mut Activation| {
        let drv = DrvPath::from(drv.as_str());
        t.message(&builder, Event::Steal { drv: drv.clone(), from: from.as_str().into() });
        on_retraction(t, enclose!((builder) move |t| {
            t.message(&builder, Event::StealWithdrawn { drv });
            Ok(())
        }));
        Ok(())
    }));

    enclose!((builder) during!(t, ds, <assigned $drv: String #(literal) $settings $derivation>,
    |t: &mut Activation| {
        let drv = DrvPath::from(drv.as_str());
        let Ok(settings) = build::BuildSettings::parse(&settings) else {
            tracing::warn!(%drv, ?settings, "ignoring an assignment with malformed settings");
            return Ok(());
        };
        let Ok(derivation) = derivation.to_bytestring().map(|d| d.into_owned()) else {
            tracing::warn!(%drv, "ignoring an assignment whose derivation is not a byte string");
            return Ok(());
        };
        let settings = BuildSettings::from_wire(&settings);
        t.message(&builder, Event::Assigned { drv: drv.clone(), settings, derivation });
        on_retraction(t, enclose!((builder) move |t| {
            t.message(&builder, Event::Unassigned { drv });
            Ok(())
        }));
        Ok(())
    }));

    // A step claimed again after a reconnection may go to another worker (once it is no
    // longer kept for us): then let go of the claim.
    for drv in pending {
        let step = AnyValue::new(drv.to_string());
        enclose!((builder, me) during!(t, ds, <assigned #(step) $worker: String _ _>, |t: &mut Activation| {
            if me != worker.as_str() {
                t.message(&builder, Event::AssignedElsewhere { drv: drv.clone() });
            }
            Ok(())
        }));
    }
    Ok(builder)
}

/// Follow the build of one assigned step from the current facet (starting it if it is not
/// running already), then report its outcome and tell the builder its slot is free.
/// The build itself is stopped by [`Builds::cancel`].
fn build_step(
    t: &mut Activation,
    worker: &Builder,
    drv: DrvPath,
    settings: BuildSettings,
    derivation: Vec<u8>,
) {
    let (ds, config) = (Arc::clone(&worker.ds), Arc::clone(&worker.config));
    let (pool, store) = (worker.pool.clone(), worker.store.clone());
    let builder = worker.me.get().and_then(Weak::upgrade);
    let facet = t.facet_ref();
    let store_dir = pool.store_dir().clone();
    let account = Account::new(Some(AnyValue::symbol("build")), None);
    let lines = enclose!((facet, account, ds, config, drv) move |log: BuildLog| {
        facet.activate(&account, None, |t| {
            let (drv, worker) = (drv.to_string(), config.id.to_string());
            match log {
                BuildLog::Line(line) => ds.message(t, &build::Log { drv, worker, line }),
                BuildLog::Activity(event) => {
                    if let Some(record) = build_activity::to_record(&drv, &worker, &event) {
                        ds.message(t, &record);
                    }
                }
            }
            Ok(())
        });
    });
    let followed = worker
        .builds
        .follow(&drv, Box::new(lines), |lines, mut grant| {
            let (config, drv) = (Arc::clone(&config), drv.clone());
            async move {
                tracing::info!(%drv, "building");
                let inline = match derivation.is_empty() {
                    true => None,
                    false => write_resolved(&config, &pool, &store, &drv, &derivation).await?,
                };
                match inline {
                    Some(basic) => {
                        // As in run_build: the builder runs only while the step is granted here.
                        grant.granted().await;
                        build_inline(&config, &pool, &drv, basic, settings, |log| lines.send(log))
                            .await
                    }
                    None => {
                        run_build(&config, &pool, &store, &drv, settings, &mut grant, |log| {
                            lines.send(log)
                        })
                        .await
                    }
                }
            }
        });
    t.linked_task(Some(AnyValue::new(format!("build {drv}"))), async move {
        // The build is followed (its step granted to us here) while this task lives.
        let outcome = match followed {
            Ok((mut outcome, _following)) => match outcome.wait_for(Option::is_some).await {
                Ok(o) => o.clone(),
                Err(_) => None,
            },
            Err(failure) => Some(Err(failure)),
        };
        let outcome = outcome.unwrap_or_else(|| Err(BuildFailure::transient("the build stopped")));
        facet.activate(&account, None, |t| {
            if let Some(builder) = &builder {
                t.message(builder, Event::Finished { drv: drv.clone() });
            }
            match outcome {
                Ok(built) => {
                    tracing::info!(%drv, "built");
                    // The realisations go with the report: the planner records them only
                    // from the step's assignee, once it accepted the outputs.
                    let realisations = built
                        .realisations
                        .into_iter()
                        .map(|r| build::Realisation {
                            id: r.id,
                            path: format!("{}/{}", store_dir.as_str(), r.out_path),
                            signatures: r.signatures.into_iter().collect(),
                        })
                        .collect();
                    ds.message(
                        t,
                        &build::ReportBuilt {
                            drv: drv.into(),
                            worker: config.id.to_string(),
                            outputs: built.outputs,
                            realisations,
                            usage: built.usage.iter().map(usage_to_wire).collect(),
                        },
                    );
                }
                Err(BuildFailure {
                    reason,
                    kind,
                    cause,
                    lost,
                }) => {
                    tracing::warn!(%drv, %reason, "failed");
                    // Before the failure: the planner builds the lost input again first.
                    if let Some(path) = lost {
                        ds.message(
                            t,
                            &build::Lost {
                                drv: drv.to_string(),
                                path,
                                worker: config.id.to_string(),
                            },
                        );
                    }
                    ds.message(
                        t,
                        &build::ReportFailed {
                            drv: drv.into(),
                            worker: config.id.to_string(),
                            reason,
                            kind,
                            cause,
                        },
                    );
                }
            }
            Ok(())
        });
        Ok(LinkedTaskTermination::KeepFacet)
    });
}

/// The outputs of `drv` (by output name), if substituters in the dataspace had them all and
/// they are valid in the local store now; `None` means build it.
async fn substituted(
    store: &StoreNode,
    store_dir: &StoreDir,
    drv: &DrvPath,
) -> Option<Vec<String>> {
    // Most dataspaces have no substituter: then do not even read the derivation.
    if !store.has_substituters() {
        return None;
    }
    let outputs = known_outputs(store_dir, drv).await?;
    match store.substitute(&outputs).await {
        Ok(true) => Some(outputs),
        Ok(false) => None,
        Err(e) => {
            tracing::warn!(%drv, error = %e, "substitution failed; building instead");
            None
        }
    }
}

/// The output paths of `drv` (in the local store), if every one is known before it is built
/// (input-addressed and fixed outputs).
async fn known_outputs(store_dir: &StoreDir, drv: &DrvPath) -> Option<Vec<String>> {
    let text = tokio::fs::read(drv.as_str()).await.ok()?;
    let path = store_dir.parse(drv.as_str()).ok()?;
    let derivation = Derivation::parse_at(store_dir, &path, &text).ok()?;
    derivation
        .outputs
        .values()
        .map(|o| o.path().map(|p| store_dir.print(p)))
        .collect()
}

/// Build `drv` with `settings` over the worker's daemon pool, passing its log lines and
/// activity events to `send_log`. The derivation and the inputs the local store lacks are fetched first from the
/// stores in the dataspace; the builder runs only while the step is granted to this worker
/// (`grant`). Dropping the future interrupts the build.
async fn run_build(
    config: &BuilderConfig,
    pool: &DaemonPool,
    store: &StoreNode,
    drv: &DrvPath,
    settings: BuildSettings,
    grant: &mut Grant,
    mut send_log: impl FnMut(BuildLog) + Send,
) -> Outcome {
    let worker = config.id.as_str();
    let fetch_failed = |e: FetchError| fetch_failed(worker, e);
    // Substituters need the derivation first. Otherwise a derivation (or input derivation)
    // this store lacks comes back from the build as a missing input and is fetched then: no
    // validity round trip for the common case of a worker sharing the frontend's store.
    if store.has_substituters() {
        store
            .ensure(&[drv.to_string()])
            .await
            .map_err(fetch_failed)?;
    }
    // A check compares the outputs built again with those valid here: a worker with a store of
    // its own fetches them first, from whoever has them (the frontend that asked for the
    // check), as Nix can check only outputs valid in its store.
    if settings.mode == BuildMode::Check {
        store
            .ensure(&[drv.to_string()])
            .await
            .map_err(fetch_failed)?;
        if let Some(outputs) = known_outputs(pool.store_dir(), drv).await {
            store.ensure(&outputs).await.map_err(fetch_failed)?;
        }
    }
    // Checking or repairing builds the outputs again: substitutes would not do.
    let substitutes = match settings.mode {
        BuildMode::Normal => match substituted(store, pool.store_dir(), drv).await {
            Some(outputs) => Some(BuiltStep {
                outputs,
                realisations: Vec::new(),
                usage: None,
            }),
            None => realised_by_substituters(store, pool, drv).await,
        },
        BuildMode::Check | BuildMode::Repair => None,
    };
    if let Some(substituted) = substitutes {
        send_log(BuildLog::Line(format!("substituted the outputs of {drv}")));
        return Ok(substituted);
    }
    // At most two rounds of fetching: the derivations, then the inputs' outputs they name.
    let mut fetches = 0;
    let built = loop {
        // Cut off from the dataspace while fetching, the step may have been built elsewhere
        // or withdrawn meanwhile: run the builder only once it is granted to us again.
        grant.granted().await;
        match pool.build(drv.as_str(), &settings, &mut send_log).await {
            Err(StepError::InputsMissing(missing)) if fetches < 2 => {
                fetches += 1;
                store.ensure(&missing).await.map_err(fetch_failed)?;
            }
            built => break built,
        }
    };
    let mut built = built.map_err(|e| step_failed(worker, e))?;
    if let Some(usage) = &built.usage {
        tracing::info!(
            %drv,
            wall_s = usage.wall_time.as_secs_f64(),
            cpu_s = usage.cpu_time.as_secs_f64(),
            peak_mib = usage.peak_memory.map(|p| p / MIB),
            "built; usage measured by its control group"
        );
    }
    if let Some(key) = &config.signing_key {
        sign_realisations(pool, key, &mut built.realisations)
            .await
            .map_err(|e| {
                BuildFailure::transient(format!(
                    "cannot sign the realisations on worker {worker}: {e}"
                ))
            })?;
    }
    Ok(built)
}

/// Build the inline derivation `basic` under `drv` over the worker's daemon pool (its inputs
/// are valid: [`write_resolved`] fetched them), passing its log lines and activity events to
/// `send_log`.
async fn build_inline(
    config: &BuilderConfig,
    pool: &DaemonPool,
    drv: &DrvPath,
    basic: BasicDerivation,
    settings: BuildSettings,
    send_log: impl FnMut(BuildLog) + Send,
) -> Outcome {
    let worker = config.id.as_str();
    let path = pool
        .store_dir()
        .parse(drv.as_str())
        .map_err(|e| BuildFailure::permanent(format!("{drv}: {e}")))?;
    pool.build_inline(path, basic, &settings, send_log)
        .await
        .map_err(|e| step_failed(worker, e))
}

/// A build that failed on `worker`, as the worker reports it.
fn step_failed(worker: &str, e: StepError) -> BuildFailure {
    match e {
        StepError::InputsMissing(missing) => BuildFailure::transient(format!(
            "inputs not valid on worker {worker}: {}",
            missing.join(" ")
        )),
        StepError::OutOfMemory { limit, .. } => BuildFailure {
            cause: build::FailureCause::OutOfMemory {
                limit: limit.into(),
            },
            ..BuildFailure::transient(e.to_string())
        },
        e if e.is_permanent() => BuildFailure::permanent(e.to_string()),
        e => BuildFailure::transient(e.to_string()),
    }
}

/// Inputs of a step could not be fetched on `worker`: a transient failure, naming the path no
/// store has any more if that is why.
fn fetch_failed(worker: &str, e: FetchError) -> BuildFailure {
    let lost = e.missing_path().map(str::to_owned);
    BuildFailure {
        lost,
        ..BuildFailure::transient(format!("cannot fetch inputs on worker {worker}: {e}"))
    }
}

/// Write the derivation `text` the planner gave with `drv` into the local store as `drv`, if it
/// is `drv`'s (its text path: a derivation the planner resolved), its inputs (the outputs it
/// was resolved with) fetched first from the stores that have them. A text that is not `drv`'s
/// is an inline derivation a trusted frontend vouched for (only the planner assigns, and it
/// takes such a text only with a vouch): its inputs are fetched likewise, and it is returned
/// to be built as it is, unwritten.
async fn write_resolved(
    config: &BuilderConfig,
    pool: &DaemonPool,
    store: &StoreNode,
    drv: &DrvPath,
    text: &[u8],
) -> Result<Option<BasicDerivation>, BuildFailure> {
    let worker = config.id.as_str();
    let store_dir = pool.store_dir();
    let refused = |why: String| {
        BuildFailure::permanent(format!(
            "the resolved derivation {drv} given to worker {worker} is not taken: {why}"
        ))
    };
    let path = store_dir
        .parse(drv.as_str())
        .map_err(|e| refused(e.to_string()))?;
    let (derivation, inline) = match Derivation::parse_checked(store_dir, &path, text) {
        Ok(derivation) => (derivation, false),
        Err(_) => {
            let derivation =
                Derivation::parse_at(store_dir, &path, text).map_err(|e| refused(e.to_string()))?;
            if !derivation.input_drvs.is_empty() {
                return Err(refused("an inline derivation has input derivations".into()));
            }
            (derivation, true)
        }
    };
    let inputs: Vec<String> = derivation
        .input_srcs
        .iter()
        .map(|p| store_dir.print(p))
        .collect();
    store
        .ensure(&inputs)
        .await
        .map_err(|e| fetch_failed(worker, e))?;
    if inline {
        return Ok(Some(BasicDerivation::from_derivation(&derivation)));
    }
    let mut lease = pool
        .lease()
        .await
        .map_err(|e| BuildFailure::transient(e.to_string()))?;
    match lease
        .client()
        .add_text_to_store(path.name(), text, &derivation.input_srcs)
        .await
    {
        Ok(written) if written == path => {
            lease.release();
            Ok(None)
        }
        Ok(written) => Err(refused(format!(
            "the store wrote it as {}",
            store_dir.print(&written)
        ))),
        Err(e) => Err(BuildFailure::transient(format!(
            "cannot write {drv} on worker {worker}: {}",
            lease.failed(e)
        ))),
    }
}

/// What a build used, as the report carries it (a peak of -1: none kept).
fn usage_to_wire(usage: &BuildUsage) -> build::BuildUsage {
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    build::BuildUsage {
        peak_memory: usage
            .peak_memory
            .map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX))
            .into(),
        cpu_millis: millis(usage.cpu_time).into(),
        wall_millis: millis(usage.wall_time).into(),
    }
}

/// Sign `realisations` with `key` and register the signed copies in the local store (Nix adds
/// the signatures to the realisations it registered when it built them).
async fn sign_realisations(
    pool: &DaemonPool,
    key: &SecretKey,
    realisations: &mut [nixspace_nix_protocol::Realisation],
) -> Result<(), StepError> {
    if realisations.is_empty() {
        return Ok(());
    }
    let mut lease = pool.lease().await?;
    for r in realisations.iter_mut() {
        let fingerprint = realisation_fingerprint(&r.id, &r.out_path, &r.dependent_realisations);
        r.signatures.insert(sign(key, &fingerprint));
        if let Err(e) = lease.client().register_drv_output(r).await {
            return Err(lease.failed(e));
        }
    }
    lease.release();
    Ok(())
}
