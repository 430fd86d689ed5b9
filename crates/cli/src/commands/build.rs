//! `nixspace build`: demand a derivation's closure and follow it to the end.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Args;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_tools::{DaemonPool, DerivationInfo, PoolConfig};
use nixspace_space::{Backoff, Role, SessionEvent};
use nixspace_transfer::StoreNode;
use nixspace_translator::phase::PhaseClock;
use nixspace_translator::resolve::Resolver;
use nixspace_translator::steps::{self, Plan, StepEvent};
use nixspace_translator::store_db::StoreDb;
use syndicate::actor::{Activation, ActorError};
use syndicate::enclose;

use super::JoinArgs;
use crate::progress::{short_name, Progress};

/// How many log lines of a failed step are shown.
const LOG_TAIL: usize = 25;

/// Build a Nix file or a derivation on the dataspace's workers.
///
/// Instantiates FILE.nix with the local `nix-instantiate` (or takes a
/// /nix/store/…drv path as is), demands every derivation in its closure whose
/// outputs are not valid yet, shows progress, and prints the output paths.
/// Exits 0 when everything was built, 1 with the failing steps' log tails
/// otherwise. Ctrl-C withdraws the demands (steps nobody else wants stop).
#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// A Nix file to instantiate, or a store path ending in `.drv`.
    #[arg(value_name = "FILE.nix|DRV")]
    target: PathBuf,

    /// Attribute(s) of the file to build (like nix-build -A).
    #[arg(short = 'A', long = "attr", value_name = "ATTR")]
    attrs: Vec<String>,

    /// Priority of this build's demands (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,

    /// Show build logs as they arrive.
    #[arg(short = 'L', long)]
    print_build_logs: bool,

    /// How long a step may wait for a worker able to build it (right system
    /// and features) before the build fails as unschedulable, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    wait_for_workers: f64,

    /// How long to keep trying to rejoin the dataspace after losing it (for
    /// example while `nixspace up` restarts), in seconds; the build's pending
    /// demands are asserted again on rejoining.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    reconnect_for: f64,
}

#[derive(Debug, Clone)]
enum Status {
    Pending,
    Built(Vec<String>),
    Failed { worker: String, reason: String },
}

struct Session {
    /// This frontend's name in its demands.
    requester: String,
    steps: BTreeMap<String, Status>,
    running: BTreeMap<String, String>,
    /// Steps no connected worker can take, with the planner's reason.
    unschedulable: BTreeMap<String, String>,
    /// Set when the build cannot finish (a step stayed unschedulable).
    stuck: bool,
    logs: HashMap<String, VecDeque<String>>,
    progress: Progress,
    finished: Option<tokio::sync::oneshot::Sender<()>>,
    /// Times the phases of this build (debug log).
    clock: PhaseClock,
}

impl Session {
    fn done(&self) -> usize {
        self.steps
            .values()
            .filter(|s| !matches!(s, Status::Pending))
            .count()
    }

    fn settle(&mut self, drv: &str, status: Status) {
        let Some(slot) = self.steps.get_mut(drv) else {
            return;
        };
        if !matches!(slot, Status::Pending) {
            return;
        }
        match &status {
            Status::Built(_) => self.progress.event(&format!("built {}", short_name(drv))),
            Status::Failed { reason, .. } => self
                .progress
                .event(&format!("failed {}: {reason}", short_name(drv))),
            Status::Pending => {}
        }
        *slot = status;
        self.running.remove(drv);
        self.progress.update(self.done(), &self.running);
        if self.done() == self.steps.len() {
            self.finish();
        }
    }

    fn finish(&mut self) {
        if let Some(tx) = self.finished.take() {
            let _ = tx.send(());
        }
    }
}

type Shared = Arc<Mutex<Session>>;

fn with<R>(s: &Shared, f: impl FnOnce(&mut Session) -> R) -> Result<R, ActorError> {
    let mut g = s.lock().map_err(|_| "build session state poisoned")?;
    Ok(f(&mut g))
}

