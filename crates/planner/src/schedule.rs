//! The step table and its transitions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixspace_protocol::{BuildSettings, DrvPath, WorkerId};

use crate::matching::{mismatch, unschedulable_reason};
use crate::resolution::ToResolve;

mod critical_path;
mod dispatch;
mod rejoin;
mod resolving;
mod stealing;

pub use critical_path::{Progress, Tally};
pub use stealing::StealPolicy;

/// How many times a step is tried before a transient failure becomes final.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The first retry delay after a transient failure; it doubles per attempt.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// The longest retry delay.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

/// What the planner knows about a step without reading its derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInfo {
    /// The platform the step must build on, e.g. `x86_64-linux` (one copy shared by the
    /// steps that came in together).
    pub system: Arc<str>,
    /// Features a worker must offer (`requiredSystemFeatures`).
    pub features: Vec<String>,
    /// The derivations whose outputs this step needs.
    pub input_drvs: Vec<DrvPath>,
    /// How its build runs: the stricter of its demands' settings.
    pub settings: BuildSettings,
    /// The outputs it must produce, in output-name order: `name=path`, or `name=` when the
    /// path is known only once built (see [`nixspace_protocol::expected_outputs`]).
    pub outputs: Vec<String>,
    /// The memory its build is predicted to need, in bytes: as its derivation states it,
    /// else as the planner learned it from earlier builds (`None`: not known, so not counted).
    pub memory: Option<u64>,
    /// How long its build is predicted to take, in milliseconds, as the planner learned it
    /// from earlier builds (`None`: not known).
    pub duration_ms: Option<u64>,
    /// Where its derivation comes from, and whether the planner resolves it first.
    pub derivation: StepDerivation,
}

/// Where the worker building a step gets its derivation, and whether the planner resolves the
/// step first.
#[derive(Debug, Clone, Default)]
pub enum StepDerivation {
    /// From the stores in the dataspace (the demander's, usually).
    #[default]
    InStores,
    /// The planner resolves the step once its inputs are built, and builds the resolved
    /// derivation in its place (see [`crate::resolution`]).
    ToResolve(Arc<ToResolve>),
    /// A derivation the planner resolved: its text goes to the worker with the assignment.
    Resolved(Arc<Vec<u8>>),
}

impl PartialEq for StepDerivation {
    fn eq(&self, other: &StepDerivation) -> bool {
        match (self, other) {
            (StepDerivation::InStores, StepDerivation::InStores) => true,
            (StepDerivation::ToResolve(a), StepDerivation::ToResolve(b)) => Arc::ptr_eq(a, b),
            (StepDerivation::Resolved(a), StepDerivation::Resolved(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for StepDerivation {}

/// How urgent a step is: higher priority first, then deeper (more demanded
/// steps wait on it), then older.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Urgency {
    /// The highest priority of the demands that want the step.
    pub priority: i64,
    /// The longest chain of demanded steps waiting on it.
    pub depth: u64,
}

/// What a connected worker can build.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOffer {
    /// Platforms it builds for.
    pub systems: Vec<String>,
    /// Features it offers.
    pub features: Vec<String>,
    /// Its speed relative to a reference machine (1.0).
    pub speed: f64,
    /// How many steps it builds at once.
    pub max_jobs: u32,
    /// How many more it keeps waiting, each started the moment one of its builds ends.
    pub hold: u32,
    /// The memory and CPUs it offers its builds.
    pub resources: Resources,
}

impl WorkerOffer {
    /// How many steps it may be given at once: those it builds and those it holds.
    pub fn capacity(&self) -> usize {
        self.max_jobs as usize + self.hold as usize
    }

    /// Whether the worker builds for the step's system with the features it requires.
    pub fn builds(&self, info: &StepInfo) -> bool {
        mismatch(&self.systems, &self.features, &info.system, &info.features).is_none()
    }
}

/// What a worker offers its builds besides slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// The bytes its builds may use together (0: not said, so not counted).
    pub memory: u64,
    /// The most bytes one build may use there (its per-build limit; 0: none but `memory`).
    pub build_memory: u64,
    /// Its CPUs.
    pub cpus: u32,
}

impl Resources {
    /// Whether one build may use more than `limit` bytes on the worker (not when it says
    /// nothing).
    pub fn allows_more_than(&self, limit: u64) -> bool {
        self.one_build().is_some_and(|one| one > limit)
    }

    /// The most memory one build may use on the worker (`None`: not said).
    pub fn one_build(&self) -> Option<u64> {
        match (self.memory, self.build_memory) {
            (0, 0) => None,
            (0, one) | (one, 0) => Some(one),
            (all, one) => Some(all.min(one)),
        }
    }
}

/// Whether a failure is worth retrying elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The worker or its link went away: retry elsewhere.
    Transient,
    /// The builder failed: do not retry.
    Permanent,
}

/// What made a step fail (`FailureCause` in `schemas/build.prs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// Its own build failed (the builder exited non-zero, …).
    Build,
    /// This input derivation failed, so the step was not built.
    Dependency(DrvPath),
    /// Something around the build failed: the worker was lost, a transfer failed, the
    /// planner gave up retrying.
    Infrastructure,
    /// The kernel killed its build for going over the memory one build may use on its
    /// worker, `limit` bytes.
    OutOfMemory {
        /// That limit.
        limit: u64,
    },
}

/// Where a step is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    /// Some input step has not been built yet.
    Waiting,
    /// All inputs are built; waiting for a worker to claim it.
    Ready,
    /// A worker was granted the step and is building it.
    Assigned(WorkerId),
    /// A transient failure happened; the step is ready again after a delay.
    Retrying,
    /// Its inputs are built and the planner resolves it (see [`StepDerivation::ToResolve`]).
    Resolving,
    /// Resolved: the derivation `to` is built in its place.
    Resolved {
        /// The resolved derivation.
        to: DrvPath,
    },
    /// Outputs are valid.
    Built {
        /// The worker that built it.
        worker: WorkerId,
        /// Output store paths.
        outputs: Vec<String>,
    },
    /// The step will not be built (boxed: few steps fail, and every step's state is as large
    /// as its largest kind).
    Failed(Box<StepFailure>),
}

/// Why a step will not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// The worker that reported it (none when the planner decided).
    pub worker: Option<WorkerId>,
    /// Human-readable cause.
    pub reason: String,
    /// What made it fail.
    pub cause: FailureCause,
}

