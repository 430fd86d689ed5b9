//! A picture of a dataspace for `nixspace status`: what is asserted, and the
//! report (table or JSON) made from it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::progress::short_name;

/// What is known about one connected worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Its machine.
    pub host: String,
    /// Platforms it builds for.
    pub systems: Vec<String>,
    /// Features it offers.
    pub features: Vec<String>,
    /// Steps it builds at once.
    pub max_jobs: i64,
    /// Steps it holds beyond those, waiting for a slot.
    pub hold: i64,
    /// Relative speed.
    pub speed: f64,
    /// Bytes of memory it offers its builds together (0: not said).
    pub memory: u64,
    /// The most bytes one build may use there (0: no limit of its own).
    pub build_memory: u64,
    /// CPUs it offers.
    pub cpus: u32,
}

/// Where a step stands (one that waits, for its inputs or for a worker, has none).
#[derive(Debug, Clone, PartialEq)]
pub enum StepView {
    /// Being built by this worker.
    Running(String),
    /// Built.
    Built,
    /// Failed, with the reason.
    Failed(String),
}

/// Everything observed so far.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workers by id (a worker process restarted under the same name asserts its record
    /// before the old one's goes).
    pub workers: Replaced<String, WorkerView>,
    /// Free slots by worker id.
    pub offers: Replaced<String, i64>,
    /// Jobs the coordinator keeps, by number.
    pub jobs: Replaced<i64, JobView>,
    /// Demanded steps (with priority) by requester.
    pub demands: BTreeMap<String, BTreeMap<String, i64>>,
    /// Steps whose state is asserted (assigned, built, failed).
    pub steps: BTreeMap<String, StepView>,
    /// Unschedulable steps with the reason.
    pub unschedulable: BTreeMap<String, String>,
    /// Steps a second worker duplicates (stole), with the first worker and the thief.
    pub stolen: BTreeMap<String, (String, String)>,
    /// Store paths being fetched: (path, the store fetching it).
    pub transfers: std::collections::BTreeSet<(String, String)>,
    /// Results the planner discarded (the most recent it keeps asserting): the reason by
    /// (step, worker that reported it).
    pub rejected: BTreeMap<(String, String), String>,
    /// The planner's estimated time to completion of each frontend, in milliseconds.
    pub etas: Replaced<String, u64>,
    /// How many of each frontend's steps wait for a worker with room, as the planner counted
    /// them on its last tick.
    pub queued: Replaced<String, u64>,
    /// How many ready steps wait for a worker with room, per system, as the planner counted
    /// them on its last tick.
    pub queue: Replaced<String, u64>,
}

impl Snapshot {
    /// `worker` was assigned `drv`; a second worker on a running step stole it.
    pub fn assigned(&mut self, drv: &str, worker: &str) {
        if let Some(StepView::Running(first)) = self.steps.get(drv) {
            if first != worker {
                self.stolen
                    .insert(drv.to_owned(), (first.clone(), worker.to_owned()));
                return;
            }
        }
        self.steps
            .insert(drv.to_owned(), StepView::Running(worker.to_owned()));
    }

    /// `worker`'s assignment of `drv` was withdrawn.
    pub fn unassigned(&mut self, drv: &str, worker: &str) {
        if let Some((first, thief)) = self.stolen.remove(drv) {
            // The other one goes on building it.
            let other = if thief == worker { first } else { thief };
            if self.steps.get(drv) == Some(&StepView::Running(worker.to_owned())) {
                self.steps.insert(drv.to_owned(), StepView::Running(other));
            }
            return;
        }
        self.clear_step(drv, &StepView::Running(worker.to_owned()));
    }

    /// Forget a step's state if it is still `view` (a newer state may have
    /// replaced it already).
    pub fn clear_step(&mut self, drv: &str, view: &StepView) {
        if self.steps.get(drv) == Some(view) {
            self.steps.remove(drv);
        }
    }

