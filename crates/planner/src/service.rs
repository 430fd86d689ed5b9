//! The planner actor: observes demands, claims and outcomes in a dataspace,
//! feeds them to a [`Schedule`] and publishes its effects as assertions.
//!
//! Observers run in short-lived facets (one per matched assertion), and
//! whatever a facet asserts is retracted when it stops. So observers only
//! forward [`Event`]s to the [`Planner`] entity, which lives in the actor's
//! root facet: everything the planner publishes lasts until the planner
//! itself withdraws it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use nixspace_protocol::{build, expected_outputs, on_retraction, BuildMode, DrvPath, WorkerId};
use preserves_schema::support::Unparse;
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Handle, Ref};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use crate::demand_gate::DemandGate;
use crate::eta::Frontends;
use crate::history::{AttemptOutcome, BuildUsage, Estimates, History, HistoryError, Resolution};
use crate::metrics::Metrics;
use crate::resolution::outputs_by_name;
use crate::schedule::{
    Effect, FailureCause, FailureKind, Resources, Schedule, StealPolicy, StepInfo, StepState,
    Urgency, WorkerOffer,
};
use crate::wire::{
    cause_from_wire, cause_to_wire, kind_from_wire, realisations_from_wire, usage_from_wire,
    worker_from_wire,
};

/// The most events the planner handles in one turn; the rest wait for later turns.
const EVENTS_PER_TURN: usize = 512;

/// The most demands (and withdrawals) among them: while a frontend's 100,000 demands come
/// in, a worker's report waits for at most this many to be planned and recorded before it.
const DEMANDS_PER_TURN: usize = 128;

/// How many of the most recent rejected results the planner keeps asserting (for `status`).
const RECENT_REJECTIONS: usize = 16;

/// After a restart, a step the run before recorded built in its last minute, demanded in the
/// new run's first minute, is taken as built (see [`EarlierBuilds`]).
const BUILT_BEFORE_RESTART: Duration = Duration::from_secs(60);

/// What the planner's observers saw.
#[derive(Debug)]
pub enum Event {
    /// A demand for a step appeared.
    Demand {
        /// The step.
        drv: DrvPath,
        /// What it needs.
        info: StepInfo,
        /// How urgent the demand is.
        urgency: Urgency,
        /// The frontend that demands it.
        requester: String,
    },
    /// A demand for a step went away.
    Undemand {
        /// The step.
        drv: DrvPath,
        /// The frontend that demanded it.
        requester: String,
    },
    /// A worker claimed a step.
    Claim {
        /// The step.
        drv: DrvPath,
        /// The worker.
        worker: WorkerId,
    },
    /// A worker's claim went away.
    Unclaim {
        /// The step.
        drv: DrvPath,
        /// The worker.
        worker: WorkerId,
    },
    /// A worker connected.
    WorkerJoined {
        /// The worker.
        worker: WorkerId,
        /// Its process's session.
        session: String,
        /// What it can build.
        offer: WorkerOffer,
    },
    /// A worker disconnected.
    WorkerLeft {
        /// The worker.
        worker: WorkerId,
        /// The session of the process that disconnected.
        session: String,
    },
    /// A step's retry delay is over.
    Retry {
        /// The step.
        drv: DrvPath,
    },
    /// A worker reported a step built.
    Built {
        /// The step.
        drv: DrvPath,
        /// The worker.
        worker: WorkerId,
        /// The output paths.
        outputs: Vec<String>,
        /// The realisations of its floating content-addressed outputs, as reported (bounded
        /// by [`crate::wire::realisations_from_wire`]).
        realisations: Vec<build::Realisation>,
        /// What the build used, if the worker measured it.
        usage: Option<BuildUsage>,
    },
    /// A worker reported a step failed.
    Failed {
        /// The step.
        drv: DrvPath,
        /// The worker (none if the record names none).
        worker: Option<WorkerId>,
        /// Why, in words.
        reason: String,
        /// Whether trying again may help.
        kind: FailureKind,
        /// What made it fail.
        cause: FailureCause,
    },
    /// A worker announced its free build slots.
    Offer {
        /// The worker.
        worker: WorkerId,
        /// How many more steps it takes now.
        free_slots: i64,
    },
    /// Time to look for steals.
    Tick,
    /// A worker found no store with input `path` of step `drv`.
    Lost {
        /// The step that needs the input.
        drv: DrvPath,
        /// The input no store has any more.
        path: String,
        /// The worker that looked for it.
        worker: WorkerId,
    },
}

/// What the planner entity receives: an event its observers saw, or a step of its own turns.
// An event is moved into a lane once; boxing it for the two small messages' sake would cost an
// allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Message {
    /// Something seen in the dataspace (or a timer): it waits in [`Lanes`] for a
    /// [`Message::Drain`] turn.
    Event(Event),
    /// The turn is ending (delivered by the planner to itself just before its turn's
    /// assertions go out): commit the history's batch of this turn's changes.
    EndTurn,
    /// Handle the queued events, at most [`EVENTS_PER_TURN`] of them and of those at most
    /// [`DEMANDS_PER_TURN`] demands (sent by the planner to itself).
    Drain,
}

impl From<Event> for Message {
    fn from(event: Event) -> Message {
        Message::Event(event)
    }
}

/// The most events an empty lane keeps room for.
const LANE_ROOM_KEPT: usize = 1024;

