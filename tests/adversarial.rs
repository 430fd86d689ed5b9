//! Adversarial participants against a real `nixspace up` (and, for the Observe bypass, a
//! standalone syndicate-server): a submitter or a worker that observes `Observe` assertions
//! to obtain other participants' observer entities and publish forged captures straight into
//! them. Every negative check comes with a positive control that would have seen the thing.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use nixspace_nix_formats::derivation::{hash_placeholder, Derivation};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_protocol::build;
use nixspace_space::{Role, Route};
use nixspace_test_support::dataspace::{
    assigned, built, fake_drv, offer, poll_until, route, runtime, worker_building, Session, ANSWER,
};
use nixspace_test_support::process::run;
use nixspace_test_support::syndicate_server::ExternalSpace;
use nixspace_test_support::Space;
use preserves_schema::{Parse, Unparse};
use syndicate::actor::{ActorHandle, AnyValue, Cap};
use syndicate::schemas::dataspace::Observe;
use syndicate::schemas::dataspace_patterns as dp;

/// A platform only the workers of these tests claim.
const SYSTEM: &str = "adversarial-system";

fn demand(drv: &str) -> AnyValue {
    build::Demand {
        drv: drv.to_owned(),
        step: build::StepInfo {
            system: SYSTEM.to_owned(),
            features: vec![],
            input_drvs: vec![],
            settings: nixspace_protocol::BuildSettings::default().to_wire(),
            outputs: vec!["out=".to_owned()],
            memory: 0.into(),
        },
        requester: "adversarial-test".to_owned(),
        priority: 0.into(),
        depth: 0.into(),
        derivation: Vec::new(),
    }
    .unparse()
}

/// A worker for [`SYSTEM`] and the offer that gives it room.
fn worker(id: &str) -> Vec<AnyValue> {
    vec![worker_building(id, SYSTEM, 4), offer(id, 4)]
}

/// A worker's report (a message) that it built `drv` with `output`.
fn report(drv: &str, worker: &str, output: &str) -> AnyValue {
    build::ReportBuilt {
        drv: drv.to_owned(),
        worker: worker.to_owned(),
        outputs: vec![output.to_owned()],
        realisations: vec![],
        usage: vec![],
    }
    .unparse()
}

/// The path a (floating) `out` of `drv` may have: its name with a made-up hash.
fn output_of(drv: &str) -> String {
    let name = drv
        .rsplit_once('/')
        .and_then(|(_, base)| base.split_once('-'))
        .map_or("", |(_, name)| name.trim_end_matches(".drv"));
    fake_output(name)
}

/// An output path that names no real output.
fn fake_output(name: &str) -> String {
    format!("/nix/store/{}-{name}", "1".repeat(32))
}

/// What an attacker got from the dataspace.
#[derive(Default)]
struct Loot {
    /// The label watched by each observer entity handed to us (`*` for anything else).
    observers: Vec<String>,
    /// Forged captures published into those entities.
    forged: usize,
    /// What our own, ordinary observation matched.
    legit: Vec<AnyValue>,
}

/// Join with `route` and observe `Observe` assertions (`<Observe <Observe $pattern $observer>
/// us>`); into every observer entity handed to us, publish the captures its pattern takes
/// from each record of `forged` it matches. Meanwhile observe the records labelled `legit`
/// as any participant may.
async fn attack(
    route: &Route,
    forged: Vec<AnyValue>,
    legit: &str,
) -> (ActorHandle, Arc<Mutex<Loot>>) {
    let loot = Arc::new(Mutex::new(Loot::default()));
    let taken = Arc::clone(&loot);
    let legit = legit.to_owned();
    let actor = nixspace_space::join::join(route, move |t, ds| {
        let thief = t.create_cap(syndicate::during::entity(Arc::clone(&taken)).on_asserted(
            move |loot: &mut Arc<Mutex<Loot>>, t, captures: Vec<AnyValue>| {
                let (Some(pattern), Some(observer)) = (
                    captures.first().and_then(|p| dp::Pattern::parse(p).ok()),
                    captures.get(1).and_then(embedded),
                ) else {
                    return Ok(None);
                };
                let mut loot = loot.lock().map_err(|_| "poisoned")?;
                loot.observers.push(watched_label(&pattern));
                for record in &forged {
                    let mut taken = Vec::new();
                    if captures_of(&pattern, record, &mut taken) {
                        observer.assert(t, &AnyValue::new(taken));
                        loot.forged += 1;
                    }
                }
                Ok(None)
            },
        ));
        ds.assert(
            t,
            &Observe {
                pattern: record_pattern("Observe", vec![bind_anything(), bind_anything()]),
                observer: thief,
            },
        );
        let witness = t.create_cap(syndicate::during::entity(taken).on_asserted(
            |loot: &mut Arc<Mutex<Loot>>, _t, captures: Vec<AnyValue>| {
                let mut loot = loot.lock().map_err(|_| "poisoned")?;
                loot.legit.extend(captures);
                Ok(None)
            },
        ));
        ds.assert(
            t,
            &Observe {
                pattern: dp::Pattern::Bind {
                    pattern: Box::new(record_pattern(&legit, vec![])),
                },
                observer: witness,
            },
        );
        Ok(())
    })
    .await
    .expect("the attacker joins");
    (actor, loot)
}

