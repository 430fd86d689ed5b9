//! The translator's backend: build operations become a frontend [`BuildSession`] on the
//! dataspace, the cheapest queries are answered from the store's database, and everything
//! else goes to the upstream [`PassThrough`].
//!
//! A build's progress reaches the client as Nix's own frames: a build activity per step
//! attempt (named after the worker), its log lines as results of that activity (or plain
//! messages when the client asked for build logs), the other results the worker's
//! `nix-daemon` sent for the build (its phases) as results of that activity too, and the
//! activities the build started under it with their results, renumbered for the client;
//! waits for a capable worker as messages.
//! A client that leaves during a build withdraws its demands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nixspace_frontend::{
    BuildSession, InlineDerivation, PostBuild, Progress, Report, SessionConfig,
};
use nixspace_nix_formats::derivation::DerivationOutput;
use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::stderr::{activity_type, result_type, Field};
use nixspace_nix_protocol::{
    BasicDerivation, BuildMode, BuildResult, BuildStatus, ClientSettings, DaemonError, DerivedPath,
    LogEvent, NixSerialize, Request, StderrFrame,
};
use nixspace_nix_tools::build_activity::MAX_OPEN_ACTIVITIES;
use nixspace_protocol::{BuildSettings, DrvPath, WorkerId};

use crate::backend::{DaemonBackend, Served};
use crate::build_result::{built_outputs, error_message, result_for};
use crate::client::{Client, ConnError};
use crate::passthrough::PassThrough;
use crate::server::Config;
use crate::trust::Trust;

/// Nix's `lvlInfo`: "building …" messages show at this verbosity and above.
const LVL_INFO: u64 = 3;

/// Serves one client connection for the translator.
pub struct Translator<'a> {
    config: &'a Config,
    upstream: PassThrough,
    /// The client's last `SetOptions`.
    settings: ClientSettings,
}

/// What a build builds: derivations in the store, or one a client sent inline.
enum Roots {
    Stored(Vec<DrvPath>),
    Inline(Box<InlineDerivation>),
}

/// Nix's refusal of an untrusted client's inline input-addressed derivation: its output paths
/// cannot be checked without the derivation closure, which the client did not send.
const NOT_PRIVILEGED: &str = "you are not privileged to build input-addressed derivations";

/// An answer read from the store database.
enum DbAnswer {
    Valid(bool),
    Info(Option<Box<nixspace_nix_protocol::PathInfo>>),
}