/// Something the planner actor must publish, withdraw or schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The step waits in the ready queue for a worker with room (counted in `<queue>` and
    /// `<queued>` on the tick, and by the service as it goes; [`Schedule::waited`] says how
    /// long it waited once it is assigned).
    Ready {
        /// The step.
        drv: DrvPath,
    },
    /// The step left the ready queue without being given to a worker.
    Unready {
        /// The step.
        drv: DrvPath,
    },
    /// Assert that no connected worker can take the ready step, and why.
    Unschedulable {
        /// The step.
        drv: DrvPath,
        /// Why no worker can take it.
        reason: String,
    },
    /// Withdraw the step's unschedulable assertion.
    Schedulable {
        /// The step.
        drv: DrvPath,
    },
    /// Assert that `worker` is building the step.
    Assign {
        /// The step.
        drv: DrvPath,
        /// The worker given it.
        worker: WorkerId,
    },
    /// Withdraw the step's assignment (the worker must stop building it).
    Unassign {
        /// The step.
        drv: DrvPath,
    },
    /// Withdraw the step's assignment because nobody wants the step any more.
    Cancel {
        /// The step.
        drv: DrvPath,
    },
    /// The attempt failed transiently; call [`Schedule::retry`] for the step after `delay`.
    RetryAfter {
        /// The step.
        drv: DrvPath,
        /// The worker whose attempt failed.
        worker: WorkerId,
        /// How long to wait.
        delay: Duration,
        /// Why the attempt failed, in words.
        reason: String,
        /// What made it fail.
        cause: FailureCause,
    },
    /// Assert the step's successful outcome.
    Built {
        /// The step.
        drv: DrvPath,
        /// Who built it.
        worker: WorkerId,
        /// Its outputs.
        outputs: Vec<String>,
    },
    /// Assert that the step failed for good.
    Failed {
        /// The step.
        drv: DrvPath,
        /// Who reported it (none when the planner decided).
        worker: Option<WorkerId>,
        /// Why, in words.
        reason: String,
        /// What made it fail.
        cause: FailureCause,
    },
    /// Withdraw any outcome assertion of the step (nobody wants it any more).
    Forget {
        /// The step.
        drv: DrvPath,
    },
    /// Resolve the step now (see [`Schedule::to_resolve`]), then report with
    /// [`Schedule::resolved`] or [`Schedule::cannot_resolve`].
    Resolve {
        /// The step.
        drv: DrvPath,
    },
    /// Record and announce that the original `from` was resolved to `to`.
    Linked {
        /// The original.
        from: DrvPath,
        /// The resolved derivation built in its place.
        to: DrvPath,
        /// Its platform.
        system: String,
    },
    /// Withdraw the announcement that `from` was resolved.
    Unlinked {
        /// The original.
        from: DrvPath,
    },
    /// Invite an idle, faster worker to duplicate a step running on another.
    OfferSteal {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        from: WorkerId,
        /// The worker invited.
        to: WorkerId,
    },
    /// Withdraw the step's steal invitation.
    WithdrawSteal {
        /// The step.
        drv: DrvPath,
    },
    /// Assert that the thief also builds the step: the first to finish wins.
    Stolen {
        /// The step.
        drv: DrvPath,
        /// The worker that accepted the invitation.
        thief: WorkerId,
    },
    /// Withdraw the thief's assignment (it failed or left; the first worker goes on).
    Unsteal {
        /// The step.
        drv: DrvPath,
    },
    /// The first worker failed or left: the thief's assignment becomes the step's only one.
    Promote {
        /// The step.
        drv: DrvPath,
    },
    /// The step kept for `worker` after a restart was not demanded again while it was kept:
    /// the attempt the coordinator left open on it ends, as nobody wants the step.
    Abandoned {
        /// The step.
        drv: DrvPath,
        /// The worker it was kept for.
        worker: WorkerId,
    },
}

#[derive(Debug)]
struct Step {
    info: StepInfo,
    urgency: Urgency,
    demands: u32,
    state: StepState,
    attempts: u32,
    /// When it became ready, while it is ready; when its current assignment was granted, while
    /// it is assigned.
    since: Option<Instant>,
    /// How long it waited ready before its current assignment, in microseconds (at most
    /// `u32::MAX`).
    waited_us: u32,
    /// How many of `info.input_drvs`, from the first, are known built (or not demanded):
    /// settling resumes there, so a step with many inputs is not rescanned from the start
    /// each time one of them is built. Reset when an input stops being built.
    inputs_built: usize,
    /// Where the step sits in the ready queue, while it is ready.
    queued: Option<dispatch::TakeOrder>,
    /// What few steps have (failures, exclusions, a steal): boxed on first use.
    extras: Option<Box<StepExtras>>,
    /// How long the longest path of demanded steps from it up to a root is predicted to take,
    /// its own build included (see [`critical_path`]).
    remaining_ms: u64,
    /// How many of its dependents [`Schedule::update_critical_paths`] has still to reach
    /// before it (meaningful only while that runs).
    dependents_left: u32,
}

/// What few of a step's lives need: earlier transient failures, workers it is not given to, a
/// steal in progress. Kept apart from [`Step`] and made on first use, so a step built by the
/// first worker it is given carries one pointer for all of it.
#[derive(Debug, Default)]
struct StepExtras {
    /// The reasons of its transient failures so far, for the message if it fails for good.
    transient_reasons: Vec<String>,
    /// The worker invited to steal the step, until it claims it.
    steal_offer: Option<WorkerId>,
    /// The worker duplicating the step's build.
    thief: Option<WorkerId>,
    /// Workers whose report on this step was rejected, or that were killed for memory
    /// building it: never given it again.
    excluded: BTreeSet<WorkerId>,
    /// The memory limit its build was killed for going over, once: it is tried again only
    /// on a worker that allows one build more, and fails for good if killed again.
    needs_more_than: Option<u64>,
}

/// The extras of a step that has none.
static NO_EXTRAS: StepExtras = StepExtras {
    transient_reasons: Vec::new(),
    steal_offer: None,
    thief: None,
    excluded: BTreeSet::new(),
    needs_more_than: None,
};

impl Step {
    /// Its extras (the empty ones if it has none).
    fn extras(&self) -> &StepExtras {
        self.extras.as_deref().unwrap_or(&NO_EXTRAS)
    }

    /// Its extras, made for it if it has none.
    fn extras_mut(&mut self) -> &mut StepExtras {
        self.extras.get_or_insert_default()
    }

    /// Nobody is invited to steal it or duplicates its build any more.
    fn end_steal(&mut self) {
        if let Some(extras) = &mut self.extras {
            extras.steal_offer = None;
            extras.thief = None;
        }
    }
}