/// The events waiting for a [`Message::Drain`] turn, in two lanes, each in the order its events
/// came: what workers and timers say (reports, offers, claims, workers coming and going) is
/// handled before the frontends' demands and their withdrawals, so a slot freed while
/// 100,000 demands are coming in is given its next step without waiting for them. The lanes
/// are about different things: a report names a step given out, whose demand was handled.
#[derive(Debug, Default)]
struct Lanes {
    workers: VecDeque<Event>,
    demands: VecDeque<Event>,
}

impl Lanes {
    fn is_demand(event: &Event) -> bool {
        matches!(event, Event::Demand { .. } | Event::Undemand { .. })
    }

    fn push(&mut self, event: Event) {
        if Lanes::is_demand(&event) {
            self.demands.push_back(event);
        } else {
            self.workers.push_back(event);
        }
    }

    /// The next event to handle: the workers' lane first, then the demands' if `demands`
    /// allows. A lane emptied after a burst (a frontend's 100,000 demands) gives back its
    /// room.
    fn pop(&mut self, demands: bool) -> Option<Event> {
        let event = self
            .workers
            .pop_front()
            .or_else(|| demands.then(|| self.demands.pop_front()).flatten());
        for lane in [&mut self.workers, &mut self.demands] {
            if lane.is_empty() && lane.capacity() > LANE_ROOM_KEPT {
                *lane = VecDeque::new();
            }
        }
        event
    }

    fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.demands.is_empty()
    }
}

/// The planner entity: the schedule and the handles of what it asserted.
struct Planner {
    ds: Arc<Cap>,
    /// This entity's own reference, for timers that call back into it.
    me: Arc<OnceLock<Weak<Ref<Message>>>>,
    schedule: Schedule,
    /// How many steps wait in the ready queue.
    ready: usize,
    /// The `<queue>` record asserted for each system with steps waiting, with its count.
    queue: HashMap<String, (usize, Handle)>,
    unschedulable: HashMap<DrvPath, Handle>,
    metrics: Arc<Metrics>,
    history: Option<History>,
    assigned: HashMap<DrvPath, Handle>,
    /// Invitations to steal, by step.
    steal_offers: HashMap<DrvPath, Handle>,
    /// The thieves' assignments, by step.
    stolen: HashMap<DrvPath, Handle>,
    outcomes: HashMap<DrvPath, Handle>,
    /// The `resolved` record of each resolved original.
    links: HashMap<DrvPath, Handle>,
    /// The planner's `rejected` records of the most recent discarded results, oldest first.
    rejections: VecDeque<Handle>,
    /// Every realisation recorded (reloaded from the history at start, or seen since), by id:
    /// its path, its signatures, and the planner's assertion of it.
    realisations: HashMap<String, (String, BTreeSet<String>, Handle)>,
    /// Each frontend's demanded steps and estimated time to completion.
    frontends: Frontends,
    /// The session of each connected worker's process.
    sessions: HashMap<WorkerId, String>,
    /// Events handled in this turn so far (an [`Message::EndTurn`] is due before the turn
    /// commits while it is not zero).
    handled_this_turn: usize,
    /// Events waiting for an [`Message::Drain`] turn.
    queued: Lanes,
    /// Whether an [`Message::Drain`] is on its way.
    draining: bool,
    /// Until a while after a restart: which steps the run before built that count as built.
    earlier_builds: Option<EarlierBuilds>,
}

/// The builds the run of the planner before a restart recorded in its last moments. A
/// frontend may have missed their `built` when the coordinator went down (the worker that
/// built one forgot it once the planner took its report), and demand them again: they are
/// taken as built instead of built again. Their outputs are in the stores of the dataspace;
/// should none have them any more, the step is built again as any lost output's is.
struct EarlierBuilds {
    /// Builds that ended at or after this (seconds since the epoch) count.
    since: i64,
    /// Demands after this are not looked up any more.
    until: Instant,
}

impl EarlierBuilds {
    /// The recent builds of the run before, if `history` recorded any.
    fn of(history: Option<&History>) -> Option<EarlierBuilds> {
        let last = match history?.last_ended_before_this_run() {
            Ok(last) => last?,
            Err(error) => {
                tracing::warn!(%error, "cannot read when the last run's builds ended");
                return None;
            }
        };
        Some(EarlierBuilds {
            since: last - BUILT_BEFORE_RESTART.as_secs() as i64,
            until: Instant::now() + BUILT_BEFORE_RESTART,
        })
    }
}

impl Entity<Message> for Planner {
    fn message(&mut self, t: &mut Activation, message: Message) -> ActorResult {
        tracing::debug!(?message);
        match message {
            Message::EndTurn => {
                self.handled_this_turn = 0;
                note(&mut self.history, History::end_batch);
            }
            Message::Drain => {
                self.draining = false;
                let mut demands = 0;
                while self.handled_this_turn < EVENTS_PER_TURN {
                    let Some(event) = self.queued.pop(demands < DEMANDS_PER_TURN) else {
                        break;
                    };
                    demands += usize::from(Lanes::is_demand(&event));
                    self.handle(t, event);
                }
                self.drain_later(t);
            }
            // Every event waits for the next `Drain` turn, with the events that arrive
            // before it: one history commit for all of them instead of one per event.
            Message::Event(event) => {
                self.queued.push(event);
                self.drain_later(t);
            }
        }
        Ok(())
    }
}