impl<'a> Translator<'a> {
    /// Serve with `config`, passing store operations to `upstream`.
    pub fn new(config: &'a Config, upstream: PassThrough) -> Translator<'a> {
        Translator {
            config,
            upstream,
            settings: ClientSettings::default(),
        }
    }

    /// How the client's builds run, in `mode`: its `SetOptions` fields (`maxSilentTime`,
    /// `keepFailed`) and overrides (`timeout`, for everyone as nix-daemon allows; and
    /// `auto-optimise-store` for the trusted). Repairing takes a trusted client, as it does
    /// in nix-daemon.
    fn build_settings(&self, trust: Trust, mode: BuildMode) -> Result<BuildSettings, DaemonError> {
        let mode = match (mode, trust) {
            (BuildMode::Normal, _) => nixspace_protocol::BuildMode::Normal,
            (BuildMode::Check, _) => nixspace_protocol::BuildMode::Check,
            (BuildMode::Repair, Trust::Trusted) => nixspace_protocol::BuildMode::Repair,
            (BuildMode::Repair, Trust::Untrusted) => {
                return Err(DaemonError::new(
                    "repairing is not allowed because you are not in 'trusted-users'",
                ))
            }
        };
        let overrides = &self.settings.overrides;
        let timeout = ["timeout", "build-timeout"]
            .iter()
            .find_map(|name| overrides.get(*name)?.trim().parse().ok())
            .unwrap_or(0);
        let optimise = trust == Trust::Trusted
            && overrides.get("auto-optimise-store").map(String::as_str) == Some("true");
        Ok(BuildSettings {
            mode,
            max_silent_time: self.settings.max_silent_time,
            timeout,
            keep_failed: self.settings.keep_failed,
            optimise,
        })
    }

    /// Build `roots` on the dataspace in `mode`, relaying progress. The outer error ends the
    /// connection (the client left or the stream broke); the inner one is an error for the
    /// client.
    async fn build(
        &mut self,
        client: &mut Client,
        roots: Vec<DrvPath>,
        mode: BuildMode,
    ) -> Result<Result<Report, DaemonError>, ConnError> {
        self.build_on_dataspace(client, Roots::Stored(roots), mode)
            .await
    }

    /// Build `roots` on the dataspace in `mode`, relaying progress (see [`Translator::build`]).
    async fn build_on_dataspace(
        &mut self,
        client: &mut Client,
        roots: Roots,
        mode: BuildMode,
    ) -> Result<Result<Report, DaemonError>, ConnError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let settings = match self.build_settings(client.trust, mode) {
            Ok(settings) => settings,
            Err(e) => return Ok(Err(e)),
        };
        // A trusted client's settings count, as they do in nix-daemon; the untrusted may not
        // set these.
        let overrides = match client.trust {
            Trust::Trusted => self.settings.overrides.clone(),
            Trust::Untrusted => BTreeMap::new(),
        };
        let post_build = match PostBuild::from_settings(&self.config.nix_conf, &overrides) {
            Ok(p) => Arc::new(p),
            Err(e) => return Ok(Err(DaemonError::new(format!("nixspace: {e}")))),
        };
        let config = SessionConfig {
            route: self.config.route.clone(),
            requester: format!(
                "nixspace-translator-{}-{}-{}",
                std::process::id(),
                client.id,
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            priority: self.config.priority,
            patience: self.config.patience,
            reconnect_for: self.config.reconnect_for,
            keep_going: self.settings.keep_going,
            settings,
            pool: self.config.transfers.clone(),
            db: self.config.store_db.clone(),
            post_build,
            substitution: Some(self.substitution_settings(client.trust)),
        };
        let started = match roots {
            Roots::Stored(roots) => BuildSession::start(config, roots).await,
            Roots::Inline(inline) => BuildSession::start_inline(config, *inline).await,
        };
        let mut session = match started {
            Ok(s) => s,
            Err(e) => return Ok(Err(DaemonError::new(format!("nixspace: {e}")))),
        };
        if !session.is_empty() {
            tracing::info!(client = client.id, steps = session.len(), "demanded");
        }
        let mut activities = Activities::default();
        // Whether the client wants builders' output (`-Q` turns it off).
        let build_logs = self.settings.build_verbosity <= self.settings.verbosity;
        loop {
            let next = tokio::select! {
                next = session.next() => next,
                e = client.interrupted() => {
                    if matches!(e, ConnError::ClientLeft) {
                        tracing::info!(client = client.id, "client left during a build; demands withdrawn");
                    }
                    return Err(e);
                }
            };
            match next {
                Ok(Some(progress)) => show(client, &mut activities, progress, build_logs).await?,
                Ok(None) => break,
                Err(e) => return Ok(Err(DaemonError::new(format!("nixspace: {e}")))),
            }
        }
        activities.stop_all(client).await?;
        let report = match session.finish().await {
            Ok(r) => r,
            Err(e) => return Ok(Err(DaemonError::new(format!("nixspace: {e}")))),
        };
        tracing::info!(
            client = client.id,
            failed = report.failures().len(),
            "build finished"
        );
        if !report.unschedulable.is_empty() {
            return Ok(Err(DaemonError::new(
                error_message(&report).unwrap_or_default(),
            )));
        }
        // As nix-daemon's do, the outputs stay rooted for as long as this client is connected
        // (on its upstream connection), not for as long as some worker or transfer is.
        let built = report.failures().is_empty();
        for path in report.outputs.values().flatten().filter(|_| built) {
            let Ok(path) = self.config.store_dir.parse(path) else {
                continue;
            };
            match self
                .upstream
                .call(client, &Request::AddTempRoot(path), false)
                .await?
            {
                Ok(()) => {
                    self.upstream
                        .upstream
                        .reader
                        .read_u64("AddTempRoot reply")
                        .await?;
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(report))
    }

    /// The client's settings as its build's substitution uses them: what nix-daemon takes from
    /// it, so an untrusted client's substituters count only if they are trusted ones (its
    /// warnings were given when it sent them).
    fn substitution_settings(&self, trust: Trust) -> ClientSettings {
        let overrides = match trust {
            Trust::Trusted => self.settings.overrides.clone(),
            Trust::Untrusted => {
                self.config
                    .trust
                    .filter_overrides(&self.settings.overrides)
                    .0
            }
        };
        ClientSettings {
            overrides,
            ..self.settings.clone()
        }
    }

    /// Answer `req` (`IsValidPath` or `QueryPathInfo`) from the store database if there is
    /// one (and the answer is one the negotiated version can carry), else relay it.
    async fn answer_from_db(&mut self, client: &mut Client, req: Request) -> Served {
        let Some(db) = self.config.store_db.clone() else {
            return self.upstream.other(client, req).await;
        };
        let answer = match &req {
            Request::IsValidPath(p) => db.is_valid(p).map(DbAnswer::Valid),
            Request::QueryPathInfo(p)
                if client.writer.version()
                    >= nixspace_nix_protocol::version::QUERY_PATH_INFO_VALID_FLAG =>
            {
                db.path_info(p).map(|i| DbAnswer::Info(i.map(Box::new)))
            }
            _ => return self.upstream.other(client, req).await,
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(client = client.id, error = %e, "relaying a query instead");
                return self.upstream.other(client, req).await;
            }
        };
        let w = &mut client.writer;
        StderrFrame::Last.write_to(w).await?;
        match answer {
            DbAnswer::Valid(valid) => w.write_bool(valid, "IsValidPath reply").await?,
            DbAnswer::Info(None) => w.write_bool(false, "QueryPathInfo reply").await?,
            DbAnswer::Info(Some(info)) => {
                w.write_bool(true, "QueryPathInfo reply").await?;
                info.write_to(w).await?;
            }
        }
        w.flush().await?;
        Ok(())
    }

    /// `BuildPaths` and `BuildPathsWithResults`: derivation outputs become demands; opaque
    /// paths must already be valid (or are made valid by the upstream).
    async fn build_paths_on_dataspace(
        &mut self,
        client: &mut Client,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
        with_results: bool,
    ) -> Served {
        let store_dir = self.config.store_dir.clone();
        let mut roots = Vec::new();
        let mut opaque = Vec::new();
        for p in &paths {
            match p {
                DerivedPath::Built { drv_path, .. } => {
                    roots.push(DrvPath::from(store_dir.print(drv_path)))
                }
                DerivedPath::Opaque(path) => opaque.push(DerivedPath::Opaque(path.clone())),
            }
        }
        if !opaque.is_empty() {
            // Substitution is the upstream's business.
            let req = Request::BuildPaths {
                paths: opaque,
                mode,
            };
            match self.upstream.call(client, &req, false).await? {
                Ok(()) => {
                    self.upstream
                        .upstream
                        .reader
                        .read_u64("BuildPaths reply")
                        .await?;
                }
                Err(e) => return client.error(&e).await,
            }
        }
        let report = match self.build(client, roots, mode).await? {
            Ok(r) => r,
            Err(e) => return client.error(&e).await,
        };
        if !with_results {
            if let Some(msg) = error_message(&report) {
                return client.error(&DaemonError::new(msg)).await;
            }
            StderrFrame::Last.write_to(&mut client.writer).await?;
            client.writer.write_u64(1, "BuildPaths reply").await?;
            client.writer.flush().await?;
            return Ok(());
        }
        StderrFrame::Last.write_to(&mut client.writer).await?;
        client
            .writer
            .write_u64(paths.len() as u64, "results")
            .await?;
        for p in &paths {
            p.write_to(&mut client.writer).await?;
            let res = match p {
                DerivedPath::Built { drv_path, outputs } => {
                    let drv = DrvPath::from(store_dir.print(drv_path));
                    let mut res = result_for(&report, &drv);
                    if res.status.is_success() {
                        let realised = report.realised.get(&drv).cloned().unwrap_or_default();
                        res.built_outputs =
                            built_outputs(&store_dir, drv_path, outputs, realised).await;
                    }
                    res
                }
                DerivedPath::Opaque(_) => BuildResult::new(BuildStatus::AlreadyValid),
            };
            res.write_to(&mut client.writer).await?;
        }
        client.writer.flush().await?;
        Ok(())
    }
}

/// Relay one piece of a build's progress to the client.
async fn show(
    client: &mut Client,
    activities: &mut Activities,
    progress: Progress,
    build_logs: bool,
) -> Result<(), ConnError> {
    match progress {
        Progress::Log { drv, line, .. } => {
            if build_logs {
                client.log(format!("{line}\n")).await?;
            } else {
                // Not verbose: a result of the build activity, which the client shows
                // or not (`nix build -L`).
                let id = activities.of(client, &drv).await?;
                client
                    .event(LogEvent::Result {
                        id,
                        result_type: result_type::BUILD_LOG_LINE,
                        fields: vec![Field::String(line)],
                    })
                    .await?;
            }
        }
        Progress::Activity { drv, worker, event } => {
            activities.relay(client, &drv, &worker, event).await?;
        }
        Progress::Started { drv, worker } => {
            activities.start(client, &drv, worker.as_str()).await?;
        }
        Progress::PostBuildHook { drv, hook } => {
            activities.start_hook(client, &drv, &hook).await?;
        }
        Progress::PostBuildLog { drv, line } => {
            if let Some(id) = activities.hooks.get(&drv).copied() {
                client
                    .event(LogEvent::Result {
                        id,
                        result_type: result_type::POST_BUILD_LOG_LINE,
                        fields: vec![Field::String(line)],
                    })
                    .await?;
            }
        }
        Progress::Built { drv, .. } | Progress::Failed { drv, .. } => {
            activities.stop(client, &drv).await?;
        }
        Progress::Waiting { drv, reason } => {
            client
                .log(format!(
                    "waiting for a nixspace worker able to build '{drv}': {reason}\n"
                ))
                .await?;
        }
        Progress::Lost { why } => {
            tracing::warn!(client = client.id, %why, "lost the dataspace during a build; rejoining");
        }
        Progress::Stopped { .. }
        | Progress::Schedulable { .. }
        | Progress::Retrying { .. }
        | Progress::Rejoined => {}
    }
    Ok(())
}

impl DaemonBackend for Translator<'_> {
    async fn set_options(&mut self, client: &mut Client, settings: ClientSettings) -> Served {
        tracing::debug!(client = client.id, ?settings, "client settings");
        self.settings = settings.clone();
        self.upstream.set_options(client, settings).await
    }

    async fn is_valid_path(&mut self, client: &mut Client, path: StorePath) -> Served {
        self.answer_from_db(client, Request::IsValidPath(path))
            .await
    }

    async fn query_path_info(&mut self, client: &mut Client, path: StorePath) -> Served {
        self.answer_from_db(client, Request::QueryPathInfo(path))
            .await
    }

    /// A missing output of a derivation in the store is built on the dataspace (like
    /// `BuildPaths`); anything else (valid, or only substitutable) is the upstream's.
    async fn ensure_path(&mut self, client: &mut Client, path: StorePath) -> Served {
        let up = &mut self.upstream;
        let valid = match up
            .call(client, &Request::IsValidPath(path.clone()), false)
            .await?
        {
            Ok(()) => up.upstream.reader.read_bool("IsValidPath reply").await?,
            Err(e) => return client.error(&e).await,
        };
        let derivers = if valid {
            Default::default()
        } else {
            match up
                .call(client, &Request::QueryValidDerivers(path.clone()), false)
                .await?
            {
                Ok(()) => up.upstream.reader.read_store_path_set("derivers").await?,
                Err(e) => return client.error(&e).await,
            }
        };
        let Some(drv) = derivers.first() else {
            return up.other(client, Request::EnsurePath(path)).await;
        };
        let drv = DrvPath::from(self.config.store_dir.print(drv));
        tracing::info!(client = client.id, path = %path, %drv, "EnsurePath builds a derivation output");
        let failure = match self.build(client, vec![drv], BuildMode::Normal).await? {
            Ok(report) => error_message(&report).map(DaemonError::new),
            Err(e) => Some(e),
        };
        if let Some(e) = failure {
            return client.error(&e).await;
        }
        StderrFrame::Last.write_to(&mut client.writer).await?;
        client.writer.write_u64(1, "EnsurePath reply").await?;
        client.writer.flush().await?;
        Ok(())
    }

    async fn build_paths(
        &mut self,
        client: &mut Client,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    ) -> Served {
        self.build_paths_on_dataspace(client, paths, mode, false)
            .await
    }

    async fn build_paths_with_results(
        &mut self,
        client: &mut Client,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
    ) -> Served {
        self.build_paths_on_dataspace(client, paths, mode, true)
            .await
    }

    /// A derivation in the store is built as it is stored (so an untrusted client builds
    /// nothing it could not build with `BuildPaths`). One that is not (a remote builder's
    /// client copies only the inputs) is built as the client sent it, as nix-daemon builds
    /// it: for a trusted client, or a content-addressed one for anyone (its outputs are
    /// checked by their content); an untrusted client's input-addressed one is refused in
    /// Nix's words. The translator vouches for it on the dataspace, which takes a trusted
    /// route.
    async fn build_derivation(
        &mut self,
        client: &mut Client,
        drv_path: StorePath,
        basic: BasicDerivation,
        mode: BuildMode,
    ) -> Served {
        let drv = DrvPath::from(self.config.store_dir.print(&drv_path));
        let stored = tokio::fs::try_exists(drv.as_str()).await.unwrap_or(false);
        let roots = match stored {
            true => Roots::Stored(vec![drv.clone()]),
            false => {
                let content_addressed = basic.outputs.values().all(|o| {
                    matches!(
                        o,
                        DerivationOutput::CaFixed { .. } | DerivationOutput::CaFloating { .. }
                    )
                });
                if client.trust == Trust::Untrusted && !content_addressed {
                    return client.error(&DaemonError::new(NOT_PRIVILEGED)).await;
                }
                if !self.config.vouches {
                    let e = DaemonError::new(format!(
                        "nixspace: {drv} is not in the store, and this translator joined the \
                         dataspace without the trusted route that builds a derivation sent \
                         inline"
                    ));
                    return client.error(&e).await;
                }
                let mut inline = InlineDerivation::new(drv.clone(), basic, &self.config.store_dir);
                if let (Trust::Trusted, Some(key)) = (client.trust, &self.config.vouching_key) {
                    inline = inline.vouched_by(Arc::clone(key));
                }
                Roots::Inline(Box::new(inline))
            }
        };
        let result = match self.build_on_dataspace(client, roots, mode).await? {
            Ok(report) => result_for(&report, &drv),
            Err(e) => {
                let mut r = BuildResult::new(BuildStatus::MiscFailure);
                r.error_msg = e.message;
                r
            }
        };
        StderrFrame::Last.write_to(&mut client.writer).await?;
        result.write_to(&mut client.writer).await?;
        client.writer.flush().await?;
        Ok(())
    }

    async fn other(&mut self, client: &mut Client, req: Request) -> Served {
        self.upstream.other(client, req).await
    }
}

/// The client-side activities of the steps being built, by step: their builds, and their
/// post-build hooks.
#[derive(Default)]
struct Activities {
    builds: BTreeMap<DrvPath, StepActivity>,
    hooks: BTreeMap<DrvPath, u64>,
}

/// The client's activity of one attempt at a step's build, and the activities the build
/// started under it.
struct StepActivity {
    /// The client's id of the build activity.
    id: u64,
    /// The worker building it (empty: not known when the activity started).
    worker: String,
    /// The worker's numbers of the activities open under the build → the client's ids (at
    /// most [`MAX_OPEN_ACTIVITIES`]).
    nested: BTreeMap<u64, u64>,
}

impl StepActivity {
    /// The client's id of the worker's activity `n` (0: the build activity), if open.
    fn client_id(&self, n: u64) -> Option<u64> {
        match n {
            0 => Some(self.id),
            n => self.nested.get(&n).copied(),
        }
    }