fn bind_anything() -> dp::Pattern {
    dp::Pattern::Bind {
        pattern: Box::new(dp::Pattern::Discard),
    }
}

/// `<group <rec label> {0: fields[0] …}>`.
fn record_pattern(label: &str, fields: Vec<dp::Pattern>) -> dp::Pattern {
    dp::Pattern::Group {
        type_: dp::GroupType::Rec {
            label: AnyValue::symbol(label.to_owned()),
        },
        entries: fields
            .into_iter()
            .enumerate()
            .map(|(i, p)| (AnyValue::new(i), p))
            .collect(),
    }
}

/// The entity a value embeds.
fn embedded(value: &AnyValue) -> Option<Arc<Cap>> {
    use preserves::ValueImpl;
    value.as_embedded().map(|c| c.into_owned())
}

/// The label of the records a dataspace pattern matches, or `*`.
fn watched_label(pattern: &dp::Pattern) -> String {
    use preserves::ValueImpl;
    match pattern {
        dp::Pattern::Bind { pattern } => watched_label(pattern),
        dp::Pattern::Group {
            type_: dp::GroupType::Rec { label },
            ..
        } => label
            .as_symbol()
            .map(|s| s.into_owned())
            .unwrap_or_default(),
        _ => "*".to_owned(),
    }
}

/// Whether `pattern` matches `value`; the captures it takes, in order, onto `taken` (as the
/// dataspace would deliver them to the pattern's observer).
fn captures_of(pattern: &dp::Pattern, value: &AnyValue, taken: &mut Vec<AnyValue>) -> bool {
    use preserves::ValueImpl;
    match pattern {
        dp::Pattern::Discard => true,
        dp::Pattern::Bind { pattern } => {
            taken.push(value.clone());
            captures_of(pattern, value, taken)
        }
        dp::Pattern::Lit { value: literal } => literal.unparse() == *value,
        dp::Pattern::Group {
            type_: dp::GroupType::Rec { label },
            entries,
        } => {
            value.is_record()
                && value.label() == *label
                && entries.iter().all(|(key, field)| {
                    let index = key
                        .as_signed_integer()
                        .and_then(|i| usize::try_from(&*i).ok());
                    match index {
                        Some(i) if i < value.len() => captures_of(field, &value.index(i), taken),
                        _ => false,
                    }
                })
        }
        dp::Pattern::Group { .. } => false,
    }
}

/// How long to wait for the attacker's observation of `Observe`: everything asserted before
/// it arrives before its own ordinary observation's first match, so this is only a limit.
async fn wait_for_legit(loot: &Mutex<Loot>, what: &str) {
    assert!(
        poll_until(ANSWER, || !loot.lock().unwrap().legit.is_empty()).await,
        "the attacker's own observation of {what} never matched: the check below would prove nothing"
    );
}