    /// The report for people or scripts.
    pub fn report(&self) -> Report {
        let workers = self
            .workers
            .newest_each()
            .map(|(id, w)| {
                let thefts = self
                    .stolen
                    .iter()
                    .filter(|(_, (_, thief))| thief == id)
                    .map(|(d, _)| d.clone());
                let building: Vec<String> = self
                    .steps
                    .iter()
                    .filter(|(_, v)| matches!(v, StepView::Running(r) if r == id))
                    .map(|(d, _)| d.clone())
                    .chain(thefts)
                    .collect();
                // Its offer counts the steps it may still take, to build or to hold. The
                // numbers are the worker's own: saturating, as they may be anything.
                let capacity = w.max_jobs.saturating_add(w.hold);
                let free = self.offers.newest(id).copied().unwrap_or(capacity);
                let taken = capacity.saturating_sub(free);
                WorkerReport {
                    id: id.clone(),
                    host: w.host.clone(),
                    systems: w.systems.clone(),
                    features: w.features.clone(),
                    slots_total: w.max_jobs,
                    slots_used: taken.min(w.max_jobs),
                    held: taken.saturating_sub(w.max_jobs).max(0),
                    speed: w.speed,
                    memory: w.memory,
                    build_memory: w.build_memory,
                    cpus: w.cpus,
                    building,
                }
            })
            .collect();
        let demands = self
            .demands
            .iter()
            .map(|(requester, steps)| {
                let mut d = DemandReport {
                    requester: requester.clone(),
                    priority: steps.values().copied().max().unwrap_or(0),
                    steps: steps.len(),
                    eta_seconds: self.etas.newest(requester).map(|ms| *ms as f64 / 1000.0),
                    ..DemandReport::default()
                };
                let mut unsettled = 0;
                for drv in steps.keys() {
                    match self.steps.get(drv) {
                        Some(StepView::Built) => d.built += 1,
                        Some(StepView::Running(_)) => d.running += 1,
                        Some(StepView::Failed(_)) => d.failed += 1,
                        None => unsettled += 1,
                    }
                }
                // The planner's count is as of its last tick: never more than those unsettled.
                let queued = self.queued.newest(requester).copied().unwrap_or(0);
                d.queued = usize::try_from(queued).unwrap_or(usize::MAX).min(unsettled);
                d.waiting = unsettled - d.queued;
                d
            })
            .collect();
        let queue = self
            .queue
            .newest_each()
            .map(|(system, &n)| (system.clone(), usize::try_from(n).unwrap_or(usize::MAX)))
            .collect();
        Report {
            workers,
            demands,
            jobs: self
                .jobs
                .newest_each()
                .map(|(&id, job)| JobReport {
                    id,
                    job: job.clone(),
                })
                .collect(),
            queue,
            unschedulable: self.unschedulable.clone(),
            stolen: self
                .stolen
                .iter()
                .map(|(drv, (from, by))| StealReport {
                    drv: drv.clone(),
                    from: from.clone(),
                    by: by.clone(),
                })
                .collect(),
            transfers: self
                .transfers
                .iter()
                .map(|(path, into)| TransferReport {
                    path: path.clone(),
                    into: into.clone(),
                })
                .collect(),
            rejected: self
                .rejected
                .iter()
                .map(|((drv, worker), reason)| RejectedReport {
                    drv: drv.clone(),
                    worker: worker.clone(),
                    reason: reason.clone(),
                })
                .collect(),
        }
    }
}

/// One worker's line.
#[derive(Debug, Serialize)]
pub struct WorkerReport {
    id: String,
    host: String,
    systems: Vec<String>,
    features: Vec<String>,
    slots_used: i64,
    slots_total: i64,
    /// Steps given to it that wait for one of its slots.
    held: i64,
    speed: f64,
    /// Bytes of memory offered to its builds together (0: not said).
    memory: u64,
    /// The most bytes one build may use (0: no limit of its own).
    build_memory: u64,
    cpus: u32,
    building: Vec<String>,
}

/// One frontend's progress.
#[derive(Debug, Default, Serialize)]
pub struct DemandReport {
    requester: String,
    priority: i64,
    steps: usize,
    built: usize,
    running: usize,
    queued: usize,
    waiting: usize,
    failed: usize,
    /// The planner's estimate of the time its unfinished steps take, if it made one.
    eta_seconds: Option<f64>,
}

/// A job the coordinator keeps, as its `<job …>` record says.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    /// Its name.
    pub name: String,
    /// `pending`, `built`, `failed` or `cancelled`.
    pub status: String,
    /// Its steps built so far.
    pub built: i64,
    /// Its steps failed so far.
    pub failed: i64,
    /// Its steps (0 until planned).
    pub total: i64,
}

/// One job's line.
#[derive(Debug, Serialize)]
pub struct JobReport {
    id: i64,
    #[serde(flatten)]
    job: JobView,
}

/// Records a participant replaces by asserting the new one before it retracts the old (a
/// worker's offer, a job's progress): every one asserted, per key, oldest first, so that the
/// newest is the one shown whichever order the two changes come in.
#[derive(Debug)]
pub struct Replaced<K, V> {
    by_key: BTreeMap<K, Vec<V>>,
}

