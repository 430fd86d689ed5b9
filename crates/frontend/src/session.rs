//! One build on a dataspace, from root derivations to a [`Report`].
//!
//! [`BuildSession::start`] plans the build (the steps: derivations of the roots' closure whose
//! outputs are not valid here) and joins the dataspace with the submit capability, asserting a
//! demand per step (inputs first; content-addressed steps are held by the [`Resolver`] until
//! their inputs are realised). [`BuildSession::next`] follows the build and yields typed
//! [`Progress`] for the caller to render, until every step is built or failed, a step has
//! stayed unschedulable past the configured patience, or (without keep-going) one failed.
//! The session stays joined across dataspace restarts: on rejoining it asserts the demands of
//! the steps still pending, and it gives up after `reconnect_for` out of reach.
//! [`BuildSession::finish`] copies the roots' outputs into this machine's store, registers the
//! realisations of the content-addressed ones, and returns the report. Dropping a session
//! withdraws its demands (steps nobody else wants stop).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nixspace_nix_formats::derivation::{BasicDerivation, Derivation};
use nixspace_nix_formats::signature::SecretKey;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::{ClientSettings, LogEvent};
use nixspace_nix_tools::{DaemonPool, DerivationInfo};
use nixspace_protocol::{build, expected_outputs, BuildMode, BuildSettings, DrvPath, WorkerId};
use nixspace_space::join::{stay_joined, Backoff, JoinError, SessionEvent};
use nixspace_space::Route;
use nixspace_transfer::{FetchError, StoreNode, Vouch, VouchError};
use syndicate::actor::{Account, Activation, Cap, FacetRef};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::build_log::{self, StepLogs};
use crate::demands::{demands, outputs_of, StepSettings};
use crate::events::{self, Handler, StepEvent};
use crate::outcome::{Failure, FailureCause, StepOutcome};
use crate::phase::PhaseClock;
use crate::plan::{plan, Plan, PlanError};
use crate::post_build::{AfterBuild, PostBuild};
use crate::repair::{self, RepairError};
use crate::report::{Report, LOG_TAIL_LINES};
use crate::resolve::{RegisterError, Resolver, ResolverError};
use crate::store_db::{valid_paths, StoreDb};

/// How often the session looks for steps unschedulable for too long.
const PATIENCE_CHECK: Duration = Duration::from_millis(500);

/// What a build session works with.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The dataspace (a submit route).
    pub route: Route,
    /// This frontend's name in its demands (unique per session).
    pub requester: String,
    /// Priority of the demands (higher first).
    pub priority: i64,
    /// How long a step may stay unschedulable before the build gives up.
    pub patience: Duration,
    /// How long to keep trying to rejoin a dataspace that went away.
    pub reconnect_for: Duration,
    /// Whether to follow the other steps after one failed (Nix's `--keep-going`).
    pub keep_going: bool,
    /// How the steps build (the client's `max-silent-time`, `timeout`, `keep-failed`, build
    /// mode, …): `--check` applies to the roots, which are built even when valid.
    pub settings: BuildSettings,
    /// The local store: derivations are read from it, the outputs copied into it.
    pub pool: DaemonPool,
    /// The local store's database, when it can be read (validity without a daemon).
    pub db: Option<Arc<StoreDb>>,
    /// What to do after each step is built (sign its outputs, run a hook): when not empty,
    /// every step's outputs are copied here as it is built.
    pub post_build: Arc<PostBuild>,
    /// A client's settings (its `--substituters` among them) for the daemon connections that
    /// look for and fetch substitutes; none: the daemon's own configuration.
    pub substitution: Option<ClientSettings>,
}