/// A submitter observes `Observe` to reach the planner's `worker` observer and announce a
/// worker only it knows: it is handed no entity, the planner never hears of the forged
/// worker, while the submitter's own observation works and a real worker is seen at once.
fn a_submitter_cannot_reach_the_planners_observers(space: &Space) {
    let drv = fake_drv("observe-bypass-by-a-submitter");
    runtime().block_on(async {
        let frontend = Session::join(&route(space, Role::Submit), vec![demand(&drv)])
            .await
            .expect("join as submit");
        let forged = [
            worker("forged-worker"),
            vec![assigned(&drv, "forged-worker")],
        ]
        .concat();
        let (attacker, loot) = attack(&route(space, Role::Submit), forged, "unschedulable").await;
        wait_for_legit(&loot, "unschedulable").await;
        {
            let loot = loot.lock().unwrap();
            assert_eq!(
                loot.observers,
                Vec::<String>::new(),
                "observers handed to a submitter"
            );
            assert_eq!(loot.forged, 0);
        }
        // A real worker for the same platform gets the step: had the forged worker
        // joined, the planner would have given it the step instead (it is faster).
        let _real = Session::join(&route(space, Role::Worker), worker("real"))
            .await
            .expect("join as worker");
        assert!(
            frontend.wait_until(&assigned(&drv, "real"), true).await,
            "the real worker was never given the step"
        );
        assert!(!frontend.sees(&assigned(&drv, "forged-worker")));
        let log = space.log("up");
        assert!(log.contains("worker joined worker=real"), "{log}");
        assert!(!log.contains("forged-worker"), "{log}");
        assert!(log.contains("role=submit value=<Observe"), "{log}");
        attacker.abort();
    });
}

/// A worker observes `Observe` to reach a frontend's (and the planner's) `built` observers
/// and report the step built in its assignee's name: it is handed no entity, the frontend
/// never sees the forged report and the step stays assigned, while the worker's own
/// observation works and the assignee's real report reaches the frontend.
fn a_worker_cannot_reach_a_frontends_observers(space: &Space) {
    let drv = fake_drv("observe-bypass-by-a-worker");
    let forged_output = fake_output("forged");
    let real_output = output_of(&drv);
    runtime().block_on(async {
        let frontend = Session::join(&route(space, Role::Submit), vec![demand(&drv)])
            .await
            .expect("join as submit");
        let real = Session::join(&route(space, Role::Worker), worker("real"))
            .await
            .expect("join as worker");
        assert!(frontend.wait_until(&assigned(&drv, "real"), true).await);
        let forged = vec![built(&drv, "real", &[&forged_output])];
        let (attacker, loot) = attack(&route(space, Role::Worker), forged, "assigned").await;
        wait_for_legit(&loot, "assigned").await;
        {
            let loot = loot.lock().unwrap();
            assert_eq!(
                loot.observers,
                Vec::<String>::new(),
                "observers handed to a worker"
            );
            assert_eq!(loot.forged, 0);
        }
        let done = Session::send(
            &route(space, Role::Worker),
            vec![report(&drv, "real", &real_output)],
        )
        .await
        .expect("join as worker");
        assert!(
            frontend
                .wait_until(&built(&drv, "real", &[&real_output]), true)
                .await,
            "the assignee's report never reached the frontend"
        );
        assert!(frontend.wait_until(&assigned(&drv, "real"), false).await);
        assert!(!frontend.sees(&built(&drv, "real", &[&forged_output])));
        let log = space.log("up");
        assert!(log.contains("role=worker value=<Observe"), "{log}");
        attacker.abort();
        done.leave();
        real.leave();
    });
}

#[test]
fn a_submitter_cannot_reach_the_planners_observers_on_up() {
    a_submitter_cannot_reach_the_planners_observers(&Space::start());
}

#[test]
fn a_submitter_cannot_reach_the_planners_observers_on_a_syndicate_server() {
    a_submitter_cannot_reach_the_planners_observers(&ExternalSpace::start());
}

#[test]
fn a_worker_cannot_reach_a_frontends_observers_on_up() {
    a_worker_cannot_reach_a_frontends_observers(&Space::start());
}

#[test]
fn a_worker_cannot_reach_a_frontends_observers_on_a_syndicate_server() {
    a_worker_cannot_reach_a_frontends_observers(&ExternalSpace::start());
}