impl<K, V> Default for Replaced<K, V> {
    fn default() -> Self {
        Replaced {
            by_key: BTreeMap::new(),
        }
    }
}

impl<K: Ord, V: PartialEq> Replaced<K, V> {
    /// `value` was asserted for `key`.
    pub fn asserted(&mut self, key: K, value: V) {
        self.by_key.entry(key).or_default().push(value);
    }

    /// `value` was retracted for `key` (the oldest equal one, as it came first).
    pub fn retracted(&mut self, key: &K, value: &V) {
        if let Some(values) = self.by_key.get_mut(key) {
            if let Some(at) = values.iter().position(|v| v == value) {
                values.remove(at);
            }
            if values.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// The newest value of `key`.
    pub fn newest(&self, key: &K) -> Option<&V> {
        self.by_key.get(key).and_then(|v| v.last())
    }

    /// Each key with its newest value.
    pub fn newest_each(&self) -> impl Iterator<Item = (&K, &V)> {
        self.by_key
            .iter()
            .filter_map(|(k, v)| v.last().map(|v| (k, v)))
    }
}

/// A step being duplicated by a faster worker.
#[derive(Debug, Serialize)]
pub struct StealReport {
    drv: String,
    /// The worker that started it.
    from: String,
    /// The faster worker that stole it.
    by: String,
}

/// What `nixspace status` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    workers: Vec<WorkerReport>,
    demands: Vec<DemandReport>,
    /// Submitted jobs the coordinator keeps (pending and recently ended).
    jobs: Vec<JobReport>,
    /// Ready steps per system.
    queue: BTreeMap<String, usize>,
    /// Steps no worker can take, with the reason.
    unschedulable: BTreeMap<String, String>,
    /// Steps being duplicated by faster workers.
    stolen: Vec<StealReport>,
    /// Store paths being fetched into a store.
    transfers: Vec<TransferReport>,
    /// Workers' results the planner discarded (outputs other than the step's).
    rejected: Vec<RejectedReport>,
}

/// A worker's result the planner did not believe.
#[derive(Debug, Serialize)]
pub struct RejectedReport {
    drv: String,
    /// The worker that reported it.
    worker: String,
    /// Why it was discarded.
    reason: String,
}

/// A store path on its way into a store.
#[derive(Debug, Serialize)]
pub struct TransferReport {
    path: String,
    /// The store fetching it.
    into: String,
}

/// A worker's slots for people: used of total, and the steps it holds beyond them
/// (`4/4+1`).
fn slots_text(w: &WorkerReport) -> String {
    match w.held {
        0 => format!("{}/{}", w.slots_used, w.slots_total),
        held => format!("{}/{}+{held}", w.slots_used, w.slots_total),
    }
}

/// A worker's memory for people: the total in MiB, and the per-build limit if it has one
/// (`2048M/512M`); `-` when it said none.
fn memory_text(memory: u64, build_memory: u64) -> String {
    let total = match memory {
        0 => "-".to_owned(),
        m => format!("{}M", m >> 20),
    };
    match build_memory {
        0 => total,
        one => format!("{total}/{}M", one >> 20),
    }
}

fn list(xs: &[String]) -> String {
    if xs.is_empty() {
        "-".to_owned()
    } else {
        xs.join(",")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "workers: {}", self.workers.len())?;
        if !self.workers.is_empty() {
            writeln!(
                f,
                "  {:<20} {:<12} {:<16} {:<16} {:>7} {:>6} {:>16} {:>4}  BUILDING",
                "ID", "HOST", "SYSTEMS", "FEATURES", "SLOTS", "SPEED", "MEMORY", "CPUS"
            )?;
        }
        for w in &self.workers {
            let building: Vec<&str> = w.building.iter().map(|d| short_name(d)).collect();
            writeln!(
                f,
                "  {:<20} {:<12} {:<16} {:<16} {:>7} {:>6} {:>16} {:>4}  {}",
                w.id,
                w.host,
                list(&w.systems),
                list(&w.features),
                slots_text(w),
                w.speed,
                memory_text(w.memory, w.build_memory),
                w.cpus,
                if building.is_empty() {
                    "-".to_owned()
                } else {
                    building.join(", ")
                }
            )?;
        }
        writeln!(f, "demands: {}", self.demands.len())?;
        if !self.demands.is_empty() {
            writeln!(
                f,
                "  {:<28} {:>4} {:>6} {:>6} {:>8} {:>7} {:>8} {:>7} {:>8}",
                "REQUESTER",
                "PRIO",
                "STEPS",
                "BUILT",
                "RUNNING",
                "QUEUED",
                "WAITING",
                "FAILED",
                "ETA"
            )?;
        }
        for d in &self.demands {
            let eta = d
                .eta_seconds
                .map_or("-".to_owned(), |s| format!("{}s", s.ceil()));
            writeln!(
                f,
                "  {:<28} {:>4} {:>6} {:>6} {:>8} {:>7} {:>8} {:>7} {:>8}",
                d.requester,
                d.priority,
                d.steps,
                d.built,
                d.running,
                d.queued,
                d.waiting,
                d.failed,
                eta
            )?;
        }
        if !self.jobs.is_empty() {
            writeln!(f, "jobs: {}", self.jobs.len())?;
            for j in &self.jobs {
                let failed = match j.job.failed {
                    0 => String::new(),
                    n => format!(", {n} failed"),
                };
                writeln!(
                    f,
                    "  #{} {} {}: {}/{} built{failed}",
                    j.id, j.job.name, j.job.status, j.job.built, j.job.total
                )?;
            }
        }
        let queued: usize = self.queue.values().sum();
        write!(f, "queue: {queued} ready")?;
        for (system, n) in &self.queue {
            write!(f, "\n  {system}: {n}")?;
        }
        if !self.unschedulable.is_empty() {
            write!(f, "\nunschedulable: {}", self.unschedulable.len())?;
            for (drv, reason) in &self.unschedulable {
                write!(f, "\n  {}: {reason}", short_name(drv))?;
            }
        }
        if !self.transfers.is_empty() {
            write!(f, "\ntransfers: {}", self.transfers.len())?;
            for t in &self.transfers {
                write!(f, "\n  {} -> {}", short_name(&t.path), t.into)?;
            }
        }
        if !self.stolen.is_empty() {
            write!(f, "\nstolen: {}", self.stolen.len())?;
            for s in &self.stolen {
                write!(f, "\n  {}: {} -> {}", short_name(&s.drv), s.from, s.by)?;
            }
        }
        if !self.rejected.is_empty() {
            write!(f, "\nrejected results: {}", self.rejected.len())?;
            for r in &self.rejected {
                write!(
                    f,
                    "\n  {} from {}: {}",
                    short_name(&r.drv),
                    r.worker,
                    r.reason
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot with worker `w` of `max_jobs` slots, holding `hold` more.
    fn with_worker(max_jobs: i64, hold: i64) -> Snapshot {
        let mut s = Snapshot::default();
        s.workers.asserted(
            "w".into(),
            WorkerView {
                host: "h".into(),
                systems: vec![],
                features: vec![],
                max_jobs,
                hold,
                speed: 1.0,
                memory: 0,
                build_memory: 0,
                cpus: 1,
            },
        );
        s
    }

    #[test]
    fn a_frontends_waiting_steps_are_split_by_the_planners_count() {
        let mut s = Snapshot::default();
        let steps = ["a", "b", "c", "d"];
        s.demands.insert(
            "f".into(),
            steps.iter().map(|d| (d.to_string(), 0)).collect(),
        );
        s.steps.insert("a".into(), StepView::Built);
        s.steps.insert("b".into(), StepView::Running("w".into()));
        let demand = |s: &Snapshot| serde_json::to_value(s.report()).unwrap()["demands"][0].clone();
        assert_eq!(
            (demand(&s)["queued"].clone(), demand(&s)["waiting"].clone()),
            (0.into(), 2.into())
        );
        s.queued.asserted("f".into(), 1);
        s.queue.asserted("x86_64-linux".into(), 1);
        assert_eq!(
            (demand(&s)["queued"].clone(), demand(&s)["waiting"].clone()),
            (1.into(), 1.into())
        );
        let report = serde_json::to_value(s.report()).unwrap();
        assert_eq!(report["queue"]["x86_64-linux"], 1, "{report}");
        // A count from the tick before the last step ran: no more than those not settled.
        s.queued.asserted("f".into(), 5);
        assert_eq!(
            (demand(&s)["queued"].clone(), demand(&s)["waiting"].clone()),
            (2.into(), 0.into())
        );
    }

    #[test]
    fn a_replaced_offer_shows_the_new_one_whichever_goes_first() {
        let mut s = with_worker(2, 0);
        let used = |s: &Snapshot| {
            serde_json::to_value(s.report()).unwrap()["workers"][0]["slots_used"].clone()
        };
        s.offers.asserted("w".into(), 2);
        assert_eq!(used(&s), 0);
        // As a worker replaces its offer: the new one asserted, then the old one retracted.
        s.offers.asserted("w".into(), 1);
        s.offers.retracted(&"w".into(), &2);
        assert_eq!(used(&s), 1);
        s.offers.asserted("w".into(), 1);
        s.offers.retracted(&"w".into(), &1);
        assert_eq!(used(&s), 1, "the same value offered again");
    }

    #[test]
    fn a_worker_that_holds_steps_shows_its_slots_and_what_it_holds() {
        let mut s = with_worker(2, 1);
        let line = |s: &Snapshot| {
            let w = serde_json::to_value(s.report()).unwrap()["workers"][0].clone();
            (w["slots_used"].clone(), w["held"].clone())
        };
        s.offers.asserted("w".into(), 3);
        assert_eq!(line(&s), (0.into(), 0.into()));
        s.offers.asserted("w".into(), 1);
        s.offers.retracted(&"w".into(), &3);
        assert_eq!(line(&s), (2.into(), 0.into()));
        s.offers.asserted("w".into(), 0);
        s.offers.retracted(&"w".into(), &1);
        assert_eq!(line(&s), (2.into(), 1.into()));
        assert!(s.report().to_string().contains(" 2/2+1 "), "{}", s.report());
    }

    #[test]
    fn a_worker_announcing_extreme_numbers_does_not_overflow_the_report() {
        let mut s = with_worker(i64::MAX, i64::MAX);
        s.offers.asserted("w".into(), i64::MIN);
        let w = serde_json::to_value(s.report()).unwrap()["workers"][0].clone();
        assert_eq!(w["slots_used"], i64::MAX, "{w}");
        // Positive control: ordinary numbers give ordinary figures.
        let mut s = with_worker(2, 1);
        s.offers.asserted("w".into(), 0);
        let w = serde_json::to_value(s.report()).unwrap()["workers"][0].clone();
        assert_eq!(
            (w["slots_used"].clone(), w["held"].clone()),
            (2.into(), 1.into())
        );
    }

    #[test]
    fn a_second_assignment_shows_as_stolen_until_one_builder_is_left() {
        let mut s = Snapshot::default();
        s.assigned("a.drv", "slow");
        s.assigned("a.drv", "fast");
        let report = serde_json::to_value(s.report()).unwrap();
        assert_eq!(
            report["stolen"],
            serde_json::json!([{"drv": "a.drv", "from": "slow", "by": "fast"}])
        );
        assert!(s.report().to_string().contains("a.drv: slow -> fast"));
        // The slow one is withdrawn (say it left): the thief goes on alone.
        s.unassigned("a.drv", "slow");
        assert!(s.stolen.is_empty());
        assert_eq!(s.steps["a.drv"], StepView::Running("fast".into()));
        s.unassigned("a.drv", "fast");
        assert!(s.steps.is_empty());
    }

    #[test]
    fn rejected_results_show_with_the_worker_and_the_reason() {
        let mut s = Snapshot::default();
        assert!(!s.report().to_string().contains("rejected"));
        s.rejected.insert(
            ("/nix/store/abc-a.drv".into(), "liar".into()),
            "output out reported as /nix/store/x".into(),
        );
        let report = serde_json::to_value(s.report()).unwrap();
        assert_eq!(
            report["rejected"],
            serde_json::json!([{
                "drv": "/nix/store/abc-a.drv",
                "worker": "liar",
                "reason": "output out reported as /nix/store/x"
            }])
        );
        let text = s.report().to_string();
        assert!(text.contains("rejected results: 1"), "{text}");
        assert!(text.contains("from liar: output out reported as"), "{text}");
    }

    #[test]
    fn a_frontends_estimate_shows_with_its_progress() {
        let mut s = Snapshot::default();
        s.demands
            .entry("build-1".into())
            .or_default()
            .insert("a.drv".into(), 0);
        s.etas.asserted("build-1".into(), 61_500);
        let report = serde_json::to_value(s.report()).unwrap();
        assert_eq!(report["demands"][0]["eta_seconds"], 61.5);
        assert!(s.report().to_string().contains("62s"), "{}", s.report());
    }

    #[test]
    fn paths_being_fetched_show_as_transfers() {
        let mut s = Snapshot::default();
        s.transfers
            .insert(("/nix/store/abc-foo".into(), "w2".into()));
        let report = serde_json::to_value(s.report()).unwrap();
        assert_eq!(
            report["transfers"],
            serde_json::json!([{"path": "/nix/store/abc-foo", "into": "w2"}])
        );
        assert!(s.report().to_string().contains("transfers: 1"));
    }
}
