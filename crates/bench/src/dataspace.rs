//! `nixspace bench dataspace`: the raw dataspace, without the planner's logic: how many
//! assertions per second an observer sees arrive, how many retractions per second it sees
//! go, and how many messages per second it receives, with the dataspace in this process
//! and with a `nixspace up` child reached over its unix socket (gatekeeper, relay and the
//! role's caveat included, as workers and frontends reach it).

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_protocol::{on_retraction, store};
use nixspace_space::{Role, Route};
use syndicate::actor::{Account, Activation, Actor, ActorResult, AnyValue, Cap, FacetRef, Handle};
use syndicate::dataspace::Dataspace;
use syndicate::enclose;
use syndicate_macros::{during, on_message};
use tokio::sync::Notify;

use crate::error::BenchError;
use crate::measure::Stats;
use crate::processes::{spawn_up, Scratch};

/// Assertions, retractions and messages per second through a dataspace.
///
/// Per run: asserts COUNT distinct small records (`<want path store>`) in one turn and
/// waits until an observer in the same client has seen them all, retracts them and waits
/// until it has seen them all go, then sends COUNT messages and waits until it has received
/// them. Once with the dataspace in this process, once through a `nixspace up` child's
/// unix socket. Prints min/median/max of the rates over --runs.
#[derive(Args, Debug)]
pub struct DataspaceArgs {
    /// Records asserted, retracted and sent per run.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// What the observer has seen so far.
#[derive(Default)]
struct Tally {
    asserted: AtomicUsize,
    retracted: AtomicUsize,
    messages: AtomicUsize,
    changed: Notify,
}

impl Tally {
    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    async fn wait(&self, counter: &AtomicUsize, target: usize) -> Result<(), BenchError> {
        let limit = Duration::from_secs(120);
        tokio::time::timeout(limit, async {
            while counter.load(Ordering::Relaxed) < target {
                self.changed.notified().await;
            }
        })
        .await
        .map_err(|_| BenchError::Timeout {
            what: format!("the observer did not see {target} events"),
            limit,
        })
    }
}

/// A client actor with an observer on the dataspace, driven from outside.
pub(crate) struct Client {
    facet: FacetRef,
    ds: Arc<Cap>,
    tally: Arc<Tally>,
    handles: Arc<Mutex<Vec<Handle>>>,
}

/// The client's setup: observe `<want $path _>` assertions and messages, counting them;
/// hand the facet and the dataspace to `ready`.
fn observe(
    tally: Arc<Tally>,
    ready: tokio::sync::oneshot::Sender<(FacetRef, Arc<Cap>)>,
) -> impl FnOnce(&mut Activation, Arc<Cap>) -> ActorResult {
    move |t, ds| {
        enclose!((tally) during!(t, ds, <want $_path _>, |t: &mut Activation| {
            tally.bump(&tally.asserted);
            on_retraction(t, enclose!((tally) move |_t| {
                tally.bump(&tally.retracted);
                Ok(())
            }));
            Ok(())
        }));
        enclose!((tally) on_message!(t, ds, <want $_path _>, |_t: &mut Activation| {
            tally.bump(&tally.messages);
            Ok(())
        }));
        let _ = ready.send((t.facet_ref(), ds));
        Ok(())
    }
}

impl Client {
    /// Run `f` in a turn of the client's actor.
    fn turn(&self, f: impl FnOnce(&mut Activation, &Arc<Cap>)) -> Result<(), BenchError> {
        let account = Account::new(Some(AnyValue::symbol("bench")), None);
        let ds = Arc::clone(&self.ds);
        if self.facet.activate(&account, None, move |t| {
            f(t, &ds);
            Ok(())
        }) {
            Ok(())
        } else {
            Err(BenchError::Client("benchmark client stopped"))
        }
    }