/// `nixspace history --json`: the record of `drv`, once `done` holds for it (or the last one
/// seen after [`ANSWER`]).
fn history_of(
    space: &Space,
    drv: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + ANSWER;
    loop {
        let out = run(space.command(&["history", "--json"]), ANSWER);
        assert!(out.status.success(), "{out:?}");
        let steps: Vec<serde_json::Value> =
            serde_json::from_str(&out.stdout).expect("history JSON");
        let step = steps
            .into_iter()
            .find(|s| s["drv"] == drv)
            .unwrap_or_default();
        if done(&step) || std::time::Instant::now() > deadline {
            return step;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A floating content-addressed derivation named `name` with no inputs, for [`SYSTEM`]: its
/// path and its text.
fn ca_derivation(name: &str) -> (String, Vec<u8>) {
    let store = StoreDir::new("/nix/store").unwrap();
    let text = format!(
        r#"Derive([("out","","r:sha256","")],[],[],"{SYSTEM}","/bin/sh",["-c","echo {name} > $out"],[("out","{}")])"#,
        hash_placeholder("out")
    );
    let drv = Derivation::parse(&store, name, text.as_bytes()).unwrap();
    (
        store.print(&drv.drv_path(&store).unwrap()),
        text.into_bytes(),
    )
}

/// The demand of `drv`, to be resolved by the planner from `text`.
fn demand_to_resolve(drv: &str, text: &[u8]) -> AnyValue {
    let mut demand = build::Demand::parse(&demand(drv)).expect("a demand");
    demand.derivation = text.to_vec();
    demand.unparse()
}

#[test]
fn a_submitter_cannot_pass_another_derivation_off_as_a_step() {
    let space = Space::start();
    let (real, text) = ca_derivation("resolved-by-the-planner");
    let forged = fake_drv("forged-text");
    runtime().block_on(async {
        // The same text for another step, then the real one (the positive control): the
        // planner takes demands in the order one connection sent them.
        let frontend = Session::join(
            &route(&space, Role::Submit),
            vec![
                demand_to_resolve(&forged, &text),
                demand_to_resolve(&real, &text),
            ],
        )
        .await
        .expect("join as submit");
        let good = Session::join(&route(&space, Role::Worker), worker("good"))
            .await
            .expect("join as worker");
        // The real step is resolved (to itself: it has no inputs) and given to the worker with
        // its text, which the worker will check again.
        assert!(frontend.wait_until(&given(&real, &text), true).await);
        never_assigned(&frontend, &forged);
        let up = space.log("up");
        assert!(
            up.contains("ignoring a demand") && up.contains("is not taken"),
            "{up}"
        );
        good.leave();
        frontend.leave();
    });
}

/// Check that `session` saw no assignment of step `drv`.
fn never_assigned(session: &Session, drv: &str) {
    let seen = session.with_label("assigned");
    assert!(
        !seen
            .iter()
            .any(|a| nixspace_test_support::dataspace::text(a).contains(drv)),
        "{seen:?}"
    );
}

/// `<assigned drv good … text>`: step `drv` given to worker `good` with its derivation `text`.
fn given(drv: &str, text: &[u8]) -> AnyValue {
    build::Assigned {
        drv: drv.to_owned(),
        worker: "good".to_owned(),
        settings: nixspace_protocol::BuildSettings::default().to_wire(),
        derivation: text.to_vec(),
    }
    .unparse()
}

/// `<inline-derivation drv text>`: a vouch for `text` as `drv`'s inline derivation.
fn vouch(drv: &str, text: &[u8]) -> AnyValue {
    build::InlineDerivation {
        drv: drv.to_owned(),
        derivation: text.to_vec(),
    }
    .unparse()
}

#[test]
fn a_submitter_cannot_vouch_for_an_inline_derivation() {
    let space = Space::start();
    let (_, text) = ca_derivation("sent-inline");
    let forged = fake_drv("vouched-by-a-submitter");
    let vouched = fake_drv("vouched-by-the-trusted");
    runtime().block_on(async {
        // A submitter vouches for a text that is not its step's, and demands the step with it.
        let submitter = Session::join(
            &route(&space, Role::Submit),
            vec![vouch(&forged, &text), demand_to_resolve(&forged, &text)],
        )
        .await
        .expect("join as submit");
        // The positive control: the trusted capability doing the same for another step.
        let trusted = Session::join(
            &route(&space, Role::Trusted),
            vec![vouch(&vouched, &text), demand_to_resolve(&vouched, &text)],
        )
        .await
        .expect("join as trusted");
        let good = Session::join(&route(&space, Role::Worker), worker("good"))
            .await
            .expect("join as worker");
        assert!(trusted.wait_until(&given(&vouched, &text), true).await);
        never_assigned(&trusted, &forged);
        let up = space.log("up");
        assert!(
            up.contains("refused an assertion the role may not make")
                && up.contains("inline-derivation"),
            "{up}"
        );
        good.leave();
        trusted.leave();
        submitter.leave();
    });
}

/// The demand for `drv` whose one output `out` the derivation gives as `path`.
fn demand_with_output(drv: &str, path: &str) -> AnyValue {
    let mut demand = build::Demand::parse(&demand(drv)).expect("a demand");
    demand.step.outputs = vec![format!("out={path}")];
    demand.unparse()
}

#[test]
fn a_lying_worker_is_caught_and_the_step_built_by_another() {
    let space = Space::start_with(&["--metrics", "127.0.0.1:0"]);
    let drv = fake_drv("lied-about");
    let output = output_of(&drv);
    runtime().block_on(async {
        let frontend = Session::join(
            &route(&space, Role::Submit),
            vec![demand_with_output(&drv, &output)],
        )
        .await
        .expect("join as submit");
        let liar = Session::join(&route(&space, Role::Worker), worker("liar"))
            .await
            .expect("join as worker");
        assert!(frontend.wait_until(&assigned(&drv, "liar"), true).await);
        // The liar, assigned the step, reports an output the derivation does not have.
        let lie = Session::send(
            &route(&space, Role::Worker),
            vec![report(&drv, "liar", &fake_output("lied-about-elsewhere"))],
        )
        .await
        .expect("join as worker");
        assert!(
            poll_until(ANSWER, || !frontend.with_label("rejected").is_empty()).await,
            "no rejection: {}",
            space.log("up")
        );
        let rejected = frontend.with_label("rejected");
        let rejection = build::Rejected::parse(&rejected[0]).expect("a rejected record");
        assert_eq!(
            (rejection.drv.as_str(), rejection.worker.as_str()),
            (drv.as_str(), "liar")
        );
        assert!(
            rejection.reason.contains("lied-about-elsewhere"),
            "{rejection:?}"
        );
        // Its result is discarded: nothing built, and it is not given the step again.
        assert!(frontend.with_label("built").is_empty());
        assert!(frontend.wait_until(&assigned(&drv, "liar"), false).await);
        // An honest worker builds it; its report is believed (the positive control: a report
        // of this step can be accepted).
        let honest = Session::join(&route(&space, Role::Worker), worker("honest"))
            .await
            .expect("join as worker");
        assert!(frontend.wait_until(&assigned(&drv, "honest"), true).await);
        let truth = Session::send(
            &route(&space, Role::Worker),
            vec![report(&drv, "honest", &output)],
        )
        .await
        .expect("join as worker");
        assert!(
            frontend
                .wait_until(&built(&drv, "honest", &[&output]), true)
                .await,
            "{}",
            space.log("up")
        );

        // The incident: in `status`, in the history, in the metrics.
        let dir = space.dir();
        let status = run(
            space.command(&["status", "--dir", dir.to_str().expect("utf-8")]),
            ANSWER,
        );
        assert!(status.status.success(), "{status:?}");
        assert!(
            status.stdout.contains("rejected results: 1") && status.stdout.contains("from liar"),
            "{}",
            status.stdout
        );
        let step = history_of(&space, &drv, |s| s["status"] == "built");
        let attempts: Vec<(String, String)> = step["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .map(|a| {
                (
                    a["worker"].as_str().unwrap_or_default().to_owned(),
                    a["outcome"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            attempts,
            vec![
                ("liar".to_owned(), "rejected".to_owned()),
                ("honest".to_owned(), "built".to_owned())
            ],
            "{step}"
        );
        let metrics = nixspace_test_support::http_get(&space.metrics_address(), "/metrics");
        assert!(
            metrics.contains("nixspace_rejected_results_total 1"),
            "{metrics}"
        );
        for session in [truth, honest, lie, liar, frontend] {
            session.leave();
        }
    });
}