/// What happened in a build, for the caller to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A worker started building a step (a new attempt: earlier log lines no longer count).
    Started {
        /// The step.
        drv: DrvPath,
        /// The worker.
        worker: WorkerId,
    },
    /// The worker building a step stopped (it was lost; the step is retried).
    Stopped {
        /// The step.
        drv: DrvPath,
    },
    /// One line of a step's build log.
    Log {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        worker: WorkerId,
        /// The line, without its newline.
        line: String,
    },
    /// One of Nix's activity events of a step's build, as the worker's `nix-daemon` sent it:
    /// a result of the build activity (activity 0: a phase, progress), or an activity under it
    /// (parent 0: the build activity) starting, getting a result or stopping, numbered by the
    /// worker. Never a [`LogEvent::Message`].
    Activity {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        worker: WorkerId,
        /// The event.
        event: LogEvent,
    },
    /// The post-build hook started for a built step.
    PostBuildHook {
        /// The step.
        drv: DrvPath,
        /// The hook.
        hook: String,
    },
    /// One line the post-build hook printed.
    PostBuildLog {
        /// The step.
        drv: DrvPath,
        /// The line, without its newline.
        line: String,
    },
    /// A step's outputs are valid.
    Built {
        /// The step.
        drv: DrvPath,
        /// Its output paths.
        outputs: Vec<String>,
    },
    /// A step failed for good.
    Failed {
        /// The step.
        drv: DrvPath,
        /// Who reported what, and whose fault it is.
        failure: Failure,
    },
    /// No connected worker can build a step (yet).
    Waiting {
        /// The step.
        drv: DrvPath,
        /// The planner's reason.
        reason: String,
    },
    /// A step that was waiting for a capable worker has one now.
    Schedulable {
        /// The step.
        drv: DrvPath,
    },
    /// The dataspace went away; the session reconnects.
    Lost {
        /// Why the connection ended.
        why: String,
    },
    /// Joining failed; the session tries again.
    Retrying {
        /// When.
        after: Duration,
        /// Why it failed.
        why: String,
    },
    /// The session joined the dataspace again and asserted its pending demands anew.
    Rejoined,
}