/// Run `nixspace build`.
pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut clock = PhaseClock::start("build");
    let route = args.join.route(Role::Submit)?;
    clock.end("read the route");
    let roots = resolve_target(&args.target, &args.attrs).await?;
    clock.end("instantiate");
    let pool = DaemonPool::new(PoolConfig::new(2));
    // Validity is read from the local store's database when it can be (no process).
    let db = StoreDb::open_local(pool.store_dir().clone());
    let plan = nixspace_translator::steps::plan(&roots, &pool, db.as_ref()).await?;
    clock.end("plan");
    let infos = &plan.infos;
    let needed = plan.steps();
    if needed.is_empty() {
        eprintln!("nixspace: nothing to build; all outputs are valid");
        print_outputs(&roots, &plan, &BTreeMap::new());
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "nixspace: {} of {} derivations to build",
        needed.len(),
        infos.len()
    );

    let requester = format!("nixspace-build-{}", std::process::id());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let session: Shared = Arc::new(Mutex::new(Session {
        requester: requester.clone(),
        steps: needed
            .keys()
            .map(|d| (d.clone(), Status::Pending))
            .collect(),
        running: BTreeMap::new(),
        unschedulable: BTreeMap::new(),
        stuck: false,
        logs: HashMap::new(),
        progress: Progress::new(needed.len(), args.print_build_logs),
        finished: Some(tx),
        clock,
    }));
    // Steps with inputs whose outputs are known only once built (content-addressed) are
    // resolved as those land, and demanded then.
    let resolver = Resolver::new(
        &plan,
        pool.store_dir().clone(),
        pool.clone(),
        &requester,
        args.priority,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let held = resolver.held();
    let demanded: BTreeMap<String, &DerivationInfo> = needed
        .iter()
        .filter(|(d, _)| !held.contains(*d))
        .map(|(d, i)| (d.clone(), *i))
        .collect();
    let demands = steps::demands(&demanded, &requester, args.priority);
    with(&session, |s| s.clock.end("prepare the demands"))
        .map_err(|_| anyhow::anyhow!("build session state poisoned"))?;
    // This machine's store in the dataspace: workers with stores of their own
    // fetch the derivations and sources from it, and the results come back.
    let store = StoreNode::new(requester, pool.clone());
    let patience = std::time::Duration::try_from_secs_f64(args.wait_for_workers)
        .map_err(|e| anyhow::anyhow!("--wait-for-workers {}: {e}", args.wait_for_workers))?;
    let reconnect_for = std::time::Duration::try_from_secs_f64(args.reconnect_for)
        .map_err(|e| anyhow::anyhow!("--reconnect-for {}: {e}", args.reconnect_for))?;
    // (Re)assert the demands of the steps still pending on every connection:
    // a restarted dataspace learns them again, and finished steps stay done.
    let body = enclose!((session, store, resolver) move |t: &mut Activation, ds: Arc<syndicate::actor::Cap>| {
        store.attach(t, Arc::clone(&ds));
        let handler = observe(t, &ds, &session, patience);
        resolver.attach(t, Arc::clone(&ds), handler);
        for d in &demands {
            if with(&session, |s| matches!(s.steps.get(&d.drv), Some(Status::Pending)))? {
                ds.assert(t, d);
            }
        }
        with(&session, |s| s.clock.end("join and assert the demands"))?;
        Ok(())
    });
    let backoff = Backoff {
        give_up_after: Some(reconnect_for),
        ..Backoff::default()
    };
    let events = enclose!((session) move |event: SessionEvent<'_>| {
        let line = match event {
            SessionEvent::Joined { connection: 1 } => return,
            SessionEvent::Joined { .. } => "rejoined the dataspace; demands asserted again".to_owned(),
            SessionEvent::Lost(why) => format!("lost the dataspace ({why}); reconnecting"),
            SessionEvent::Retrying { after, why } => format!("{why}; retrying in {after:?}"),
        };
        let _ = with(&session, |s| s.progress.event(&format!("nixspace: {line}")));
    });
    let session_loop = nixspace_space::join::stay_joined(&route, backoff, body, events);
    tokio::pin!(session_loop);

    tokio::select! {
        _ = rx => {
            let _ = with(&session, |s| s.clock.end("build the steps"));
        }
        e = &mut session_loop => {
            let _ = with(&session, |s| s.progress.finish());
            anyhow::bail!("the build cannot continue: {e}");
        }
        r = super::shutdown_signal() => {
            r?;
            let _ = with(&session, |s| s.progress.finish());
            eprintln!("nixspace: interrupted; demands withdrawn");
            return Ok(ExitCode::from(130));
        }
    }
    // The outputs asked for must be valid here, wherever they were built.
    let wanted = with(&session, |s| root_outputs(&roots, s))
        .map_err(|_| anyhow::anyhow!("build session state poisoned"))?;
    if !wanted.is_empty() {
        // Built here (workers on this store), they need no copy.
        let missing = missing_here(&wanted, db.as_ref(), pool.store_dir());
        tokio::select! {
            r = store.ensure(&missing) => r.context("cannot copy the outputs to this machine's store")?,
            e = &mut session_loop => anyhow::bail!("lost the dataspace while copying the outputs: {e}"),
        }
        let _ = with(&session, |s| s.clock.end("copy the outputs here"));
        // Content-addressed originals: Nix finds their outputs through these.
        resolver
            .register_realisations()
            .await
            .map_err(|e| anyhow::anyhow!("cannot register the realisations: {e}"))?;
        let _ = with(&session, |s| s.clock.end("register the realisations"));
    }
    let mut s = session
        .lock()
        .map_err(|_| anyhow::anyhow!("build session state poisoned"))?;
    s.progress.finish();
    let code = report(&roots, &plan, &s);
    s.clock.end("report");
    code
}