impl Planner {
    /// Handle one event: change the schedule, dispatch, and publish the effects. The first
    /// event of a turn opens the turn's batch in the history.
    fn handle(&mut self, t: &mut Activation, event: Event) {
        self.begin_turn(t);
        self.handled_this_turn += 1;
        let s = &mut self.schedule;
        let mut effects = match event {
            Event::Demand {
                drv,
                mut info,
                urgency,
                requester,
            } => {
                let drv = s.shared_name(&drv).unwrap_or(drv);
                self.frontends.demanded(requester, &drv);
                note(&mut self.history, |h| h.demanded(&drv, &info.system));
                let learned = estimates(self.history.as_mut(), &drv);
                info.memory = info.memory.or(learned.memory);
                info.duration_ms = learned.duration_ms;
                let new = s.state(&drv).is_none();
                let mut effects = s.demand(&drv, info, urgency);
                if new {
                    effects.extend(self.built_before_restart(&drv));
                }
                effects
            }
            Event::WorkerJoined {
                worker,
                session,
                offer,
            } => {
                let mut effects = Vec::new();
                match self.sessions.insert(worker.clone(), session.clone()) {
                    Some(old) if old != session => {
                        // Restarted before its old connection was noticed gone: what the
                        // old process was building is lost with it.
                        tracing::warn!(%worker, "a new process joined as this worker; its old one's steps are lost");
                        effects.extend(s.worker_restarted(&worker));
                    }
                    Some(_) => {}
                    None => {
                        self.metrics.workers.inc();
                    }
                }
                effects.extend(s.worker_joined(&worker, offer));
                effects
            }
            Event::WorkerLeft { worker, session } => {
                if self.sessions.get(&worker) == Some(&session) {
                    self.sessions.remove(&worker);
                    self.metrics.workers.dec();
                    s.worker_left(&worker)
                } else {
                    // An earlier process of a worker that rejoined since.
                    Vec::new()
                }
            }
            Event::Retry { drv } => s.retry(&drv),
            Event::Undemand { drv, requester } => {
                self.frontends.undemanded(&requester, &drv);
                s.undemand(&drv)
            }
            Event::Claim { drv, worker } => s.claim(&drv, &worker),
            Event::Unclaim { drv, worker } => s.unclaim(&drv, &worker),
            Event::Built {
                drv,
                worker,
                outputs,
                realisations,
                usage,
            } => self.reported_built(t, drv, worker, outputs, realisations, usage),
            Event::Failed {
                drv,
                worker,
                reason,
                kind,
                cause,
            } => s.failed(&drv, worker.as_ref(), &reason, kind, cause),
            Event::Offer { worker, free_slots } => {
                s.offer(&worker, free_slots);
                Vec::new()
            }
            Event::Tick => {
                let now = Instant::now();
                s.update_critical_paths();
                self.frontends
                    .publish(t, &self.ds, &self.schedule, &self.metrics, now);
                self.publish_queue(t);
                let s = &mut self.schedule;
                let mut effects = s.expire_reservations(now);
                effects.extend(s.tick(now));
                effects
            }
            Event::Lost { drv, path, worker } => {
                let (rebuilt, effects) = s.lost(&path);
                match rebuilt {
                    Some(made_it) => {
                        self.metrics.rebuilds.inc();
                        tracing::warn!(%path, %made_it, needed_by = %drv, %worker, "no store has this output any more; building its step again");
                        self.forget_realisations_of(t, &path);
                    }
                    None => {
                        tracing::warn!(%path, needed_by = %drv, %worker, "no store has this input, and no demanded step makes it")
                    }
                }
                effects
            }
        };
        self.schedule.dispatch(&mut effects);
        self.publish(t, effects);
        let m = &self.metrics;
        m.ready.set(self.ready as i64);
        m.running.set(self.assigned.len() as i64);
        m.unschedulable.set(self.unschedulable.len() as i64);
    }

    /// Assert how many steps wait for each system (where the count changed since the last
    /// tick), and withdraw the counts of systems with none waiting any more.
    fn publish_queue(&mut self, t: &mut Activation) {
        let waiting = self.schedule.queue_by_system();
        self.queue.retain(|system, (_, handle)| {
            let keep = waiting.contains_key(system.as_str());
            if !keep {
                t.retract(*handle);
            }
            keep
        });
        for (system, &steps) in waiting {
            let record = build::Queue {
                system: system.to_string(),
                steps: (steps as i64).into(),
            };
            republish(t, &self.ds, &mut self.queue, system, steps, &record);
        }
    }

    /// On a turn's first event: put the turn's changes to the history in one transaction,
    /// committed by [`Message::EndTurn`] just before the turn ends (before its assertions leave
    /// the actor, so nothing is announced that the history has not kept): one commit per turn
    /// instead of one per change. A commit that fails leaves the batch open, and the next
    /// turn's end commits it.
    fn begin_turn(&mut self, t: &mut Activation) {
        if self.handled_this_turn > 0 {
            return;
        }
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        note(&mut self.history, History::begin_batch);
        t.pre_commit(move |t| match me.upgrade() {
            Some(me) => t.with_entity(&me, |t, planner| planner.message(t, Message::EndTurn)),
            None => Ok(()),
        });
    }