/// Why a build session could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The build could not be planned.
    #[error("cannot read the derivations to build: {0}")]
    Plan(#[from] PlanError),
    /// The content-addressed steps could not be prepared.
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    /// The dataspace refused the session, or stayed away for longer than allowed.
    #[error("the build cannot continue: {0}")]
    Dataspace(JoinError),
    /// The outputs could not be copied here.
    #[error("cannot copy the outputs to this machine's store: {0}")]
    Copy(#[source] FetchError),
    /// The realisations could not be registered here.
    #[error("cannot register the realisations: {0}")]
    Register(#[from] RegisterError),
    /// A repair found a path it cannot repair, or could not check the store.
    #[error(transparent)]
    Repair(#[from] RepairError),
    /// The inputs of an inline derivation could not be vouched for.
    #[error(transparent)]
    Vouch(#[from] VouchError),
}

/// The dataspace connection of a session; leaving (on drop) withdraws the demands.
struct Membership {
    /// The root facet of the current connection, once joined.
    facet: Arc<Mutex<Option<FacetRef>>>,
    /// Set once the session left: a connection made after that leaves at once.
    left: Arc<AtomicBool>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.left.store(true, Ordering::SeqCst);
        let facet = self.facet.lock().ok().and_then(|mut f| f.take());
        if let Some(facet) = facet {
            facet.activate(&Account::new(None, None), None, |t| {
                t.stop_root();
                Ok(())
            });
        }
    }
}

/// What arrives from the dataspace side.
enum Incoming {
    Step(StepEvent),
    Connection(Progress),
    /// A line from a step's post-build hook.
    PostBuildLine {
        drv: DrvPath,
        line: String,
    },
    /// The work after a step's build ended (`None`: done).
    AfterBuilt {
        drv: DrvPath,
        outputs: Vec<String>,
        error: Option<String>,
    },
}

/// The part of a session that exists while it has steps to follow.
struct Following {
    incoming: mpsc::UnboundedReceiver<Incoming>,
    connection: Pin<Box<dyn Future<Output = JoinError> + Send>>,
    store: StoreNode,
    resolver: Resolver,
    /// Where the work after a step's build reports.
    sender: mpsc::UnboundedSender<Incoming>,
    /// Declared last: the demands go once the rest is dropped.
    _membership: Membership,
}

/// One build on a dataspace: see the module's documentation.
pub struct BuildSession {
    requester: String,
    keep_going: bool,
    patience: Duration,
    pool: DaemonPool,
    db: Option<Arc<StoreDb>>,
    post_build: Arc<PostBuild>,
    /// Built steps whose post-build work is under way.
    after_build: BTreeSet<DrvPath>,
    roots: Vec<DrvPath>,
    plan: Plan,
    /// The corrupted paths a repair rebuilds: each is copied here again after the build if
    /// it is still corrupted (a worker with a store of its own made it anew).
    repairing: Vec<String>,
    /// Every step and how it ended (`None` while pending).
    steps: BTreeMap<DrvPath, Option<StepOutcome>>,
    /// Steps being built, and by whom.
    running: BTreeMap<DrvPath, WorkerId>,
    tails: BTreeMap<DrvPath, VecDeque<String>>,
    /// The logs of the attempts being followed, stored locally when their step ends.
    logs: StepLogs,
    /// The logs being handed to the local store; the report waits for them.
    storing_logs: JoinSet<()>,
    unschedulable: BTreeMap<DrvPath, (String, Instant)>,
    /// A step stayed unschedulable past the patience.
    stuck: bool,
    queued: VecDeque<Progress>,
    following: Option<Following>,
    clock: PhaseClock,
    started: SystemTime,
    /// The inline derivation this session builds: vouched for while joined.
    inline: Option<InlineStep>,
}

/// The step of an inline derivation, as a session vouches for it on the dataspace.
#[derive(Debug, Clone)]
struct InlineStep {
    /// The path the client names it by.
    drv: String,
    /// Its ATerm text.
    text: Vec<u8>,
    /// The closure of its inputs, which this store vouches for to workers with stores of
    /// their own (a trusted client's, unsigned as they may be).
    inputs: Option<Arc<Vouch>>,
}

/// A derivation a Nix client sent inline (`BuildDerivation`), which is not in the local
/// store: see [`BuildSession::start_inline`].
#[derive(Debug, Clone)]
pub struct InlineDerivation {
    /// The path the client names it by.
    pub drv: DrvPath,
    /// Its ATerm text, with no input derivations: what the worker builds.
    pub text: Vec<u8>,
    /// What scheduling needs to know about it.
    pub info: DerivationInfo,
    /// Its input paths (the client copied them here).
    pub sources: BTreeSet<StorePath>,
    /// The key this store vouches for the closure of `sources` with, if the client is
    /// trusted (see [`InlineDerivation::vouched_by`]).
    pub vouching_key: Option<Arc<SecretKey>>,
}

impl InlineDerivation {
    /// The derivation `basic` a client sent as `drv` (paths in `store`).
    pub fn new(drv: DrvPath, basic: BasicDerivation, store: &StoreDir) -> InlineDerivation {
        let text = basic.to_aterm(store);
        let sources = basic.input_srcs.clone();
        let info = DerivationInfo::from_derivation(&Derivation::from(basic), store);
        InlineDerivation {
            drv,
            text,
            info,
            sources,
            vouching_key: None,
        }
    }

    /// A trusted client's derivation: the closure of its inputs is served to the dataspace
    /// signed by `key` too, so workers with stores of their own take what the client copied
    /// here unsigned, as Nix's daemon takes it from a trusted user.
    pub fn vouched_by(mut self, key: Arc<SecretKey>) -> InlineDerivation {
        self.vouching_key = Some(key);
        self
    }
}

impl std::fmt::Debug for BuildSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildSession")
            .field("requester", &self.requester)
            .field("steps", &self.steps.len())
            .finish_non_exhaustive()
    }
}

impl BuildSession {
    /// Plan the build of `roots` (`.drv` paths) and, if there is anything to build, join the
    /// dataspace and demand it.
    pub async fn start(
        config: SessionConfig,
        roots: Vec<DrvPath>,
    ) -> Result<BuildSession, SessionError> {
        let started = SystemTime::now();
        let mut clock = PhaseClock::start("build");
        let root_names: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        let mut plan = plan(
            &root_names,
            &config.pool,
            config.db.as_deref(),
            config.substitution.as_ref(),
        )
        .await?;
        let mut repairing = Vec::new();
        match config.settings.mode {
            // Checking rebuilds the roots whose outputs are valid.
            BuildMode::Check => plan.needed.extend(root_names.iter().cloned()),
            // Repairing rebuilds what made the corrupted paths of the output closure.
            BuildMode::Repair => {
                for c in repair::corrupted(&plan, &root_names, &config.pool).await? {
                    repairing.push(c.path);
                    plan.needed.insert(c.deriver);
                }
            }
            BuildMode::Normal => {}
        }
        clock.end("plan");
        BuildSession::planned(config, roots, plan, repairing, None, clock, started).await
    }

    /// Build `inline`, a derivation a trusted Nix client sent with `BuildDerivation` (not in
    /// the local store; its inputs are): one step (unless its outputs are all valid here
    /// already and it is not to be checked or repaired), demanded with its text, which the
    /// session vouches for with `<inline-derivation …>`: `config.route` must be a trusted
    /// route, or the planner never takes the demand.
    pub async fn start_inline(
        config: SessionConfig,
        inline: InlineDerivation,
    ) -> Result<BuildSession, SessionError> {
        let started = SystemTime::now();
        let clock = PhaseClock::start("build");
        let drv = inline.drv.to_string();
        let mut plan = Plan::default();
        let known: Option<Vec<String>> = inline.info.outputs.values().cloned().collect();
        plan.infos.insert(drv.clone(), inline.info);
        let valid = match (known, config.settings.mode) {
            (Some(known), BuildMode::Normal) => {
                missing_here(&known, config.db.as_deref(), &config.pool)
                    .await
                    .is_empty()
            }
            _ => false,
        };
        if !valid {
            plan.needed.insert(drv.clone());
        }
        let inputs = match inline.vouching_key {
            Some(key) if !plan.needed.is_empty() => {
                let vouch = Vouch::over_closure(&config.pool, key, inline.sources).await?;
                tracing::debug!(%drv, paths = vouch.len(), "vouching for the inputs' closure");
                Some(Arc::new(vouch))
            }
            _ => None,
        };
        let vouched = Some(InlineStep {
            drv,
            text: inline.text,
            inputs,
        });
        BuildSession::planned(
            config,
            vec![inline.drv],
            plan,
            Vec::new(),
            vouched,
            clock,
            started,
        )
        .await
    }

    /// The session for `plan`, joined to the dataspace if anything must be built.
    async fn planned(
        config: SessionConfig,
        roots: Vec<DrvPath>,
        plan: Plan,
        repairing: Vec<String>,
        inline: Option<InlineStep>,
        clock: PhaseClock,
        started: SystemTime,
    ) -> Result<BuildSession, SessionError> {
        let steps = plan
            .needed
            .iter()
            .map(|d| (DrvPath::from(d.as_str()), None))
            .collect();
        let mut session = BuildSession {
            requester: config.requester.clone(),
            keep_going: config.keep_going,
            patience: config.patience,
            pool: config.pool.clone(),
            db: config.db.clone(),
            post_build: Arc::clone(&config.post_build),
            after_build: BTreeSet::new(),
            roots,
            plan,
            repairing,
            steps,
            running: BTreeMap::new(),
            tails: BTreeMap::new(),
            logs: StepLogs::default(),
            storing_logs: JoinSet::new(),
            unschedulable: BTreeMap::new(),
            stuck: false,
            queued: VecDeque::new(),
            following: None,
            clock,
            started,
            inline,
        };
        if !session.steps.is_empty() {
            session.following = Some(session.join(&config).await?);
        }
        Ok(session)
    }

    /// The settings of each step: `config`'s, `--check` for the roots only.
    fn step_settings(&self, config: &SessionConfig) -> StepSettings {
        StepSettings::new(config.settings, self.roots.iter().map(|r| r.to_string()))
    }

    /// Join the dataspace and assert the demands (again on every connection, for the steps
    /// still pending).
    async fn join(&mut self, config: &SessionConfig) -> Result<Following, SessionError> {
        // This machine's store in the dataspace: workers with stores of their own fetch the
        // derivations and sources from it, and the results come back.
        let store = StoreNode::new(self.requester.clone(), self.pool.clone());
        if let Some(inputs) = self.inline.as_ref().and_then(|i| i.inputs.clone()) {
            store.vouch(inputs);
        }
        let resolver = Resolver::new(
            &self.plan,
            self.pool.store_dir().clone(),
            self.pool.clone(),
            &self.requester,
        )
        .await?;
        let mut demands = demands(
            &self.plan.steps().into_iter().collect(),
            &self.requester,
            config.priority,
            &self.step_settings(config),
        );
        resolver.rename_demands(&mut demands);
        let vouch = self.inline.clone().map(|InlineStep { drv, text, .. }| {
            for d in demands.iter_mut().filter(|d| d.drv == drv) {
                d.derivation = text.clone();
            }
            build::InlineDerivation {
                drv,
                derivation: text,
            }
        });
        self.clock.end("prepare the demands");
        let (tx, incoming) = mpsc::unbounded_channel();
        // Steps settled, as the actor saw them: their demands are not asserted again.
        let settled: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let handler: Handler = {
            let (tx, settled) = (tx.clone(), Arc::clone(&settled));
            resolver.translating(Arc::new(move |_t, event| {
                if let StepEvent::Built { drv, .. } | StepEvent::Failed { drv, .. } = &event {
                    if let Ok(mut settled) = settled.lock() {
                        settled.insert(drv.to_string());
                    }
                }
                // The receiver is gone once the session is over; late events do not matter.
                let _ = tx.send(Incoming::Step(event));
                Ok(())
            }))
        };
        let membership = Membership {
            facet: Arc::default(),
            left: Arc::new(AtomicBool::new(false)),
        };
        let body = {
            let (facet, left) = (Arc::clone(&membership.facet), Arc::clone(&membership.left));
            let (store, resolver) = (store.clone(), resolver.clone());
            move |t: &mut Activation, ds: Arc<Cap>| {
                if left.load(Ordering::SeqCst) {
                    t.stop_root();
                    return Ok(());
                }
                if let Ok(mut facet) = facet.lock() {
                    *facet = Some(t.facet_ref());
                }
                store.attach(t, Arc::clone(&ds));
                resolver.attach(t, Arc::clone(&ds));
                events::observe(t, &ds, Arc::clone(&handler));
                // Before the demand: the planner takes it once it has seen the vouch.
                if let Some(vouch) = &vouch {
                    ds.assert(t, vouch);
                }
                let settled = settled.lock().map_err(|_| "session state poisoned")?;
                let unsettled: Vec<build::Demand> = demands
                    .iter()
                    .filter(|d| !settled.contains(resolver.original(&d.drv)))
                    .cloned()
                    .collect();
                // Over a run of turns, inputs first: the planner takes in and gives out the
                // first steps of a large build while the rest are still on their way.
                nixspace_space::paced::assert_demands(t, ds, unsettled.into_iter());
                Ok(())
            }
        };
        let backoff = Backoff {
            give_up_after: Some(config.reconnect_for),
            ..Backoff::default()
        };
        let sender = tx.clone();
        let on_connection = move |event: SessionEvent<'_>| {
            let progress = match event {
                SessionEvent::Joined { connection: 1 } => return,
                SessionEvent::Joined { .. } => Progress::Rejoined,
                SessionEvent::Lost(why) => Progress::Lost { why },
                SessionEvent::Retrying { after, why } => Progress::Retrying {
                    after,
                    why: why.to_string(),
                },
            };
            let _ = tx.send(Incoming::Connection(progress));
        };
        let route = config.route.clone();
        let connection =
            Box::pin(async move { stay_joined(&route, backoff, body, on_connection).await });
        Ok(Following {
            incoming,
            connection,
            store,
            resolver,
            sender,
            _membership: membership,
        })
    }

    /// The plan: the derivation closure and which of it must be built.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// How many steps the build has (0: everything is valid already).
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether the build has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// How many steps have ended, built or failed.
    pub fn done(&self) -> usize {
        self.steps.values().filter(|s| s.is_some()).count()
    }

    /// The steps being built now, and by whom.
    pub fn running(&self) -> &BTreeMap<DrvPath, WorkerId> {
        &self.running
    }

    fn is_over(&self) -> bool {
        self.stuck || self.steps.values().all(Option::is_some)
    }

    /// The next thing that happened; `None` once the build is over (every step built or
    /// failed, or it cannot finish). Cancel-safe: nothing is lost when the future is dropped.
    pub async fn next(&mut self) -> Result<Option<Progress>, SessionError> {
        loop {
            if let Some(progress) = self.queued.pop_front() {
                return Ok(Some(progress));
            }
            self.check_patience();
            if self.is_over() {
                return Ok(None);
            }
            let Some(following) = self.following.as_mut() else {
                return Ok(None);
            };
            let incoming = tokio::select! {
                incoming = following.incoming.recv() => incoming,
                e = &mut following.connection => return Err(SessionError::Dataspace(e)),
                () = tokio::time::sleep(PATIENCE_CHECK) => None,
            };
            match incoming {
                Some(Incoming::Step(event)) => self.apply(event),
                Some(Incoming::Connection(progress)) => self.queued.push_back(progress),
                Some(Incoming::PostBuildLine { drv, line }) => {
                    self.queued.push_back(Progress::PostBuildLog { drv, line })
                }
                Some(Incoming::AfterBuilt {
                    drv,
                    outputs,
                    error,
                }) => self.after_built(drv, outputs, error),
                // A wake-up: the loop checks the patience.
                None => {}
            }
        }
    }

    /// A `built` of one of this build's steps whose outputs are not the derivation's becomes
    /// the step's failure, so its outputs are never copied here (the planner checks workers'
    /// reports already; this is the second check).
    fn checked(&self, event: StepEvent) -> StepEvent {
        let StepEvent::Built { drv, outputs, .. } = &event else {
            return event;
        };
        let Some(info) = self.plan.infos.get(drv.as_str()) else {
            return event;
        };
        match expected_outputs::check(drv, &outputs_of(info), outputs) {
            Ok(()) => event,
            Err(wrong) => {
                tracing::warn!(%drv, %wrong, "the planner reported outputs the derivation does not have");
                StepEvent::Failed {
                    drv: drv.clone(),
                    failure: Failure {
                        worker: None,
                        reason: format!(
                            "the reported outputs are not the derivation's ({wrong}); not copied"
                        ),
                        cause: FailureCause::Infrastructure,
                    },
                }
            }
        }
    }

    /// Take in one event about a step (any step: only this build's count).
    fn apply(&mut self, event: StepEvent) {
        let event = self.checked(event);
        match &event {
            StepEvent::Built { drv, worker, .. } if self.is_pending(drv) => {
                self.store_log(drv, Some(worker));
            }
            StepEvent::Failed { drv, failure } if self.is_pending(drv) => {
                self.store_log(drv, failure.worker.as_ref());
            }
            _ => {}
        }
        match event {
            StepEvent::Unschedulable { drv, reason } if self.steps.contains_key(&drv) => {
                self.unschedulable
                    .insert(drv.clone(), (reason.clone(), Instant::now()));
                self.queued.push_back(Progress::Waiting { drv, reason });
            }
            StepEvent::Schedulable { drv } if self.unschedulable.remove(&drv).is_some() => {
                self.queued.push_back(Progress::Schedulable { drv });
            }
            StepEvent::Built { drv, outputs, .. }
                if self.is_pending(&drv) && !self.post_build.is_empty() =>
            {
                self.start_after_build(drv, outputs);
            }
            StepEvent::Built { drv, outputs, .. } if self.is_pending(&drv) => {
                self.settle(
                    &drv,
                    StepOutcome::Built {
                        outputs: outputs.clone(),
                    },
                );
                self.queued.push_back(Progress::Built { drv, outputs });
            }
            StepEvent::Failed { drv, failure } if self.is_pending(&drv) => {
                self.settle(&drv, StepOutcome::Failed(failure.clone()));
                self.queued.push_back(Progress::Failed { drv, failure });
                if !self.keep_going {
                    self.abandon_the_rest();
                }
            }
            StepEvent::Assigned { drv, worker } if self.is_pending(&drv) => {
                if self.running.is_empty() && self.done() == 0 {
                    self.clock.end("first step assigned");
                }
                // A new attempt: its log is the one that counts.
                self.tails.remove(&drv);
                self.logs.started(&drv, &worker);
                self.running.insert(drv.clone(), worker.clone());
                self.queued.push_back(Progress::Started { drv, worker });
            }
            StepEvent::Unassigned { drv } if self.running.remove(&drv).is_some() => {
                self.queued.push_back(Progress::Stopped { drv });
            }
            StepEvent::Refused { requester, reason } if requester == self.requester => {
                let pending: Vec<DrvPath> = self
                    .steps
                    .iter()
                    .filter(|(_, s)| s.is_none())
                    .map(|(d, _)| d.clone())
                    .collect();
                for drv in pending {
                    let failure = Failure {
                        worker: None,
                        reason: reason.clone(),
                        cause: FailureCause::Infrastructure,
                    };
                    self.settle(&drv, StepOutcome::Failed(failure.clone()));
                    self.queued.push_back(Progress::Failed { drv, failure });
                }
            }
            StepEvent::Log { drv, worker, line } if self.steps.contains_key(&drv) => {
                let tail = self.tails.entry(drv.clone()).or_default();
                if tail.len() == LOG_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                self.logs.line(&drv, &worker, &line);
                self.queued.push_back(Progress::Log { drv, worker, line });
            }
            StepEvent::Activity { drv, worker, event } if self.steps.contains_key(&drv) => {
                self.queued
                    .push_back(Progress::Activity { drv, worker, event });
            }
            _ => {}
        }
    }

    /// `drv` ended as `worker` reported: hand the log of that attempt, if this session followed
    /// it, to the local store, where `nix log` reads it (a failed build's too, as Nix keeps).
    fn store_log(&mut self, drv: &DrvPath, worker: Option<&WorkerId>) {
        let Some(log) = self.logs.ended(drv, worker) else {
            return;
        };
        let (pool, drv) = (self.pool.clone(), drv.clone());
        self.storing_logs.spawn(async move {
            if let Err(e) = build_log::store(&pool, &drv, log).await {
                tracing::warn!(%drv, error = %e, "cannot keep the build log in the local store");
            }
        });
    }

    /// Start the post-build work of the built step `drv` (once), in a task of its own that
    /// reports back through the session's channel; the step stays pending until it ends.
    fn start_after_build(&mut self, drv: DrvPath, outputs: Vec<String>) {
        let Some(following) = self.following.as_ref() else {
            return;
        };
        if !self.after_build.insert(drv.clone()) {
            return;
        }
        if let Some(hook) = &self.post_build.hook {
            self.queued.push_back(Progress::PostBuildHook {
                drv: drv.clone(),
                hook: hook.clone(),
            });
        }
        let work = AfterBuild {
            post_build: Arc::clone(&self.post_build),
            store: following.store.clone(),
            resolver: following.resolver.clone(),
            pool: self.pool.clone(),
            db: self.db.clone(),
        };
        let sender = following.sender.clone();
        tokio::spawn(async move {
            let lines = {
                let (sender, drv) = (sender.clone(), drv.clone());
                move |line| {
                    let drv = drv.clone();
                    let _ = sender.send(Incoming::PostBuildLine { drv, line });
                }
            };
            let error = work
                .run(drv.as_str(), &outputs, lines)
                .await
                .err()
                .map(|e| e.to_string());
            // The session may be over (the client left): then nobody waits for this.
            let _ = sender.send(Incoming::AfterBuilt {
                drv,
                outputs,
                error,
            });
        });
    }

    /// The post-build work of `drv` ended: the step is built, or failed with `error`.
    fn after_built(&mut self, drv: DrvPath, outputs: Vec<String>, error: Option<String>) {
        if !self.after_build.remove(&drv) || !self.is_pending(&drv) {
            return;
        }
        match error {
            None => {
                self.settle(
                    &drv,
                    StepOutcome::Built {
                        outputs: outputs.clone(),
                    },
                );
                self.queued.push_back(Progress::Built { drv, outputs });
            }
            Some(reason) => {
                tracing::warn!(%drv, %reason, "the work after the build failed");
                let failure = Failure {
                    worker: None,
                    reason,
                    cause: FailureCause::Build,
                };
                self.settle(&drv, StepOutcome::Failed(failure.clone()));
                self.queued.push_back(Progress::Failed { drv, failure });
                if !self.keep_going {
                    self.abandon_the_rest();
                }
            }
        }
    }

    fn is_pending(&self, drv: &DrvPath) -> bool {
        matches!(self.steps.get(drv), Some(None))
    }

    fn settle(&mut self, drv: &DrvPath, outcome: StepOutcome) {
        if let Some(slot) = self.steps.get_mut(drv) {
            *slot = Some(outcome);
        }
        self.running.remove(drv);
        self.unschedulable.remove(drv);
        if self.is_over() {
            self.clock.end("build the steps");
        }
    }

    /// Like Nix without `--keep-going`: once a step failed, the others are not waited for.
    fn abandon_the_rest(&mut self) {
        for outcome in self.steps.values_mut().filter(|s| s.is_none()) {
            *outcome = Some(StepOutcome::Failed(Failure {
                worker: None,
                reason: "dependency or sibling failed; not built (keep-going is off)".to_owned(),
                cause: FailureCause::Abandoned,
            }));
        }
    }

    /// Give up when a step has waited for a capable worker for longer than the patience.
    fn check_patience(&mut self) {
        let patience = self.patience;
        if self
            .unschedulable
            .values()
            .any(|(_, since)| since.elapsed() >= patience)
        {
            self.stuck = true;
        }
    }

    /// Copy the roots' outputs here (when everything was built), register the
    /// content-addressed realisations, leave the dataspace and report, once the ended steps'
    /// logs are stored here.
    pub async fn finish(mut self) -> Result<Report, SessionError> {
        // The ended steps' logs, before anyone reads them (`nix log` after the build).
        while self.storing_logs.join_next().await.is_some() {}
        let succeeded = !self.stuck
            && self
                .steps
                .values()
                .all(|s| matches!(s, Some(StepOutcome::Built { .. })));
        let mut realised = BTreeMap::new();
        if let Some(following) = self.following.as_mut().filter(|_| succeeded) {
            let wanted: Vec<String> = self
                .roots
                .iter()
                .filter_map(|r| match self.steps.get(r) {
                    Some(Some(StepOutcome::Built { outputs })) => Some(outputs.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            // Built here (workers on this store), they need no copy.
            let missing = missing_here(&wanted, self.db.as_deref(), &self.pool).await;
            if !missing.is_empty() {
                tokio::select! {
                    r = following.store.ensure(&missing) => r.map_err(SessionError::Copy)?,
                    e = &mut following.connection => return Err(SessionError::Dataspace(e)),
                }
            }
            self.clock.end("copy the outputs here");
            if !self.repairing.is_empty() {
                let left = repair::still_corrupted(&self.repairing, &self.pool).await?;
                if !left.is_empty() {
                    tokio::select! {
                        r = following.store.repair(&left) => r.map_err(SessionError::Copy)?,
                        e = &mut following.connection => return Err(SessionError::Dataspace(e)),
                    }
                }
                self.clock.end("repair the paths here");
            }
            // Content-addressed originals: Nix finds their outputs through these.
            following.resolver.register_realisations().await?;
            self.clock.end("register the realisations");
            for root in &self.roots {
                let outputs = following.resolver.realised(root.as_str());
                if !outputs.is_empty() {
                    realised.insert(root.clone(), outputs);
                }
            }
        }
        // Leave the dataspace: the demands go.
        self.following = None;
        let outputs = self
            .roots
            .iter()
            .map(|root| {
                let outputs = match self.steps.get(root) {
                    Some(Some(StepOutcome::Built { outputs })) => outputs.clone(),
                    _ => self.plan.known_outputs(root.as_str()),
                };
                (root.clone(), outputs)
            })
            .collect();
        let unschedulable = match self.stuck {
            true => self
                .unschedulable
                .into_iter()
                .map(|(d, (reason, _))| (d, reason))
                .collect(),
            false => BTreeMap::new(),
        };
        Ok(Report {
            outcomes: self
                .steps
                .into_iter()
                .filter_map(|(d, s)| Some((d, s?)))
                .collect(),
            tails: self.tails,
            unschedulable,
            outputs,
            realised,
            started: self.started,
            stopped: SystemTime::now(),
        })
    }
}

/// The paths of `wanted` that are not valid in the local store (read from its database, else
/// asked of its daemon); all of them if neither can say.
pub(crate) async fn missing_here(
    wanted: &[String],
    db: Option<&StoreDb>,
    pool: &DaemonPool,
) -> Vec<String> {
    let store = pool.store_dir();
    let parsed: Result<Vec<StorePath>, _> = wanted.iter().map(|p| store.parse(p)).collect();
    let Ok(parsed) = parsed else {
        return wanted.to_vec();
    };
    match valid_paths(&parsed.iter().cloned().collect(), db, pool).await {
        Ok(valid) => wanted
            .iter()
            .zip(&parsed)
            .filter(|(_, p)| !valid.contains(p))
            .map(|(w, _)| w.clone())
            .collect(),
        Err(_) => wanted.to_vec(),
    }
}