    /// The event for the client: the worker's activity numbers replaced by the client's ids
    /// (new ones for activities starting); none for an activity not open (or over the bound).
    fn renumber(&mut self, event: LogEvent) -> Option<LogEvent> {
        Some(match event {
            LogEvent::Result { id, .. } => {
                let id = self.client_id(id)?;
                event.renumbered(id, 0)
            }
            LogEvent::StartActivity { id, parent, .. } => {
                let parent = self.client_id(parent)?;
                if id == 0
                    || self.nested.len() >= MAX_OPEN_ACTIVITIES
                    || self.nested.contains_key(&id)
                {
                    return None;
                }
                let ours = activity_id();
                self.nested.insert(id, ours);
                event.renumbered(ours, parent)
            }
            LogEvent::StopActivity { id } => LogEvent::StopActivity {
                id: self.nested.remove(&id)?,
            },
            LogEvent::Message(_) => return None,
        })
    }

    /// The client's ids of its activities, those under the build first (the latest first).
    fn ids(self) -> impl Iterator<Item = u64> {
        let mut nested: Vec<u64> = self.nested.into_values().collect();
        nested.sort_unstable_by(|a, b| b.cmp(a));
        nested.into_iter().chain([self.id])
    }
}

/// A new activity id. Like Nix: the process id in the upper half keeps ids apart from the
/// upstream's.
fn activity_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Activities {
    /// Start the activity of building `drv` (on `worker`, if known), replacing an earlier
    /// one (a retried step); returns its id.
    async fn start(
        &mut self,
        client: &mut Client,
        drv: &DrvPath,
        worker: &str,
    ) -> Result<u64, ConnError> {
        self.stop(client, drv).await?;
        let id = activity_id();
        let text = if worker.is_empty() {
            format!("building '{drv}'")
        } else {
            format!("building '{drv}' on nixspace worker '{worker}'")
        };
        client
            .event(LogEvent::StartActivity {
                id,
                level: LVL_INFO,
                activity_type: activity_type::BUILD,
                text,
                fields: vec![
                    Field::String(drv.to_string()),
                    Field::String(worker.to_owned()),
                    Field::Int(1),
                    Field::Int(1),
                ],
                parent: 0,
            })
            .await?;
        self.builds.insert(
            drv.clone(),
            StepActivity {
                id,
                worker: worker.to_owned(),
                nested: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// Relay one activity event of `drv`'s build on `worker` (from the current attempt only)
    /// to the client.
    async fn relay(
        &mut self,
        client: &mut Client,
        drv: &DrvPath,
        worker: &WorkerId,
        event: LogEvent,
    ) -> Result<(), ConnError> {
        if !self.builds.contains_key(drv) {
            self.start(client, drv, worker.as_str()).await?;
        }
        let Some(step) = self.builds.get_mut(drv) else {
            return Ok(());
        };
        if !step.worker.is_empty() && step.worker != worker.as_str() {
            return Ok(());
        }
        match step.renumber(event) {
            Some(event) => client.event(event).await,
            None => Ok(()),
        }
    }

    /// Start the activity of `drv`'s post-build hook, as Nix words it.
    async fn start_hook(
        &mut self,
        client: &mut Client,
        drv: &DrvPath,
        hook: &str,
    ) -> Result<(), ConnError> {
        let id = activity_id();
        client
            .event(LogEvent::StartActivity {
                id,
                level: LVL_INFO,
                activity_type: activity_type::POST_BUILD_HOOK,
                text: format!("running post-build-hook '{hook}'"),
                fields: vec![Field::String(drv.to_string())],
                parent: 0,
            })
            .await?;
        self.hooks.insert(drv.clone(), id);
        Ok(())
    }

    /// The activity of `drv`, started (with no worker named) if there is none.
    async fn of(&mut self, client: &mut Client, drv: &DrvPath) -> Result<u64, ConnError> {
        match self.builds.get(drv) {
            Some(step) => Ok(step.id),
            None => self.start(client, drv, "").await,
        }
    }

    /// Stop the activities of `drv` (its build and its hook).
    async fn stop(&mut self, client: &mut Client, drv: &DrvPath) -> Result<(), ConnError> {
        let build = self
            .builds
            .remove(drv)
            .into_iter()
            .flat_map(StepActivity::ids);
        for id in build.chain(self.hooks.remove(drv)) {
            client.event(LogEvent::StopActivity { id }).await?;
        }
        Ok(())
    }

    async fn stop_all(&mut self, client: &mut Client) -> Result<(), ConnError> {
        let (builds, hooks) = (
            std::mem::take(&mut self.builds),
            std::mem::take(&mut self.hooks),
        );
        let builds = builds.into_values().flat_map(StepActivity::ids);
        for id in builds.chain(hooks.into_values()) {
            client.event(LogEvent::StopActivity { id }).await?;
        }
        Ok(())
    }
}