    /// Have the queued events handled in a later turn, unless none are queued or that is
    /// arranged already. Events that arrive until then join them, and the history commits
    /// once for all (a commit per event was most of the planner's time at thousands of
    /// steps per second). A turn handles at most [`EVENTS_PER_TURN`] events, so what it
    /// decided (the first assignments after 100,000 demands, say) goes out without waiting
    /// for the rest.
    fn drain_later(&mut self, t: &mut Activation) {
        if self.draining || self.queued.is_empty() {
            return;
        }
        if let Some(me) = self.me.get().and_then(Weak::upgrade) {
            self.draining = true;
            t.message(&me, Message::Drain);
        }
    }

    fn publish(&mut self, t: &mut Activation, effects: Vec<Effect>) {
        // A worklist: resolving a step has effects of its own.
        let mut effects = VecDeque::from(effects);
        while let Some(effect) = effects.pop_front() {
            tracing::debug!(?effect);
            match effect {
                Effect::Resolve { drv } => {
                    let mut more = self.resolve(&drv);
                    self.schedule.dispatch(&mut more);
                    effects.extend(more);
                }
                Effect::Linked { from, to, system } => {
                    tracing::info!(%from, %to, "resolved");
                    note(&mut self.history, |h| {
                        if let Resolution::Ignored { status } = h.resolved(&from, &to, &system)? {
                            tracing::warn!(%from, %to, %status, "the history keeps a resolution of a step recorded as {status} as it was");
                        }
                        Ok(())
                    });
                    let record = build::Resolved {
                        from: from.to_string(),
                        to: to.to_string(),
                        system,
                    };
                    let h = self.ds.assert(t, &record);
                    replace(t, &mut self.links, from, h);
                }
                Effect::Unlinked { from } => retract(t, &mut self.links, &from),
                Effect::Ready { .. } => self.ready += 1,
                Effect::Unready { .. } => self.ready = self.ready.saturating_sub(1),
                Effect::Unschedulable { drv, reason } => {
                    tracing::warn!(%drv, %reason, "unschedulable");
                    let h = self.ds.assert(
                        t,
                        &build::Unschedulable {
                            drv: drv.to_string(),
                            reason,
                        },
                    );
                    replace(t, &mut self.unschedulable, drv, h);
                }
                Effect::Schedulable { drv } => retract(t, &mut self.unschedulable, &drv),
                Effect::RetryAfter {
                    drv,
                    worker,
                    delay,
                    reason,
                    cause,
                } => {
                    self.metrics.retries.inc();
                    let reason = reason.as_str();
                    self.record(
                        &drv,
                        Some(&worker),
                        AttemptOutcome::Lost {
                            reason,
                            cause: &cause,
                        },
                    );
                    self.retry_after(t, drv, delay)
                }
                Effect::Assign { drv, worker } => {
                    tracing::info!(%drv, %worker, "assigned");
                    note(&mut self.history, |h| h.attempt_started(&drv, &worker));
                    let waited = self.schedule.waited(&drv);
                    self.metrics.dispatch_seconds.observe(waited.as_secs_f64());
                    let h = self.ds.assert(
                        t,
                        &build::Assigned {
                            drv: drv.to_string(),
                            worker: worker.into(),
                            settings: self.schedule.settings(&drv).to_wire(),
                            derivation: self.schedule.derivation_text(&drv),
                        },
                    );
                    replace(t, &mut self.assigned, drv, h);
                }
                Effect::Unassign { drv } => self.unassign(t, &drv),
                Effect::Cancel { drv } => {
                    tracing::info!(%drv, "cancelled: no demand left");
                    self.record(&drv, None, AttemptOutcome::Cancelled);
                    self.unassign(t, &drv)
                }
                Effect::Abandoned { drv, worker } => {
                    tracing::info!(%drv, %worker, "not demanded again after the restart: the attempt left open on it is cancelled");
                    self.record(&drv, Some(&worker), AttemptOutcome::Cancelled);
                }
                Effect::OfferSteal { drv, from, to } => {
                    tracing::info!(%drv, %from, %to, "inviting a faster idle worker to steal");
                    let steal = build::Steal {
                        drv: drv.to_string(),
                        from: from.into(),
                        to: to.into(),
                    };
                    let h = self.ds.assert(t, &steal);
                    replace(t, &mut self.steal_offers, drv, h);
                }
                Effect::WithdrawSteal { drv } => retract(t, &mut self.steal_offers, &drv),
                Effect::Stolen { drv, thief } => {
                    self.metrics.steals.inc();
                    tracing::info!(%drv, worker = %thief, "stolen: building it too");
                    let h = self.ds.assert(
                        t,
                        &build::Assigned {
                            drv: drv.to_string(),
                            worker: thief.into(),
                            settings: self.schedule.settings(&drv).to_wire(),
                            derivation: self.schedule.derivation_text(&drv),
                        },
                    );
                    replace(t, &mut self.stolen, drv, h);
                }
                Effect::Unsteal { drv } => retract(t, &mut self.stolen, &drv),
                Effect::Promote { drv } => {
                    if let Some(h) = self.stolen.remove(&drv) {
                        replace(t, &mut self.assigned, drv, Some(h));
                    }
                }
                Effect::Built {
                    drv,
                    worker,
                    outputs,
                } => {
                    // An original resolved to another derivation is built with it: the
                    // history keeps the link, and the attempts are the other's.
                    if self.schedule.resolved_to(&drv).is_none() {
                        self.metrics.built.inc();
                        tracing::info!(%drv, %worker, "built");
                        self.record(
                            &drv,
                            Some(&worker),
                            AttemptOutcome::Built { outputs: &outputs },
                        );
                    }
                    let h = self.ds.assert(
                        t,
                        &build::Built {
                            drv: drv.to_string(),
                            worker: worker.into(),
                            outputs,
                        },
                    );
                    replace(t, &mut self.outcomes, drv, h);
                }
                Effect::Failed {
                    drv,
                    worker,
                    reason,
                    cause,
                } => {
                    if self.schedule.resolved_to(&drv).is_none() {
                        self.metrics.failed.inc();
                        tracing::warn!(%drv, ?worker, %reason, ?cause, "failed");
                        self.record(
                            &drv,
                            worker.as_ref(),
                            AttemptOutcome::Failed {
                                reason: &reason,
                                cause: &cause,
                            },
                        );
                    }
                    let failed = build::Failed {
                        drv: drv.to_string(),
                        worker: worker.map(String::from).unwrap_or_default(),
                        reason,
                        kind: build::FailureKind::Permanent,
                        cause: cause_to_wire(cause),
                    };
                    let h = self.ds.assert(t, &failed);
                    replace(t, &mut self.outcomes, drv, h);
                }
                Effect::Forget { drv } => retract(t, &mut self.outcomes, &drv),
            }
        }
    }
}