/// The outputs of the roots that were built (none if any step failed).
fn root_outputs(roots: &[String], s: &Session) -> Vec<String> {
    if s.stuck
        || s.steps
            .values()
            .any(|st| matches!(st, Status::Failed { .. }))
    {
        return Vec::new();
    }
    roots
        .iter()
        .filter_map(|r| match s.steps.get(r) {
            Some(Status::Built(outputs)) => Some(outputs.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The paths of `wanted` that the local store's database does not list as valid; all of them
/// without a database (the copy then checks through the daemon).
fn missing_here(wanted: &[String], db: Option<&StoreDb>, store: &StoreDir) -> Vec<String> {
    let Some(db) = db else {
        return wanted.to_vec();
    };
    let parsed: Result<BTreeSet<StorePath>, _> = wanted.iter().map(|p| store.parse(p)).collect();
    match parsed.map(|paths| db.valid_paths(&paths)) {
        Ok(Ok(valid)) => wanted
            .iter()
            .filter(|p| store.parse(p).map_or(true, |p| !valid.contains(&p)))
            .cloned()
            .collect(),
        _ => wanted.to_vec(),
    }
}

/// Register the observers that keep the session up to date; returns their event handler.
fn observe(
    t: &mut Activation,
    ds: &Arc<syndicate::actor::Cap>,
    session: &Shared,
    patience: std::time::Duration,
) -> steps::Handler {
    let session = Arc::clone(session);
    let handler: steps::Handler = Arc::new(move |t, event| on_event(t, &session, patience, event));
    steps::observe(t, ds, Arc::clone(&handler));
    handler
}

fn on_event(
    t: &mut Activation,
    session: &Shared,
    patience: std::time::Duration,
    event: StepEvent,
) -> Result<(), ActorError> {
    match event {
        StepEvent::Unschedulable { drv, reason } => {
            let ours = with(session, |s| {
                if !s.steps.contains_key(&drv) {
                    return false;
                }
                s.progress.event(&format!(
                    "waiting for a worker for {}: {reason}",
                    short_name(&drv)
                ));
                s.unschedulable.insert(drv.clone(), reason.clone());
                true
            })?;
            if ours {
                // Still unschedulable after the grace period: give up.
                t.after(
                    patience,
                    enclose!((session, drv) move |_t| with(&session, |s| {
                        if s.unschedulable.contains_key(&drv) {
                            s.stuck = true;
                            s.finish();
                        }
                    })),
                );
            }
            Ok(())
        }
        StepEvent::Schedulable { drv } => with(session, |s| {
            s.unschedulable.remove(&drv);
        }),
        StepEvent::Built { drv, outputs } => {
            with(session, |s| s.settle(&drv, Status::Built(outputs)))
        }
        StepEvent::Failed {
            drv,
            worker,
            reason,
            ..
        } => with(session, |s| {
            s.settle(&drv, Status::Failed { worker, reason })
        }),
        StepEvent::Assigned { drv, worker } => with(session, |s| {
            if matches!(s.steps.get(&drv), Some(Status::Pending)) {
                if s.done() == 0 && s.running.is_empty() {
                    s.clock.end("first step assigned");
                }
                s.progress
                    .event(&format!("building {} on {worker}", short_name(&drv)));
                s.running.insert(drv.clone(), worker.clone());
                s.progress.update(s.done(), &s.running);
            }
        }),
        StepEvent::Unassigned { drv } => with(session, |s| {
            s.running.remove(&drv);
            s.progress.update(s.done(), &s.running);
        }),
        StepEvent::Refused { requester, reason } => with(session, |s| {
            if requester != s.requester {
                return;
            }
            let pending: Vec<String> = s
                .steps
                .iter()
                .filter(|(_, status)| matches!(status, Status::Pending))
                .map(|(drv, _)| drv.clone())
                .collect();
            for drv in pending {
                let worker = "the coordinator".to_owned();
                let reason = reason.clone();
                s.settle(&drv, Status::Failed { worker, reason });
            }
        }),
        StepEvent::Log { drv, line, .. } => with(session, |s| {
            if s.steps.contains_key(&drv) {
                s.progress.log_line(&drv, &line);
                let tail = s.logs.entry(drv.clone()).or_default();
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
            }
        }),
    }
}

/// Turn the command-line target into root derivations.
async fn resolve_target(target: &std::path::Path, attrs: &[String]) -> anyhow::Result<Vec<String>> {
    let text = target.to_string_lossy();
    if text.ends_with(".drv") {
        if !attrs.is_empty() {
            anyhow::bail!("-A/--attr applies to Nix files, not to a .drv path");
        }
        if !target.is_file() {
            anyhow::bail!("derivation {text} does not exist");
        }
        return Ok(vec![text.into_owned()]);
    }
    if !target.exists() {
        anyhow::bail!("{text}: no such file");
    }
    let drvs = nixspace_nix_tools::instantiate(target, attrs).await?;
    if drvs.is_empty() {
        anyhow::bail!("{text} evaluates to no derivation");
    }
    Ok(drvs)
}

fn print_outputs(roots: &[String], plan: &Plan, built: &BTreeMap<String, Vec<String>>) {
    for root in roots {
        match built.get(root) {
            Some(outputs) => outputs.iter().for_each(|o| println!("{o}")),
            None => plan
                .known_outputs(root)
                .iter()
                .for_each(|o| println!("{o}")),
        }
    }
}

fn report(roots: &[String], plan: &Plan, s: &Session) -> anyhow::Result<ExitCode> {
    let mut built = BTreeMap::new();
    let mut failures = Vec::new();
    for (drv, status) in &s.steps {
        match status {
            Status::Built(outputs) => {
                built.insert(drv.clone(), outputs.clone());
            }
            Status::Failed { worker, reason } => failures.push((drv, worker, reason)),
            Status::Pending => {}
        }
    }
    if s.stuck {
        for (drv, reason) in &s.unschedulable {
            eprintln!("error: {} is unschedulable: {reason}", short_name(drv));
        }
        eprintln!(
            "nixspace: the build cannot finish: no connected worker can take {} step(s); start a worker that can, or raise --wait-for-workers",
            s.unschedulable.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    if failures.is_empty() {
        print_outputs(roots, plan, &built);
        return Ok(ExitCode::SUCCESS);
    }
    // Root causes first: failures not caused by another failure.
    failures.sort_by_key(|(_, _, reason)| reason.starts_with("dependency "));
    for (drv, worker, reason) in &failures {
        let at = if worker.is_empty() {
            String::new()
        } else {
            format!(" on {worker}")
        };
        eprintln!("error: {}{at}: {reason}", short_name(drv));
        if let Some(tail) = s.logs.get(*drv).filter(|t| !t.is_empty()) {
            eprintln!("  last {} log lines of {drv}:", tail.len());
            for line in tail {
                eprintln!("  > {line}");
            }
        }
    }
    eprintln!(
        "nixspace: {} of {} steps failed",
        failures.len(),
        s.steps.len()
    );
    Ok(ExitCode::FAILURE)
}