    /// One run: the time to see `n` assertions arrive, `n` retractions, `n` messages.
    // A poisoned handle list means a turn panicked: the run is void, and so is the benchmark.
    #[allow(clippy::expect_used)]
    async fn run(&self, n: usize, run: usize) -> Result<[Duration; 3], BenchError> {
        let want = |i: usize| store::Want {
            path: format!("/nix/store/{run:08}{i:024}-bench"),
            store: "bench".to_owned(),
        };
        let t0 = Instant::now();
        let handles = Arc::clone(&self.handles);
        self.turn(move |t, ds| {
            let mut h = handles.lock().expect("handles");
            h.extend((0..n).filter_map(|i| ds.assert(t, &want(i))));
        })?;
        self.tally.wait(&self.tally.asserted, (run + 1) * n).await?;
        let asserted = t0.elapsed();

        let t0 = Instant::now();
        let handles = Arc::clone(&self.handles);
        self.turn(move |t, _| {
            for h in handles.lock().expect("handles").drain(..) {
                t.retract(h);
            }
        })?;
        self.tally
            .wait(&self.tally.retracted, (run + 1) * n)
            .await?;
        let retracted = t0.elapsed();

        let t0 = Instant::now();
        self.turn(move |t, ds| {
            for i in 0..n {
                ds.message(t, &want(i));
            }
        })?;
        self.tally.wait(&self.tally.messages, (run + 1) * n).await?;
        Ok([asserted, retracted, t0.elapsed()])
    }
}

/// Run `nixspace bench dataspace`.
pub async fn run(args: DataspaceArgs) -> Result<ExitCode, BenchError> {
    if args.count == 0 || args.runs == 0 {
        return Err(BenchError::Arguments(
            "--count and --runs must be at least 1",
        ));
    }
    println!(
        "nixspace bench dataspace: {} records per run, {} runs (rates per second: min / median / max)",
        args.count, args.runs
    );
    print_heading();
    let local = in_process().await?;
    report("in process", &local, args.count, args.runs).await?;
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-bench-")?;
    let remote = async {
        let state = tmp.path().join("state");
        let up = ["--state-dir", state.to_str().unwrap_or("state")];
        spawn_up(&exe, &["--log-level", "warn"], &dir, &up, &mut children).await?;
        over_socket(&dir).await
    }
    .await;
    let result = match remote {
        Ok(client) => report("unix socket (nixspace up)", &client, args.count, args.runs)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    children.stop().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// The table's heading.
pub(crate) fn print_heading() {
    println!(
        "{:<28} {:>26} {:>26} {:>26}",
        "", "assert + observe", "retract", "messages"
    );
}

/// Measure `runs` runs of `count` records through `client`'s dataspace (a client new to
/// it: the observer counts from zero) and print a row of
/// the table; the median rates per second (assertions, retractions, messages).
pub(crate) async fn report(
    name: &str,
    client: &Client,
    count: usize,
    runs: usize,
) -> Result<[f64; 3], BenchError> {
    let mut times: [Vec<Duration>; 3] = Default::default();
    for run in 0..runs {
        for (kind, took) in client.run(count, run).await?.into_iter().enumerate() {
            times[kind].push(took);
        }
    }
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    let stats: Vec<Stats> = times.iter().map(|t| Stats::of(t)).collect();
    let rates: Vec<String> = stats
        .iter()
        .map(|s| {
            // The fastest run has the highest rate.
            format!(
                "{:.1}k / {:.1}k / {:.1}k",
                rate(s.max) / 1e3,
                rate(s.median) / 1e3,
                rate(s.min) / 1e3
            )
        })
        .collect();
    println!(
        "{name:<28} {:>26} {:>26} {:>26}",
        rates[0], rates[1], rates[2]
    );
    Ok([0, 1, 2].map(|kind| rate(stats[kind].median)))
}

/// A dataspace in its own actor in this process, and a client actor beside it.
async fn in_process() -> Result<Client, BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _host = Actor::top(None, move |t| {
        let ds = Dataspace::new(t, Some(AnyValue::symbol("bench")));
        // Nothing but the dataspace lives here: keep the actor from being stopped as inert.
        let _keep = t.prevent_inert_check();
        let _ = tx.send(ds);
        Ok(())
    });
    let ds = rx
        .await
        .map_err(|_| BenchError::Client("in-process dataspace did not start"))?;
    let tally = Arc::new(Tally::default());
    let (ready, client) = tokio::sync::oneshot::channel();
    let body = observe(Arc::clone(&tally), ready);
    let _client = Actor::top(None, move |t| body(t, ds));
    client_from(tally, client).await
}

/// A client joined to the dataspace in `dir` over its unix socket (submit role).
pub(crate) async fn over_socket(dir: &Path) -> Result<Client, BenchError> {
    let route = Route::read(&Role::Submit.route_file(dir))?;
    let tally = Arc::new(Tally::default());
    let (ready, client) = tokio::sync::oneshot::channel();
    let _actor = nixspace_space::join::join(&route, observe(Arc::clone(&tally), ready)).await?;
    client_from(tally, client).await
}

async fn client_from(
    tally: Arc<Tally>,
    ready: tokio::sync::oneshot::Receiver<(FacetRef, Arc<Cap>)>,
) -> Result<Client, BenchError> {
    let (facet, ds) = ready
        .await
        .map_err(|_| BenchError::Client("benchmark client did not start"))?;
    Ok(Client {
        facet,
        ds,
        tally,
        handles: Arc::default(),
    })
}