/// Record something in the history, if one is kept. A failure is logged, not
/// fatal: scheduling goes on from the in-memory state.
fn note(history: &mut Option<History>, f: impl FnOnce(&mut History) -> Result<(), HistoryError>) {
    if let Some(h) = history {
        if let Err(error) = f(h) {
            tracing::warn!(%error, "history not updated");
        }
    }
}

impl Planner {
    /// `worker` reported `drv` built. Believed only from the worker building the step, and
    /// only with exactly the step's outputs: then the realisations it reported for those
    /// outputs are recorded and the schedule takes the step as built. A report with other
    /// outputs is discarded, counted, recorded and announced, and the step goes to another
    /// worker.
    fn reported_built(
        &mut self,
        t: &mut Activation,
        drv: DrvPath,
        worker: WorkerId,
        outputs: Vec<String>,
        realisations: Vec<build::Realisation>,
        usage: Option<BuildUsage>,
    ) -> Vec<Effect> {
        if !self.schedule.is_building(&drv, &worker) {
            if !matches!(self.schedule.state(&drv), Some(StepState::Built { worker: w, .. }) if *w == worker)
            {
                tracing::warn!(%drv, %worker, "ignoring a built report from a worker not building the step");
            }
            return Vec::new();
        }
        let expected = self
            .schedule
            .info(&drv)
            .map(|info| info.outputs.clone())
            .unwrap_or_default();
        if let Err(wrong) = expected_outputs::check(&drv, &expected, &outputs) {
            let reason = format!("result of worker {worker} rejected: {wrong}");
            self.reject(t, &drv, &worker, &reason);
            return self.schedule.rejected(&drv, &worker, &reason);
        }
        for r in realisations {
            if !outputs.contains(&r.path) {
                tracing::warn!(%drv, %worker, id = %r.id, path = %r.path, "ignoring a realisation of a path the step did not output");
                continue;
            }
            self.realised(t, r.id, r.path, r.signatures);
        }
        if let Some(usage) = usage {
            note(&mut self.history, |h| {
                h.attempt_usage(&drv, &worker, &usage)
            });
        }
        self.schedule.built(&drv, &worker, outputs)
    }

    /// Resolve the step `drv` with its inputs' outputs (see [`crate::resolution`]).
    fn resolve(&mut self, drv: &DrvPath) -> Vec<Effect> {
        let Some(step) = self.schedule.to_resolve(drv) else {
            return Vec::new();
        };
        // An input built before the planner restarted is not demanded again: its outputs are
        // in the history.
        let history = self.history.as_ref();
        let recorded = |input: &DrvPath| {
            let outputs = history?.outputs(input).ok().flatten()?;
            Some(outputs_by_name(input, &outputs))
        };
        let built = |input: &DrvPath| match self.schedule.state(input) {
            None => recorded(input),
            Some(_) => self.schedule.built_outputs(input),
        };
        match step.resolve(built) {
            Ok(resolved) => self.schedule.resolved(drv, resolved),
            Err(e) => {
                tracing::warn!(%drv, error = %e, "cannot resolve");
                self.schedule.cannot_resolve(drv, e.to_string())
            }
        }
    }

    /// Discard `worker`'s result for `drv`: count it, record it and assert it for `status`
    /// (keeping the most recent [`RECENT_REJECTIONS`]).
    fn reject(&mut self, t: &mut Activation, drv: &DrvPath, worker: &WorkerId, reason: &str) {
        tracing::warn!(%drv, %worker, %reason, "discarding a worker's result");
        self.metrics.rejected_results.inc();
        note(&mut self.history, |h| {
            h.attempt_rejected(drv, worker, reason)
        });
        let record = build::Rejected {
            drv: drv.to_string(),
            worker: worker.to_string(),
            reason: reason.to_owned(),
        };
        if let Some(h) = self.ds.assert(t, &record) {
            self.rejections.push_back(h);
        }
        while self.rejections.len() > RECENT_REJECTIONS {
            if let Some(old) = self.rejections.pop_front() {
                t.retract(old);
            }
        }
    }