/// The planner's table of demanded steps and connected workers.
#[derive(Debug)]
pub struct Schedule {
    /// Each step boxed: the table's nodes then hold a pointer per step, not the whole step
    /// (half of a node's room is empty after inserts in order, as a large build's are).
    steps: BTreeMap<DrvPath, Box<Step>>,
    /// input drv → steps that list it as an input.
    dependents: BTreeMap<DrvPath, BTreeSet<DrvPath>>,
    workers: BTreeMap<WorkerId, WorkerOffer>,
    /// Free build slots each worker announced.
    free_slots: BTreeMap<WorkerId, i64>,
    /// The steps each worker is building (assigned to it, or duplicated by it as a thief).
    running: BTreeMap<WorkerId, BTreeSet<DrvPath>>,
    /// The workers that may be given a step now: connected, offering free slots and given
    /// fewer steps than their [`capacity`](WorkerOffer::capacity) (kept by [`reopen`](Schedule::reopen), so dispatch
    /// looks at these instead of every worker of a busy farm), each with its place in
    /// `open_order`.
    open: BTreeMap<WorkerId, dispatch::OpenWorker>,
    /// The open workers in the order dispatch prefers them, inputs aside: fastest, then
    /// the most room, then by name.
    open_order: BTreeSet<dispatch::OpenWorker>,
    /// Ready steps in take order (see [`dispatch`](Schedule::dispatch)).
    ready_queue: BTreeMap<dispatch::TakeOrder, DrvPath>,
    /// How many steps have been queued (the age in the take order).
    queued_count: u64,
    /// How many steps wait in the ready queue, per system.
    queue_by_system: BTreeMap<Arc<str>, usize>,
    /// Claims on steps not ready (yet): a worker that built a step while the planner was
    /// away claims it again on rejoining, and gets it as soon as it is ready.
    early_claims: BTreeMap<DrvPath, BTreeSet<WorkerId>>,
    /// Steps kept for the worker they were assigned to before a restart, until when.
    reserved: BTreeMap<DrvPath, (WorkerId, Instant)>,
    steal: StealPolicy,
    /// Ready steps no connected worker can take.
    unschedulable: BTreeSet<DrvPath>,
    max_attempts: u32,
    retry_backoff: Duration,
    /// Each resolved original's resolution.
    links: BTreeMap<DrvPath, resolving::Link>,
    /// Each resolved derivation's originals.
    resolutions: BTreeMap<DrvPath, BTreeSet<DrvPath>>,
    /// Whether demands changed since the remaining paths were last computed.
    paths_stale: bool,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new(DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BACKOFF)
    }
}

impl Schedule {
    /// An empty schedule that tries each step at most `max_attempts` times,
    /// waiting `retry_backoff` (doubling per attempt) after a transient failure.
    pub fn new(max_attempts: u32, retry_backoff: Duration) -> Schedule {
        Schedule {
            steps: BTreeMap::new(),
            dependents: BTreeMap::new(),
            workers: BTreeMap::new(),
            free_slots: BTreeMap::new(),
            running: BTreeMap::new(),
            open: BTreeMap::new(),
            open_order: BTreeSet::new(),
            ready_queue: BTreeMap::new(),
            queued_count: 0,
            queue_by_system: BTreeMap::new(),
            early_claims: BTreeMap::new(),
            reserved: BTreeMap::new(),
            steal: StealPolicy::default(),
            unschedulable: BTreeSet::new(),
            max_attempts: max_attempts.max(1),
            retry_backoff,
            links: BTreeMap::new(),
            resolutions: BTreeMap::new(),
            paths_stale: false,
        }
    }

    /// The same schedule, stealing by `policy`.
    pub fn with_stealing(mut self, policy: StealPolicy) -> Schedule {
        self.steal = policy;
        self
    }

    /// The state of a step, if it is demanded.
    pub fn state(&self, drv: &DrvPath) -> Option<&StepState> {
        self.steps.get(drv).map(|s| &s.state)
    }

    /// What the planner knows about a demanded step.
    pub fn info(&self, drv: &DrvPath) -> Option<&StepInfo> {
        self.steps.get(drv).map(|s| &s.info)
    }

    /// Whether `worker` is building `drv` for the planner: the step is assigned to it, or it
    /// steals it. Only such a worker's reports count.
    pub fn is_building(&self, drv: &DrvPath, worker: &WorkerId) -> bool {
        self.steps.get(drv).is_some_and(|step| {
            matches!(&step.state, StepState::Assigned(w) if w == worker)
                || step.extras().thief.as_ref() == Some(worker)
        })
    }

    /// Whether `worker`'s report on `drv` was rejected (it is not given the step again).
    pub(crate) fn is_excluded(&self, drv: &DrvPath, worker: &WorkerId) -> bool {
        self.steps
            .get(drv)
            .is_some_and(|step| step.extras().excluded.contains(worker))
    }

    /// How long `drv` waited in the ready queue before its current assignment (none if it is
    /// not demanded).
    pub fn waited(&self, drv: &DrvPath) -> Duration {
        self.steps.get(drv).map_or(Duration::ZERO, |step| {
            Duration::from_micros(step.waited_us.into())
        })
    }

    /// The settings a step's build runs with (the default if it is not demanded).
    pub fn settings(&self, drv: &DrvPath) -> BuildSettings {
        self.steps
            .get(drv)
            .map(|s| s.info.settings)
            .unwrap_or_default()
    }

    /// How many steps are demanded.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether no step is demanded.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The copy of `drv`'s name the table keeps already, as a step's or as an input's of
    /// one: a step is named by its own demand and by each of its dependents', and each name
    /// is kept once.
    pub fn shared_name(&self, drv: &DrvPath) -> Option<DrvPath> {
        let step = self.steps.get_key_value(drv).map(|(name, _)| name);
        step.or_else(|| self.dependents.get_key_value(drv).map(|(name, _)| name))
            .cloned()
    }