    /// A realisation came with an accepted report: record what is new about it and keep
    /// asserting the whole record (so it outlives the worker, and the signatures accumulate).
    /// The first path recorded for an id stays: a report naming another is ignored, logged
    /// and counted.
    fn realised(&mut self, t: &mut Activation, id: String, path: String, signatures: Vec<String>) {
        let mut merged: BTreeSet<String> = signatures.iter().cloned().collect();
        if let Some((known_path, known, _)) = self.realisations.get(&id) {
            if *known_path != path {
                self.metrics.realisation_conflicts.inc();
                tracing::warn!(%id, recorded = %known_path, reported = %path, "ignoring a realisation that names another path than the one recorded");
                return;
            }
            if merged.is_subset(known) {
                return;
            }
            merged.extend(known.iter().cloned());
            if merged.len() > crate::wire::MAX_SIGNATURES {
                tracing::warn!(%id, "ignoring signatures past the most a realisation keeps");
                return;
            }
        }
        note(&mut self.history, |h| h.realised(&id, &path, &signatures));
        self.publish_realisation(t, id, path, merged);
    }

    /// Withdraw the realisations naming `path`, an output no store has any more whose step is
    /// built again, here and in the history: the rebuild's realisation (another path, if the
    /// build is not deterministic) is recorded in their place instead of counted as a conflict,
    /// also by a planner restarted before it comes.
    fn forget_realisations_of(&mut self, t: &mut Activation, path: &str) {
        note(&mut self.history, |h| h.forget_realisations_of(path));
        let gone: Vec<String> = self
            .realisations
            .iter()
            .filter(|(_, (p, _, _))| p == path)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some((_, _, handle)) = self.realisations.remove(&id) {
                tracing::info!(%id, %path, "withdrawing the realisation of a lost output");
                t.retract(handle);
            }
        }
    }

    /// Assert `id` ↦ `path` (with `signatures`) in place of what the planner asserted for `id`.
    fn publish_realisation(
        &mut self,
        t: &mut Activation,
        id: String,
        path: String,
        signatures: BTreeSet<String>,
    ) {
        let record = build::Realisation {
            id: id.clone(),
            path: path.clone(),
            signatures: signatures.iter().cloned().collect(),
        };
        let Some(handle) = self.ds.assert(t, &record) else {
            return;
        };
        if let Some((_, _, old)) = self.realisations.insert(id, (path, signatures, handle)) {
            t.retract(old);
        }
    }

    /// Assert the realisations the history recorded (a restarted planner knows them again).
    fn reload_realisations(&mut self, t: &mut Activation) {
        let recorded = match self.history.as_ref().map(History::realisations) {
            None => return,
            Some(Ok(recorded)) => recorded,
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot reload the recorded realisations");
                return;
            }
        };
        if !recorded.is_empty() {
            tracing::info!(
                count = recorded.len(),
                "asserting the recorded realisations"
            );
        }
        for r in recorded {
            self.publish_realisation(t, r.id, r.path, r.signatures.into_iter().collect());
        }
    }

    /// Withdraw every assignment of a step and any invitation to steal it.
    fn unassign(&mut self, t: &mut Activation, drv: &DrvPath) {
        retract(t, &mut self.assigned, drv);
        retract(t, &mut self.stolen, drv);
        retract(t, &mut self.steal_offers, drv);
    }

    /// Take the newly demanded step `drv` as built if the run before the restart built it
    /// (see [`EarlierBuilds`]); not when it is to be checked or repaired.
    fn built_before_restart(&mut self, drv: &DrvPath) -> Vec<Effect> {
        let Some(earlier) = &self.earlier_builds else {
            return Vec::new();
        };
        if Instant::now() >= earlier.until {
            self.earlier_builds = None;
            return Vec::new();
        }
        let (Some(history), BuildMode::Normal) =
            (self.history.as_ref(), self.schedule.settings(drv).mode)
        else {
            return Vec::new();
        };
        match history.built_by_an_earlier_run(drv, earlier.since) {
            Ok(Some((worker, outputs))) => {
                tracing::info!(%drv, %worker, "built just before the restart: taken as built");
                self.schedule.built_before_restart(drv, &worker, outputs)
            }
            Ok(None) => Vec::new(),
            Err(error) => {
                tracing::warn!(%drv, %error, "cannot look the step up in the history");
                Vec::new()
            }
        }
    }

    /// Note the end of an attempt (of `worker`'s, or of the step's when the planner decided)
    /// in the history, if one is kept.
    fn record(&mut self, drv: &DrvPath, worker: Option<&WorkerId>, outcome: AttemptOutcome<'_>) {
        note(&mut self.history, |h| h.attempt_ended(drv, worker, outcome));
    }

    fn retry_after(&self, t: &mut Activation, drv: DrvPath, delay: Duration) {
        tracing::info!(%drv, ?delay, "retrying after a transient failure");
        let Some(me) = self.me.get().and_then(Weak::upgrade) else {
            return;
        };
        t.after(delay, move |t| {
            t.message(&me, Event::Retry { drv }.into());
            Ok(())
        });
    }
}

/// What the history predicts `drv`'s build needs, from its package's earlier builds.
fn estimates(history: Option<&mut History>, drv: &DrvPath) -> Estimates {
    let Some(history) = history else {
        return Estimates::default();
    };
    match history.estimates(drv) {
        Ok(estimates) => {
            tracing::debug!(%drv, ?estimates, "predicted from earlier builds");
            estimates
        }
        Err(error) => {
            tracing::warn!(%drv, %error, "cannot read what earlier builds used");
            Estimates::default()
        }
    }
}

fn replace(
    t: &mut Activation,
    map: &mut HashMap<DrvPath, Handle>,
    drv: DrvPath,
    h: Option<Handle>,
) {
    let old = match h {
        Some(h) => map.insert(drv, h),
        None => map.remove(&drv),
    };
    if let Some(old) = old {
        t.retract(old);
    }
}

/// Assert `record` for `key`, whose value is `value`, unless `published` holds that value for
/// it already; the record it replaces is withdrawn. Whether it was asserted.
pub(crate) fn republish<V: PartialEq, R: Unparse<Arc<Cap>>>(
    t: &mut Activation,
    ds: &Arc<Cap>,
    published: &mut HashMap<String, (V, Handle)>,
    key: &str,
    value: V,
    record: &R,
) -> bool {
    if published.get(key).is_some_and(|(v, _)| *v == value) {
        return false;
    }
    let Some(handle) = ds.assert(t, record) else {
        return false;
    };
    if let Some((_, old)) = published.insert(key.to_owned(), (value, handle)) {
        t.retract(old);
    }
    true
}

fn retract(t: &mut Activation, map: &mut HashMap<DrvPath, Handle>, drv: &DrvPath) {
    if let Some(h) = map.remove(drv) {
        t.retract(h);
    }
}

/// How the planner retries and steals.
#[derive(Debug, Clone, Copy)]
pub struct PlannerConfig {
    /// A step whose worker vanished is tried at most this many times in all.
    pub max_attempts: u32,
    /// The first retry delay; it doubles per attempt.
    pub retry_backoff: Duration,
    /// When a faster idle worker duplicates a running step.
    pub steal: StealPolicy,
    /// After a restart, how long a step that was being built is kept for its worker to
    /// rejoin and report it before another worker may take it.
    pub rejoin_grace: Duration,
    /// The most live demands taken per requester name (see [`crate::demand_gate`]); `None`
    /// takes all (the embedded host caps demands per connection instead).
    pub max_demands_per_requester: Option<usize>,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            max_attempts: crate::DEFAULT_MAX_ATTEMPTS,
            retry_backoff: crate::DEFAULT_RETRY_BACKOFF,
            steal: StealPolicy::default(),
            rejoin_grace: crate::DEFAULT_REJOIN_GRACE,
            max_demands_per_requester: None,
        }
    }
}