    /// A frontend demands `drv`.
    pub fn demand(&mut self, drv: &DrvPath, mut info: StepInfo, urgency: Urgency) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(step) = self.steps.get_mut(drv) {
            step.demands = step.demands.saturating_add(1);
            // A step given to a worker already keeps the settings it was given.
            step.info.settings = step.info.settings.stricter(info.settings);
            let raised = Urgency {
                priority: step.urgency.priority.max(urgency.priority),
                depth: step.urgency.depth.max(urgency.depth),
            };
            if raised != step.urgency {
                step.urgency = raised;
                if step.state == StepState::Ready {
                    self.queue(drv);
                }
            }
            return effects;
        }
        for input in &mut info.input_drvs {
            if let Some(shared) = self.shared_name(input) {
                *input = shared;
            }
        }
        let drv = &self.shared_name(drv).unwrap_or_else(|| drv.clone());
        for input in &info.input_drvs {
            self.dependents
                .entry(input.clone())
                .or_default()
                .insert(drv.clone());
        }
        self.paths_stale = true;
        let remaining_ms = critical_path::first_guess(&info, urgency);
        self.steps.insert(
            drv.clone(),
            Box::new(Step {
                info,
                urgency,
                demands: 1,
                state: StepState::Waiting,
                attempts: 0,
                since: None,
                waited_us: 0,
                inputs_built: 0,
                queued: None,
                extras: None,
                remaining_ms,
                dependents_left: 0,
            }),
        );
        // Dependents that were ready because this input was not demanded
        // (and so taken to be valid) must wait for it after all.
        for dependent in self.dependents_of(drv) {
            self.input_unbuilt(&dependent);
            if self.state(&dependent) == Some(&StepState::Ready) {
                self.leave_ready(&dependent, StepState::Waiting, &mut effects);
            }
        }
        self.settle(drv, &mut effects);
        effects
    }

    /// A frontend withdrew its demand for `drv`.
    pub fn undemand(&mut self, drv: &DrvPath) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        step.demands -= 1;
        if step.demands > 0 {
            return effects;
        }
        if step.state == StepState::Ready {
            self.leave_ready(drv, StepState::Waiting, &mut effects);
        }
        self.vacate(drv);
        let Some(step) = self.steps.remove(drv) else {
            return effects;
        };
        self.paths_stale = true;
        for input in &step.info.input_drvs {
            if let Some(d) = self.dependents.get_mut(input) {
                d.remove(drv);
                if d.is_empty() {
                    self.dependents.remove(input);
                }
            }
        }
        match step.state {
            StepState::Assigned(_) => effects.push(Effect::Cancel { drv: drv.clone() }),
            StepState::Built { .. } | StepState::Failed { .. } => {
                effects.push(Effect::Forget { drv: drv.clone() })
            }
            StepState::Waiting
            | StepState::Ready
            | StepState::Retrying
            | StepState::Resolving
            | StepState::Resolved { .. } => {}
        }
        // Its resolution is not wanted for it any more.
        self.unlink(drv, &mut effects);
        effects
    }

    /// A worker connected (or changed what it offers).
    pub fn worker_joined(&mut self, id: &WorkerId, offer: WorkerOffer) -> Vec<Effect> {
        self.workers.insert(id.clone(), offer);
        self.reopen(id);
        self.recheck_schedulability()
    }

    /// A worker disconnected. Steps it was building (given to it, whether or not it claimed
    /// them) failed transiently.
    pub fn worker_left(&mut self, id: &WorkerId) -> Vec<Effect> {
        self.workers.remove(id);
        self.free_slots.remove(id);
        self.reopen(id);
        let mut effects = self.lose_running(id, "left");
        effects.extend(self.recheck_schedulability());
        effects
    }

    /// Another process joined as worker `id` while the old one's connection was not yet
    /// noticed gone: the steps the old one was building failed transiently. The worker stays
    /// (its offer is the new process's).
    pub fn worker_restarted(&mut self, id: &WorkerId) -> Vec<Effect> {
        self.lose_running(id, "restarted")
    }

    /// The steps worker `id` was building failed transiently: it `went` (left, restarted).
    fn lose_running(&mut self, id: &WorkerId, went: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        let running = self.running.get(id).cloned().unwrap_or_default();
        for drv in running {
            let reason = format!("worker {id} {went} while building");
            effects.extend(self.failed(
                &drv,
                Some(id),
                &reason,
                FailureKind::Transient,
                FailureCause::Infrastructure,
            ));
        }
        effects
    }

    /// `worker` asks to build `drv`. Granted when the step is ready.
    pub fn claim(&mut self, drv: &DrvPath, worker: &WorkerId) -> Vec<Effect> {
        let mut effects = Vec::new();
        match self.state(drv) {
            _ if self.is_excluded(drv, worker) => return effects,
            Some(StepState::Ready) if self.kept_from(drv, worker, Instant::now()) => {
                self.early_claims
                    .entry(drv.clone())
                    .or_default()
                    .insert(worker.clone());
                return effects;
            }
            Some(StepState::Ready) => {}
            None | Some(StepState::Waiting) | Some(StepState::Retrying) => {
                self.early_claims
                    .entry(drv.clone())
                    .or_default()
                    .insert(worker.clone());
                return effects;
            }
            Some(_) => return self.claim_steal(drv, worker),
        }
        self.grant(drv, worker, &mut effects);
        effects
    }

    /// `worker` withdrew its claim on `drv`. If it was building the step and
    /// reported no outcome, the worker was lost: a transient failure.
    pub fn unclaim(&mut self, drv: &DrvPath, worker: &WorkerId) -> Vec<Effect> {
        if let Some(claims) = self.early_claims.get_mut(drv) {
            claims.remove(worker);
            if claims.is_empty() {
                self.early_claims.remove(drv);
            }
        }
        if let Some(effects) = self.thief_gone(drv, worker) {
            return effects;
        }
        match self.state(drv) {
            Some(StepState::Assigned(w)) if w == worker => {
                let reason = format!("worker {worker} went away while building");
                self.failed(
                    drv,
                    Some(worker),
                    &reason,
                    FailureKind::Transient,
                    FailureCause::Infrastructure,
                )
            }
            _ => Vec::new(),
        }
    }

    /// The retry delay of a transiently failed step is over: it is ready again once its
    /// inputs are built (one may have to be built again, see [`Schedule::lost`]).
    pub fn retry(&mut self, drv: &DrvPath) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some(step) = self.steps.get_mut(drv) {
            if step.state == StepState::Retrying {
                step.state = StepState::Waiting;
                self.settle(drv, &mut effects);
            }
        }
        effects
    }

    /// No store in the dataspace has `path` any more (the only one that had it left): the
    /// built step with that output is built again, and its dependents wait for it. Returns
    /// that step (if one is demanded and built) and what to publish.
    pub fn lost(&mut self, path: &str) -> (Option<DrvPath>, Vec<Effect>) {
        let mut effects = Vec::new();
        // The step that built it, not an original resolved to that step.
        let links = &self.links;
        let made_it = self.steps.iter_mut().find(|(d, s)| {
            !links.contains_key(*d)
                && matches!(&s.state, StepState::Built { outputs, .. } if outputs.iter().any(|o| o == path))
        });
        let Some((drv, step)) = made_it else {
            return (None, effects);
        };
        let drv = drv.clone();
        step.state = StepState::Waiting;
        step.attempts = 0;
        if let Some(extras) = &mut step.extras {
            extras.transient_reasons.clear();
        }
        step.inputs_built = 0;
        // The originals resolved to it wait for it again.
        let mut unbuilt = vec![drv.clone()];
        for from in self.originals_of(&drv) {
            if let Some(step) = self.steps.get_mut(&from) {
                if matches!(step.state, StepState::Built { .. }) {
                    step.state = StepState::Resolved { to: drv.clone() };
                    unbuilt.push(from);
                }
            }
        }
        for gone in &unbuilt {
            effects.push(Effect::Forget { drv: gone.clone() });
        }
        let dependents: Vec<DrvPath> = unbuilt.iter().flat_map(|d| self.dependents_of(d)).collect();
        for dependent in dependents {
            self.input_unbuilt(&dependent);
            match self.state(&dependent) {
                Some(StepState::Ready) => {
                    self.leave_ready(&dependent, StepState::Waiting, &mut effects)
                }
                Some(StepState::Retrying) => {
                    if let Some(d) = self.steps.get_mut(&dependent) {
                        d.state = StepState::Waiting;
                    }
                }
                _ => {}
            }
        }
        self.settle(&drv, &mut effects);
        (Some(drv), effects)
    }

    /// `worker` built `drv`. Only the worker the step is assigned to (or the
    /// worker stealing it) can complete it: a report from anyone else, or for
    /// a step that is not being built, is ignored.
    pub fn built(&mut self, drv: &DrvPath, worker: &WorkerId, outputs: Vec<String>) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        match &step.state {
            StepState::Assigned(w)
                if w == worker || step.extras().thief.as_ref() == Some(worker) => {}
            _ => return effects,
        }
        self.vacate(drv);
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        step.state = StepState::Built {
            worker: worker.clone(),
            outputs: outputs.clone(),
        };
        step.end_steal();
        effects.push(Effect::Unassign { drv: drv.clone() });
        self.announce_built(drv, worker, outputs, &mut effects);
        effects
    }

    /// Say that `drv`, now in the state `Built`, was built by `worker` with `outputs`, and
    /// settle what waited on it (see [`Schedule::mark_built`]).
    fn announce_built(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        outputs: Vec<String>,
        effects: &mut Vec<Effect>,
    ) {
        effects.push(Effect::Built {
            drv: drv.clone(),
            worker: worker.clone(),
            outputs: outputs.clone(),
        });
        self.mark_built(drv, worker, &outputs, effects);
    }

    /// The planner discarded `worker`'s report on `drv` (see [`nixspace_protocol::expected_outputs`]):
    /// the attempt counts as a transient failure, and the step is never given to `worker`
    /// again, so it is built by another worker (or, with none, waits; after the last attempt
    /// it fails with `reason`).
    pub fn rejected(&mut self, drv: &DrvPath, worker: &WorkerId, reason: &str) -> Vec<Effect> {
        if !self.is_building(drv, worker) {
            return Vec::new();
        }
        if let Some(step) = self.steps.get_mut(drv) {
            step.extras_mut().excluded.insert(worker.clone());
        }
        self.failed(
            drv,
            Some(worker),
            reason,
            FailureKind::Transient,
            FailureCause::Infrastructure,
        )
    }

    /// `worker` could not build `drv` (`None`: a report made for no worker). A transient
    /// failure given up on keeps its last attempt's cause.
    pub fn failed(
        &mut self,
        drv: &DrvPath,
        worker: Option<&WorkerId>,
        reason: &str,
        kind: FailureKind,
        cause: FailureCause,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let (max_attempts, base) = (self.max_attempts, self.retry_backoff);
        let Some(worker) = worker else {
            return effects;
        };
        if kind == FailureKind::Transient {
            if let Some(effects) = self.thief_gone(drv, worker) {
                return effects;
            }
        }
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        match &step.state {
            StepState::Assigned(w)
                if w == worker || step.extras().thief.as_ref() == Some(worker) => {}
            _ => return effects,
        }
        self.vacate(drv);
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        step.end_steal();
        effects.push(Effect::Unassign { drv: drv.clone() });
        if kind == FailureKind::Permanent {
            self.fail_for_good(drv, Some(worker), reason.to_owned(), cause, &mut effects);
            return effects;
        }
        if let FailureCause::OutOfMemory { limit } = cause {
            if let Some(why) = self.killed_for_memory(drv, worker, limit) {
                let reason = format!("{reason}; {why}");
                self.fail_for_good(drv, Some(worker), reason, cause, &mut effects);
                return effects;
            }
        }
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        let failure = format!("attempt {}: {reason}", step.attempts);
        step.extras_mut().transient_reasons.push(failure);
        if step.attempts < max_attempts {
            step.state = StepState::Retrying;
            let delay = base
                .saturating_mul(1 << (step.attempts - 1).min(16))
                .min(MAX_RETRY_BACKOFF);
            effects.push(Effect::RetryAfter {
                drv: drv.clone(),
                worker: worker.clone(),
                delay,
                reason: reason.to_owned(),
                cause,
            });
            return effects;
        }
        let reason = format!(
            "gave up after {} attempts: {}",
            step.attempts,
            step.extras().transient_reasons.join("; ")
        );
        self.fail_for_good(drv, Some(worker), reason, cause, &mut effects);
        effects
    }

    /// `worker`'s build of `drv` was killed for going over `limit`, the memory one build may
    /// use there. The first time, the step is kept for a worker that allows one build more
    /// (and never given to `worker` again), predicted to need at least `limit`; `None` then.
    /// Otherwise (killed again, or no connected worker that may build it allows more) why it
    /// fails for good.
    fn killed_for_memory(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        limit: u64,
    ) -> Option<String> {
        let step = self.steps.get(drv)?;
        if let Some(before) = step.extras().needs_more_than {
            return Some(format!(
                "killed again after a retry on a worker allowing one build more than {} MiB",
                before >> 20
            ));
        }
        let bigger = self.workers.iter().any(|(id, offer)| {
            id != worker
                && !step.extras().excluded.contains(id)
                && offer.builds(&step.info)
                && offer.resources.allows_more_than(limit)
        });
        if !bigger {
            return Some(format!(
                "no connected worker allows one build more than {} MiB",
                limit >> 20
            ));
        }
        let step = self.steps.get_mut(drv)?;
        let extras = step.extras_mut();
        extras.needs_more_than = Some(limit);
        extras.excluded.insert(worker.clone());
        step.info.memory = Some(step.info.memory.unwrap_or(0).max(limit));
        None
    }

    /// `drv` will not be built, and neither will the steps that need it. A worklist, not a
    /// recursion: a chain's length comes from input, and each step above the base is failed
    /// in the same depth-first order (a step before the steps that need it).
    fn fail_for_good(
        &mut self,
        drv: &DrvPath,
        worker: Option<&WorkerId>,
        reason: String,
        cause: FailureCause,
        effects: &mut Vec<Effect>,
    ) {
        let mut pending = vec![(drv.clone(), worker.cloned(), reason, cause)];
        while let Some((drv, worker, reason, cause)) = pending.pop() {
            let failed = StepState::Failed(Box::new(StepFailure {
                worker: worker.clone(),
                reason: reason.clone(),
                cause: cause.clone(),
            }));
            match self.state(&drv) {
                None | Some(StepState::Built { .. }) | Some(StepState::Failed { .. }) => continue,
                Some(StepState::Ready) => self.leave_ready(&drv, failed.clone(), effects),
                Some(_) => {}
            }
            if let Some(step) = self.steps.get_mut(&drv) {
                step.state = failed;
            }
            // The originals resolved to it fail as it did.
            for from in self.originals_of(&drv) {
                pending.push((from, worker.clone(), reason.clone(), cause.clone()));
            }
            // Reversed, so that the first dependent is failed (with all above it) first.
            for dependent in self.dependents_of(&drv).into_iter().rev() {
                let why = format!("dependency {drv} failed");
                let cause = FailureCause::Dependency(drv.clone());
                pending.push((dependent, None, why, cause));
            }
            effects.push(Effect::Failed {
                drv,
                worker,
                reason,
                cause,
            });
        }
    }

    fn dependents_of(&self, drv: &DrvPath) -> Vec<DrvPath> {
        self.dependents
            .get(drv)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Re-evaluate a waiting step: ready if every demanded input is built,
    /// failed if one failed.
    fn settle(&mut self, drv: &DrvPath, effects: &mut Vec<Effect>) {
        let Some(step) = self.steps.get(drv) else {
            return;
        };
        if step.state != StepState::Waiting {
            return;
        }
        // Inputs only become built (see `input_unbuilt` for the exceptions), so the scan
        // resumes where the last one stopped. A failed input found on the way fails the step;
        // one failing later fails it through `fail_for_good`.
        let inputs = &step.info.input_drvs;
        let mut built = step.inputs_built;
        let mut failed_input = None;
        while let Some(input) = inputs.get(built) {
            match self.steps.get(input).map(|s| &s.state) {
                None | Some(StepState::Built { .. }) => built += 1,
                Some(StepState::Failed { .. }) => {
                    failed_input = Some(input.clone());
                    break;
                }
                Some(_) => break,
            }
        }
        let all_built = built == inputs.len();
        if let Some(step) = self.steps.get_mut(drv) {
            step.inputs_built = built;
        }
        if let Some(input) = failed_input {
            let why = format!("dependency {input} failed");
            self.fail_for_good(drv, None, why, FailureCause::Dependency(input), effects);
        } else if all_built {
            self.enter_ready(drv, effects);
        }
    }

    /// An input of `drv` is no longer built (demanded late, or its outputs lost): settling
    /// `drv` scans its inputs from the first again.
    fn input_unbuilt(&mut self, drv: &DrvPath) {
        if let Some(step) = self.steps.get_mut(drv) {
            step.inputs_built = 0;
        }
    }

    /// Make a step ready, noting whether any worker can take it; a connected worker that
    /// claimed it early gets it at once.
    fn enter_ready(&mut self, drv: &DrvPath, effects: &mut Vec<Effect>) {
        if let Some(step) = self.steps.get_mut(drv) {
            if matches!(step.info.derivation, StepDerivation::ToResolve(_)) {
                step.state = StepState::Resolving;
                effects.push(Effect::Resolve { drv: drv.clone() });
                return;
            }
        }
        let now = Instant::now();
        let claims = self.early_claims.remove(drv).unwrap_or_default();
        let connected = |w: &WorkerId| self.workers.contains_key(w);
        let early = claims
            .iter()
            .find(|w| connected(w) && !self.kept_from(drv, w, now))
            .cloned();
        if early.is_none() {
            // Claims waiting for the step's keeper to come back.
            let waiting: BTreeSet<WorkerId> = claims.into_iter().filter(connected).collect();
            if !waiting.is_empty() {
                self.early_claims.insert(drv.clone(), waiting);
            }
        }
        let Some(step) = self.steps.get_mut(drv) else {
            return;
        };
        step.state = StepState::Ready;
        step.since = Some(now);
        effects.push(Effect::Ready { drv: drv.clone() });
        self.queue(drv);
        if let Some(worker) = early {
            // Granted at once: the readiness is never announced (see `grant`).
            self.grant(drv, &worker, effects);
            return;
        }
        if let Some(reason) = self.unschedulable_because(drv) {
            self.unschedulable.insert(drv.clone());
            effects.push(Effect::Unschedulable {
                drv: drv.clone(),
                reason,
            });
        }
    }

    /// Move a ready step to `next`, withdrawing its readiness.
    fn leave_ready(&mut self, drv: &DrvPath, next: StepState, effects: &mut Vec<Effect>) {
        self.unqueue(drv);
        if let StepState::Assigned(worker) = &next {
            self.occupy(worker, drv);
        }
        if let Some(step) = self.steps.get_mut(drv) {
            step.state = next;
        }
        effects.push(Effect::Unready { drv: drv.clone() });
        if self.unschedulable.remove(drv) {
            effects.push(Effect::Schedulable { drv: drv.clone() });
        }
    }

    /// Why no connected worker can take the step, if none can.
    fn unschedulable_because(&self, drv: &DrvPath) -> Option<String> {
        let step = self.steps.get(drv)?;
        let info = &step.info;
        let mut mismatches = Vec::new();
        let mut too_small = None;
        for offer in self.workers.values() {
            match mismatch(
                &offer.systems,
                &offer.features,
                &info.system,
                &info.features,
            ) {
                None => match step.extras().needs_more_than {
                    Some(limit) if !offer.resources.allows_more_than(limit) => {
                        too_small = Some(limit)
                    }
                    _ => return None,
                },
                Some(m) => mismatches.push(m),
            }
        }
        if let Some(limit) = too_small {
            return Some(format!(
                "killed for going over {} MiB of memory, and no connected worker allows one build more",
                limit >> 20
            ));
        }
        Some(unschedulable_reason(&mismatches, &info.system))
    }

    fn recheck_schedulability(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        let ready: Vec<DrvPath> = self
            .steps
            .iter()
            .filter(|(_, s)| s.state == StepState::Ready)
            .map(|(d, _)| d.clone())
            .collect();
        for drv in ready {
            match self.unschedulable_because(&drv) {
                None => {
                    if self.unschedulable.remove(&drv) {
                        effects.push(Effect::Schedulable { drv });
                    }
                }
                Some(reason) => {
                    if self.unschedulable.insert(drv.clone()) {
                        effects.push(Effect::Unschedulable { drv, reason });
                    }
                }
            }
        }
        effects
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A step for x86_64-linux with these inputs and nothing else.
    pub(crate) fn info(inputs: &[&str]) -> StepInfo {
        StepInfo {
            system: "x86_64-linux".into(),
            features: vec![],
            input_drvs: inputs.iter().map(|s| DrvPath::from(*s)).collect(),
            settings: Default::default(),
            outputs: vec![],
            memory: None,
            duration_ms: None,
            derivation: Default::default(),
        }
    }

    fn readies(effects: &[Effect]) -> Vec<&str> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Ready { drv: d, .. } => Some(d.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn chain_becomes_ready_in_order() {
        let mut s = Schedule::default();
        assert_eq!(
            readies(&s.demand(&"a".into(), info(&[]), Urgency::default())),
            vec!["a"]
        );
        assert!(readies(&s.demand(&"b".into(), info(&["a"]), Urgency::default())).is_empty());
        assert!(readies(&s.demand(
            &"c".into(),
            info(&["b", "valid-elsewhere"]),
            Urgency::default()
        ))
        .is_empty());
        s.claim(&"a".into(), &"w1".into());
        assert_eq!(
            readies(&s.built(&"a".into(), &"w1".into(), vec!["/out/a".into()])),
            vec!["b"]
        );
        s.claim(&"b".into(), &"w2".into());
        assert_eq!(
            readies(&s.built(&"b".into(), &"w2".into(), vec![])),
            vec!["c"]
        );
    }

    #[test]
    fn a_lost_output_is_built_again_before_its_dependent_retries() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.demand(&"b".into(), info(&["a"]), Urgency::default());
        s.claim(&"a".into(), &"w1".into());
        s.built(&"a".into(), &"w1".into(), vec!["/out/a".into()]);
        s.claim(&"b".into(), &"w2".into());
        // w2 finds no store with a's output: a is built again, b waits for it.
        let (made_it, e) = s.lost("/out/a");
        assert_eq!(made_it.as_ref().map(DrvPath::as_str), Some("a"));
        assert!(e.contains(&Effect::Forget { drv: "a".into() }), "{e:?}");
        assert_eq!(readies(&e), vec!["a"]);
        s.failed(
            &"b".into(),
            Some(&"w2".into()),
            "cannot fetch /out/a",
            FailureKind::Transient,
            FailureCause::Infrastructure,
        );
        assert!(readies(&s.retry(&"b".into())).is_empty());
        assert_eq!(s.state(&"b".into()), Some(&StepState::Waiting));
        s.claim(&"a".into(), &"w2".into());
        assert_eq!(
            readies(&s.built(&"a".into(), &"w2".into(), vec!["/out/a".into()])),
            vec!["b"]
        );
        // A path no demanded step made: nothing to rebuild.
        assert_eq!(s.lost("/out/elsewhere"), (None, vec![]));
    }

    #[test]
    fn late_input_demand_makes_a_ready_dependent_wait() {
        let mut s = Schedule::default();
        assert_eq!(
            readies(&s.demand(&"b".into(), info(&["a"]), Urgency::default())),
            vec!["b"]
        );
        let e = s.demand(&"a".into(), info(&[]), Urgency::default());
        assert!(e.contains(&Effect::Unready { drv: "b".into() }), "{e:?}");
        assert_eq!(readies(&e), vec!["a"]);
        assert_eq!(s.state(&"b".into()), Some(&StepState::Waiting));
        s.claim(&"a".into(), &"w1".into());
        assert_eq!(
            readies(&s.built(&"a".into(), &"w1".into(), vec![])),
            vec!["b"]
        );
    }

    #[test]
    fn an_early_claim_is_granted_once_the_step_is_ready() {
        let mut s = Schedule::default();
        s.worker_joined(
            &"w1".into(),
            WorkerOffer {
                systems: vec!["x86_64-linux".into()],
                features: vec![],
                speed: 1.0,
                max_jobs: 1,
                hold: 0,
                resources: Default::default(),
            },
        );
        // The worker rejoined a restarted planner before the frontend demanded again.
        assert!(s.claim(&"a".into(), &"w1".into()).is_empty());
        let e = s.demand(&"a".into(), info(&[]), Urgency::default());
        assert_eq!(
            e,
            vec![Effect::Assign {
                drv: "a".into(),
                worker: "w1".into()
            }]
        );
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("w1".into()))
        );
        // A withdrawn early claim is forgotten.
        assert!(s.claim(&"b".into(), &"w1".into()).is_empty());
        s.unclaim(&"b".into(), &"w1".into());
        assert_eq!(
            readies(&s.demand(&"b".into(), info(&[]), Urgency::default())),
            vec!["b"]
        );
    }

    #[test]
    fn only_one_claim_is_granted() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        let first = s.claim(&"a".into(), &"w1".into());
        assert!(first.contains(&Effect::Assign {
            drv: "a".into(),
            worker: "w1".into()
        }));
        assert!(s.claim(&"a".into(), &"w2".into()).is_empty());
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("w1".into()))
        );
    }

    #[test]
    fn lost_worker_is_retried_then_given_up() {
        let mut s = Schedule::new(2, Duration::from_secs(1));
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.claim(&"a".into(), &"w1".into());
        let e = s.unclaim(&"a".into(), &"w1".into());
        assert!(
            readies(&e).is_empty(),
            "ready only after the back-off: {e:?}"
        );
        assert!(e.contains(&Effect::RetryAfter {
            drv: "a".into(),
            worker: "w1".into(),
            delay: Duration::from_secs(1),
            reason: "worker w1 went away while building".into(),
            cause: FailureCause::Infrastructure
        }));
        assert!(
            s.claim(&"a".into(), &"w2".into()).is_empty(),
            "not claimable while backing off"
        );
        assert_eq!(readies(&s.retry(&"a".into())), vec!["a"]);
        s.claim(&"a".into(), &"w2".into());
        let e = s.unclaim(&"a".into(), &"w2".into());
        let Some(Effect::Failed { reason, cause, .. }) =
            e.iter().find(|e| matches!(e, Effect::Failed { .. }))
        else {
            panic!("expected a failure, got {e:?}");
        };
        assert_eq!(cause, &FailureCause::Infrastructure);
        assert!(reason.contains("gave up after 2 attempts"), "{reason}");
        assert!(reason.contains("w1") && reason.contains("w2"), "{reason}");
    }

    /// Failing the base of a 100,000-step chain fails every step above it, on a thread with
    /// the default 2 MiB stack: the walk over dependents is a worklist, not a recursion (which
    /// overflowed the stack and aborted `nixspace up`).
    #[test]
    fn a_long_chain_failing_at_its_base_fails_every_step_without_recursion() {
        const STEPS: usize = 100_000;
        let run = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let mut s = Schedule::default();
                let name = |i: usize| DrvPath::from(format!("step-{i}").as_str());
                s.demand(&name(0), info(&[]), Urgency::default());
                for i in 1..STEPS {
                    let below = name(i - 1);
                    s.demand(&name(i), info(&[below.as_str()]), Urgency::default());
                }
                s.claim(&name(0), &"w1".into());
                let effects = s.failed(
                    &name(0),
                    Some(&"w1".into()),
                    "builder exited 1",
                    FailureKind::Permanent,
                    FailureCause::Build,
                );
                let failed = effects
                    .iter()
                    .filter(|e| matches!(e, Effect::Failed { .. }))
                    .count();
                assert_eq!(failed, STEPS);
                for i in 1..STEPS {
                    let expected = FailureCause::Dependency(name(i - 1));
                    assert!(
                        matches!(s.state(&name(i)), Some(StepState::Failed(failure)) if failure.cause == expected),
                        "step {i}: {:?}",
                        s.state(&name(i))
                    );
                }
            })
            .expect("a thread");
        run.join().expect("the chain fails without a crash");
    }

    #[test]
    fn permanent_failure_reaches_dependents() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.demand(&"b".into(), info(&["a"]), Urgency::default());
        s.demand(&"c".into(), info(&["b"]), Urgency::default());
        s.claim(&"a".into(), &"w1".into());
        let e = s.failed(
            &"a".into(),
            Some(&"w1".into()),
            "builder exited 1",
            FailureKind::Permanent,
            FailureCause::Build,
        );
        let failed: Vec<_> = e
            .iter()
            .filter_map(|e| match e {
                Effect::Failed { drv, reason, .. } => Some((drv.as_str(), reason.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            failed,
            vec![
                ("a", "builder exited 1"),
                ("b", "dependency a failed"),
                ("c", "dependency b failed")
            ]
        );
        let causes: Vec<_> = e
            .iter()
            .filter_map(|e| match e {
                Effect::Failed { cause, .. } => Some(cause.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            causes,
            vec![
                FailureCause::Build,
                FailureCause::Dependency("a".into()),
                FailureCause::Dependency("b".into())
            ]
        );
        // A late demand on a failed input fails at once.
        let e = s.demand(&"d".into(), info(&["a"]), Urgency::default());
        assert!(e.iter().any(|e| matches!(e,
            Effect::Failed { drv, cause: FailureCause::Dependency(input), .. }
                if drv == "d" && input == "a")));
    }

    #[test]
    fn shared_step_survives_one_withdrawal() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.claim(&"a".into(), &"w1".into());
        assert!(s.undemand(&"a".into()).is_empty());
        assert_eq!(
            s.undemand(&"a".into()),
            vec![Effect::Cancel { drv: "a".into() }]
        );
        assert!(s.is_empty());
    }

    #[test]
    fn only_the_assignee_can_report_a_step_built() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.demand(&"b".into(), info(&["a"]), Urgency::default());
        // Not assigned yet: nobody can complete it.
        assert!(s
            .built(&"a".into(), &"w1".into(), vec!["/fake".into()])
            .is_empty());
        assert_eq!(s.state(&"a".into()), Some(&StepState::Ready));
        // A step waiting for its inputs cannot be reported built either.
        assert!(s
            .built(&"b".into(), &"w1".into(), vec!["/fake".into()])
            .is_empty());
        assert_eq!(s.state(&"b".into()), Some(&StepState::Waiting));
        s.claim(&"a".into(), &"w1".into());
        // Another worker's report is ignored; the assignee's counts.
        assert!(s
            .built(&"a".into(), &"w2".into(), vec!["/fake".into()])
            .is_empty());
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("w1".into()))
        );
        let e = s.built(&"a".into(), &"w1".into(), vec!["/out/a".into()]);
        assert!(e.contains(&Effect::Unassign { drv: "a".into() }), "{e:?}");
        assert_eq!(readies(&e), vec!["b"]);
        // A late report about a built step changes nothing.
        assert!(s
            .built(&"a".into(), &"w2".into(), vec!["/fake".into()])
            .is_empty());
        // Nor does one about a step nobody demanded.
        assert!(s.built(&"zzz".into(), &"w1".into(), vec![]).is_empty());
    }

    #[test]
    fn stale_reports_are_ignored() {
        let mut s = Schedule::default();
        s.demand(&"a".into(), info(&[]), Urgency::default());
        s.claim(&"a".into(), &"w1".into());
        assert!(s
            .failed(
                &"a".into(),
                Some(&"w2".into()),
                "not mine",
                FailureKind::Permanent,
                FailureCause::Build
            )
            .is_empty());
        assert!(s.unclaim(&"a".into(), &"w2".into()).is_empty());
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("w1".into()))
        );
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    fn info(system: &str, features: &[&str]) -> StepInfo {
        StepInfo {
            system: system.into(),
            features: features.iter().map(|s| s.to_string()).collect(),
            input_drvs: vec![],
            settings: Default::default(),
            outputs: vec![],
            memory: None,
            duration_ms: None,
            derivation: Default::default(),
        }
    }

    /// A worker for x86_64-linux with these features and one slot.
    pub(super) fn offer(features: &[&str]) -> WorkerOffer {
        WorkerOffer {
            systems: vec!["x86_64-linux".into()],
            features: features.iter().map(|s| s.to_string()).collect(),
            speed: 1.0,
            max_jobs: 1,
            hold: 0,
            resources: Default::default(),
        }
    }

    #[test]
    fn unschedulable_until_a_capable_worker_joins() {
        let mut s = Schedule::default();
        s.worker_joined(&"small".into(), offer(&[]));
        let e = s.demand(
            &"big-step".into(),
            info("x86_64-linux", &["big"]),
            Urgency::default(),
        );
        assert!(
            e.contains(&Effect::Unschedulable {
                drv: "big-step".into(),
                reason: "no worker for system x86_64-linux offers the required features: big"
                    .into()
            }),
            "{e:?}"
        );
        let e = s.demand(
            &"arm".into(),
            info("aarch64-linux", &[]),
            Urgency::default(),
        );
        assert!(
            e.contains(&Effect::Unschedulable {
                drv: "arm".into(),
                reason: "no worker offers system aarch64-linux".into()
            }),
            "{e:?}"
        );
        let e = s.worker_joined(&"big".into(), offer(&["big"]));
        assert_eq!(
            e,
            vec![Effect::Schedulable {
                drv: "big-step".into()
            }]
        );
        let e = s.worker_left(&"big".into());
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(matches!(&e[0], Effect::Unschedulable { drv: d, .. } if d == "big-step"));
        // Claiming (or withdrawing) a step clears its unschedulable mark.
        let e = s.undemand(&"arm".into());
        assert!(
            e.contains(&Effect::Schedulable { drv: "arm".into() }),
            "{e:?}"
        );
    }

    #[test]
    fn a_restarted_worker_loses_its_steps_and_keeps_its_slots() {
        let mut s = Schedule::new(5, Duration::ZERO);
        s.worker_joined(&"w".into(), offer(&[]));
        s.offer(&"w".into(), 1);
        s.demand(&"a".into(), info("x86_64-linux", &[]), Urgency::default());
        let mut effects = Vec::new();
        s.dispatch(&mut effects);
        assert_eq!(s.state(&"a".into()), Some(&StepState::Assigned("w".into())));
        let e = s.worker_restarted(&"w".into());
        assert!(
            e.iter().any(|e| matches!(e, Effect::RetryAfter { reason, .. } if reason == "worker w restarted while building")),
            "{e:?}"
        );
        // The new process offers what the old one did (the same record, so no new offer
        // arrives): the step goes to it once retried.
        let mut effects = s.retry(&"a".into());
        s.dispatch(&mut effects);
        assert_eq!(s.state(&"a".into()), Some(&StepState::Assigned("w".into())));
        // Positive control: a worker that left gets nothing.
        s.worker_left(&"w".into());
        s.worker_joined(&"w".into(), offer(&[]));
        let mut effects = s.retry(&"a".into());
        s.dispatch(&mut effects);
        assert_eq!(s.state(&"a".into()), Some(&StepState::Ready));
    }

    #[test]
    fn back_off_doubles_per_attempt() {
        let mut s = Schedule::new(5, Duration::from_millis(100));
        s.worker_joined(&"w".into(), offer(&[]));
        s.demand(&"a".into(), info("x86_64-linux", &[]), Urgency::default());
        let mut delays = Vec::new();
        for _ in 0..3 {
            s.claim(&"a".into(), &"w".into());
            for e in s.unclaim(&"a".into(), &"w".into()) {
                if let Effect::RetryAfter { delay: d, .. } = e {
                    delays.push(d.as_millis());
                }
            }
            s.retry(&"a".into());
        }
        assert_eq!(delays, vec![100, 200, 400]);
    }

    #[test]
    fn a_second_demand_can_raise_urgency() {
        let mut s = Schedule::default();
        let urgency = |priority, depth| Urgency { priority, depth };
        s.demand(&"a".into(), info("x86_64-linux", &[]), urgency(0, 1));
        s.demand(&"b".into(), info("x86_64-linux", &[]), urgency(3, 0));
        let first = |s: &Schedule| s.ready_queue.values().next().cloned();
        assert_eq!(first(&s), Some("b".into()), "the higher priority first");
        let e = s.demand(&"a".into(), info("x86_64-linux", &[]), urgency(5, 0));
        assert_eq!(e, vec![], "it waits in the queue as before");
        assert_eq!(s.steps[&DrvPath::from("a")].urgency, urgency(5, 1));
        assert_eq!(first(&s), Some("a".into()), "moved up the queue");
    }
}