/// Keep every step that was being built when the coordinator last stopped for its worker,
/// for `grace`.
fn keep_for_rejoining_workers(schedule: &mut Schedule, history: Option<&History>, grace: Duration) {
    let Some(history) = history else { return };
    match history.open_attempts() {
        Ok(open) => {
            let until = Instant::now() + grace;
            if !open.is_empty() {
                tracing::info!(
                    steps = open.len(),
                    ?grace,
                    "keeping the steps that were building for their workers"
                );
            }
            for (drv, worker) in open {
                schedule.reserve(&drv, &worker, until);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the attempts left open"),
    }
}

/// Start the planner as its own actor on `ds`, scheduling by `config`. The
/// planner keeps `metrics` up to date and records changes in `history`.
/// It is linked to the active facet: it stops with it (for a planner joined
/// to an external dataspace, when the connection drops, so that a rejoined
/// planner does not run beside a stale one), and the facet stops if the
/// planner fails.
pub fn start(
    t: &mut Activation,
    ds: Arc<Cap>,
    config: PlannerConfig,
    metrics: Arc<Metrics>,
    history: Option<History>,
) {
    t.spawn_link(Some(AnyValue::symbol("planner")), move |t| {
        let mut schedule = Schedule::new(config.max_attempts, config.retry_backoff)
            .with_stealing(config.steal);
        keep_for_rejoining_workers(&mut schedule, history.as_ref(), config.rejoin_grace);
        let earlier_builds = EarlierBuilds::of(history.as_ref());
        let me = Arc::new(OnceLock::new());
        let mut planner = Planner {
            ds: Arc::clone(&ds),
            me: Arc::clone(&me),
            schedule,
            ready: 0,
            queue: HashMap::new(),
            unschedulable: HashMap::new(),
            metrics,
            history,
            assigned: HashMap::new(),
            steal_offers: HashMap::new(),
            stolen: HashMap::new(),
            outcomes: HashMap::new(),
            links: HashMap::new(),
            rejections: VecDeque::new(),
            realisations: HashMap::new(),
            frontends: Frontends::default(),
            sessions: HashMap::new(),
            handled_this_turn: 0,
            queued: Lanes::default(),
            draining: false,
            earlier_builds,
        };
        planner.reload_realisations(t);
        ds.assert(
            t,
            &build::Planner {
                id: format!("planner-{}", std::process::id()),
            },
        );
        let planner: Arc<Ref<Message>> = t.create_ref(planner);
        let _ = me.set(Arc::downgrade(&planner));

        let period = (config.steal.after / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        enclose!((planner) t.every(period, move |t| {
            t.message(&planner, Event::Tick.into());
            Ok(())
        }))?;

        enclose!((planner) on_message!(t, ds, <lost $drv: String $path: String $worker: String>, |t: &mut Activation| {
            t.message(&planner, Event::Lost { drv: drv.into(), path, worker: worker.into() }.into());
            Ok(())
        }));

        enclose!((planner) during!(t, ds, <offer $worker: String $free: i64>, |t: &mut Activation| {
            t.message(&planner, Event::Offer { worker: worker.as_str().into(), free_slots: free }.into());
            Ok(())
        }));

        let max_demands = config.max_demands_per_requester.unwrap_or(usize::MAX);
        DemandGate::observe(t, &ds, Arc::clone(&planner), max_demands);

        enclose!((planner) during!(t, ds, <worker $id: String $session: String _ $systems: Vec<String> $features: Vec<String> $max_jobs: u32 $hold: u32 $speed: f64 $memory: u64 $build_memory: u64 $cpus: u32>,
            |t: &mut Activation| {
                let worker = WorkerId::from(id.as_str());
                let resources = Resources { memory, build_memory, cpus };
                // A worker holds at most as many steps as it builds.
                let hold = hold.min(max_jobs);
                let offer = WorkerOffer { systems: systems.clone(), features: features.clone(), speed, max_jobs, hold, resources };
                tracing::info!(%worker, %session, ?offer, "worker joined");
                t.message(&planner, Event::WorkerJoined { worker: worker.clone(), session: session.clone(), offer }.into());
                on_retraction(t, enclose!((planner, session) move |t| {
                    tracing::info!(%worker, %session, "worker left");
                    t.message(&planner, Event::WorkerLeft { worker, session }.into());
                    Ok(())
                }));
                Ok(())
            }));

        enclose!((planner) during!(t, ds, <claim $drv: String $worker: String>,
            |t: &mut Activation| {
                let (drv, worker) = (DrvPath::from(drv.as_str()), WorkerId::from(worker.as_str()));
                t.message(&planner, Event::Claim { drv: drv.clone(), worker: worker.clone() }.into());
                on_retraction(t, enclose!((planner) move |t| {
                    t.message(&planner, Event::Unclaim { drv, worker }.into());
                    Ok(())
                }));
                Ok(())
            }));

        // Workers' reports, never the `built` and `failed` records (the planner's own).
        enclose!((planner) on_message!(t, ds, <report-built $drv: String $worker: String $outputs: Vec<String> $realisations $usage>,
            |t: &mut Activation| {
                let (drv, worker) = (drv.as_str().into(), worker.as_str().into());
                let realisations = realisations_from_wire(&realisations, outputs.len());
                let usage = usage_from_wire(&usage);
                t.message(&planner, Event::Built { drv, worker, outputs: outputs.clone(), realisations, usage }.into());
                Ok(())
            }));

        enclose!((planner) on_message!(t, ds, <report-failed $drv: String $worker: String $reason: String $kind $cause>,
            |t: &mut Activation| {
                match (kind_from_wire(&kind), cause_from_wire(&cause)) {
                    (Some(kind), Some(cause)) => t.message(
                        &planner,
                        Event::Failed {
                            drv: drv.as_str().into(),
                            worker: worker_from_wire(&worker),
                            reason: reason.clone(),
                            kind,
                            cause,
                        }.into(),
                    ),
                    _ => tracing::warn!(%drv, %worker, ?kind, ?cause, "ignoring failure of unknown kind or cause"),
                }
                Ok(())
            }));
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undemand(drv: &str) -> Event {
        Event::Undemand {
            drv: drv.into(),
            requester: "r".into(),
        }
    }

    fn claim(drv: &str) -> Event {
        Event::Claim {
            drv: drv.into(),
            worker: "w".into(),
        }
    }

    #[test]
    fn what_workers_say_goes_before_the_demands_each_lane_in_order() {
        let mut lanes = Lanes::default();
        for event in [undemand("a"), claim("b"), undemand("c"), claim("d")] {
            lanes.push(event);
        }
        let order: Vec<String> = std::iter::from_fn(|| lanes.pop(true))
            .map(|e| match e {
                Event::Undemand { drv, .. } | Event::Claim { drv, .. } => drv.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
        assert!(lanes.is_empty());
    }

    #[test]
    fn demands_wait_while_a_turn_has_had_its_share_of_them() {
        let mut lanes = Lanes::default();
        for event in [undemand("a"), claim("b")] {
            lanes.push(event);
        }
        assert!(matches!(lanes.pop(false), Some(Event::Claim { .. })));
        assert!(lanes.pop(false).is_none(), "a demand past the turn's share");
        assert!(!lanes.is_empty());
        assert!(matches!(lanes.pop(true), Some(Event::Undemand { .. })));
    }

    #[test]
    fn a_lane_emptied_after_a_burst_gives_back_its_room() {
        let mut lanes = Lanes::default();
        for i in 0..5000 {
            lanes.push(undemand(&i.to_string()));
        }
        assert!(lanes.demands.capacity() >= 5000);
        while lanes.pop(true).is_some() {}
        assert!(lanes.demands.capacity() <= LANE_ROOM_KEPT);
    }
}
