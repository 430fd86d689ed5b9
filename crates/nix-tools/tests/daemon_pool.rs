//! Building through the daemon pool against the real Nix: private
//! `nix-daemon --stdio` children on the local store, with a private config.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nixspace_nix_protocol::stderr::{activity_type, result_type, Field};
use nixspace_nix_protocol::LogEvent;
use nixspace_nix_tools::{BuildLog, DaemonPool, DaemonTarget, PoolConfig, StepError};
use nixspace_protocol::BuildSettings;
use nixspace_test_support::unique;

/// Points Nix (ours and the pool's daemons, which inherit the environment)
/// at a private config, once, before any test starts a process.
fn setup() {
    static CONF: OnceLock<tempfile::TempDir> = OnceLock::new();
    CONF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        nixspace_test_support::write_nix_conf(dir.path()).unwrap();
        std::env::set_var("NIX_CONF_DIR", dir.path());
        std::env::set_var("NIX_REMOTE", "local");
        dir
    });
}

/// `nix-instantiate -E expr` (a `.drv` path); `expr` may use `sh`, which
/// makes a `/bin/sh -c script` derivation.
fn instantiate(expr: &str) -> String {
    let expr = format!(
        r#"let sh = name: script: extra: derivation ({{
             inherit name; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" script ]; }} // extra);
           in {expr}"#
    );
    let out = Command::new("nix-instantiate")
        .args(["-E", &expr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-instantiate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn pool(max: usize) -> DaemonPool {
    setup();
    DaemonPool::new(PoolConfig::new(max))
}

/// Build, collecting the log lines.
async fn build(pool: &DaemonPool, drv: &str) -> (Result<Vec<String>, StepError>, Vec<String>) {
    let mut lines = Vec::new();
    let result = pool
        .build(drv, &BuildSettings::default(), |l| {
            if let BuildLog::Line(l) = l {
                lines.push(l)
            }
        })
        .await
        .map(|b| b.outputs);
    (result, lines)
}

#[tokio::test]
async fn a_builders_phases_and_the_activities_it_starts_come_as_activity_events() {
    let pool = pool(1);
    let tag = unique("phases");
    let script = r#"echo '@nix {"action":"setPhase","phase":"myPhase"}' >&2
echo '@nix {"action":"start","id":1,"level":3,"type":101,"text":"fetching","fields":[]}' >&2
echo '@nix {"action":"result","id":1,"type":105,"fields":[1,2,0,0]}' >&2
echo '@nix {"action":"stop","id":1}' >&2
echo done > $out"#;
    let drv = instantiate(&format!("sh \"phases-{tag}\" ''{script}'' {{}}"));
    let mut logs = Vec::new();
    pool.build(&drv, &BuildSettings::default(), |l| logs.push(l))
        .await
        .unwrap();
    let activities: Vec<LogEvent> = logs
        .into_iter()
        .filter_map(|l| match l {
            BuildLog::Activity(event) => Some(event),
            BuildLog::Line(_) => None,
        })
        .collect();
    let LogEvent::StartActivity {
        id,
        parent,
        activity_type,
        ..
    } = activities[1]
    else {
        panic!("{activities:?}");
    };
    assert_eq!((parent, activity_type), (0, activity_type::FILE_TRANSFER));
    assert_eq!(
        activities,
        vec![
            LogEvent::Result {
                id: 0,
                result_type: result_type::SET_PHASE,
                fields: vec![Field::String("myPhase".into())],
            },
            activities[1].clone(),
            LogEvent::Result {
                id,
                result_type: result_type::PROGRESS,
                fields: [1, 2, 0, 0].map(Field::Int).to_vec(),
            },
            LogEvent::StopActivity { id },
        ]
    );
}

#[tokio::test]
async fn builds_stream_their_log_and_leave_no_temporary_root_behind() {
    let pool = pool(2);
    let tag = unique("ok");
    let drv = instantiate(&format!(
        r#"sh "ok-{tag}" "echo hello-{tag}; echo {tag} > $out" {{}}"#
    ));
    let (result, lines) = build(&pool, &drv).await;
    let outputs = result.unwrap();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert!(outputs[0].ends_with(&format!("-ok-{tag}")), "{outputs:?}");
    assert_eq!(
        std::fs::read_to_string(&outputs[0]).unwrap(),
        format!("{tag}\n")
    );
    assert!(lines.contains(&format!("hello-{tag}")), "{lines:?}");

    // A dependent: its input is valid now.
    let dependent = instantiate(&format!(
        r#"let a = sh "ok-{tag}" "echo hello-{tag}; echo {tag} > $out" {{}};
           in sh "dep-{tag}" "/bin/cat ${{a}} > $out; echo src: $src >> $out"
                 {{ src = builtins.toFile "src-{tag}" "x"; }}"#
    ));
    let (result, _) = build(&pool, &dependent).await;
    let outputs = result.unwrap();
    let content = std::fs::read_to_string(&outputs[0]).unwrap();
    assert!(content.starts_with(&format!("{tag}\nsrc: /")), "{content}");
    // Already valid: the same outputs, no build.
    assert_eq!(build(&pool, &dependent).await.0.unwrap(), outputs);
    // The daemons that built them have gone with their temporary roots, while the pool and
    // its idle connections live on: nothing keeps the outputs from the garbage collector.
    let roots = Command::new("nix-store")
        .args(["--query", "--roots", &outputs[0]])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(roots.status.success(), "{roots:?}");
    assert_eq!(
        String::from_utf8_lossy(&roots.stdout).trim(),
        "",
        "{roots:?}"
    );
    assert!(pool.opened() >= 2, "a daemon that built is not used again");
}

#[tokio::test]
async fn a_failing_builder_is_a_permanent_failure_with_its_log() {
    let pool = pool(1);
    let tag = unique("fail");
    let drv = instantiate(&format!(
        r#"sh "fail-{tag}" "echo boom-{tag}; echo detail >&2; exit 3" {{}}"#
    ));
    let (result, lines) = build(&pool, &drv).await;
    let err = result.unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("failed with exit code 3"), "{message}");
    assert!(message.contains(&format!("fail-{tag}.drv")), "{message}");
    assert!(!message.contains('\u{1b}'), "{message:?}");
    assert!(lines.contains(&format!("boom-{tag}")), "{lines:?}");
    assert!(lines.contains(&"detail".to_owned()), "{lines:?}");
    // The pool goes on after a failed build.
    let ok = instantiate(&format!(r#"sh "after-{tag}" "echo > $out" {{}}"#));
    build(&pool, &ok).await.0.unwrap();
}

/// Nix allows any bytes in an environment value; the pool sends the derivation as it is
/// (it used to refuse values that were not UTF-8).
#[tokio::test]
async fn a_non_utf8_environment_value_reaches_the_builder_unchanged() {
    let pool = pool(1);
    let tag = unique("bytes");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    let value = [b"\xff\xfe\"\n".as_slice(), tag.as_bytes()].concat();
    std::fs::write(&file, &value).unwrap();
    let drv = instantiate(&format!(
        r#"sh "bytes-{tag}" "printf %s \"$v\" > $out" {{ v = builtins.readFile {}; }}"#,
        file.display()
    ));
    let outputs = build(&pool, &drv).await.0.unwrap();
    assert_eq!(std::fs::read(&outputs[0]).unwrap(), value);
}

#[tokio::test]
async fn missing_inputs_are_transient_and_named() {
    let pool = pool(1);
    let tag = unique("missing");
    let expr = format!(
        r#"let a = sh "never-built-{tag}" "echo > $out" {{}};
           in sh "needs-{tag}" "/bin/cat ${{a}} > $out" {{}}"#
    );
    let drv = instantiate(&expr);
    let (result, lines) = build(&pool, &drv).await;
    let err = result.unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
    let StepError::InputsMissing(missing) = &err else {
        panic!("not a missing-inputs error: {err:?}");
    };
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].ends_with(&format!("-never-built-{tag}")),
        "{missing:?}"
    );
    assert!(lines.is_empty(), "{lines:?}");
}

#[tokio::test]
async fn required_features_offered_by_the_pool_are_accepted() {
    setup();
    let tag = unique("feat");
    let drv = instantiate(&format!(
        r#"sh "feat-{tag}" "echo > $out" {{ requiredSystemFeatures = [ "nixspace-test-feature" ]; }}"#
    ));
    let plain = DaemonPool::new(PoolConfig::new(1));
    let err = build(&plain, &drv).await.0.unwrap_err();
    assert!(err.to_string().contains("nixspace-test-feature"), "{err}");
    let mut config = PoolConfig::new(1);
    config.features = vec!["nixspace-test-feature".to_owned()];
    build(&DaemonPool::new(config), &drv).await.0.unwrap();
}

#[tokio::test]
async fn a_floating_content_addressed_output_comes_from_the_build_result() {
    let pool = pool(1);
    let tag = unique("ca");
    let drv = instantiate(&format!(
        r#"sh "ca-{tag}" "echo {tag} > $out" {{
             __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }}"#
    ));
    let outputs = build(&pool, &drv).await.0.unwrap();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert!(outputs[0].ends_with(&format!("-ca-{tag}")), "{outputs:?}");
    assert_eq!(
        std::fs::read_to_string(&outputs[0]).unwrap(),
        format!("{tag}\n")
    );
}

/// A `nix-daemon` on a private socket, in its own process group (killed on
/// drop).
struct SocketDaemon {
    socket: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SocketDaemon {
    fn start() -> SocketDaemon {
        use std::os::unix::process::CommandExt as _;
        setup();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let child = Command::new("nix-daemon")
            .env("NIX_REMOTE", "local")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the daemon socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        SocketDaemon {
            socket,
            child,
            _dir: dir,
        }
    }
}

impl Drop for SocketDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_daemon_socket_builds_and_a_dropped_build_stops() {
    let daemon = SocketDaemon::start();
    let mut config = PoolConfig::new(1);
    config.target = DaemonTarget::Socket(daemon.socket.clone());
    let pool = DaemonPool::new(config);
    let tag = unique("socket");
    let drv = instantiate(&format!(
        r#"sh "socket-{tag}" "echo via-{tag}; echo > $out" {{}}"#
    ));
    let (result, lines) = build(&pool, &drv).await;
    assert!(result.unwrap()[0].ends_with(&format!("-socket-{tag}")));
    assert!(lines.contains(&format!("via-{tag}")), "{lines:?}");

    let sleep = format!("/bin/sleep {}.{} ", 3000 + std::process::id() % 1000, 7);
    let drv = instantiate(&format!(
        r#"sh "socket-sleep-{tag}" "{sleep}; echo > $out" {{}}"#
    ));
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.build(&drv, &BuildSettings::default(), |_| {}).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_mentioning(&sleep).is_empty() {
        assert!(Instant::now() < deadline, "the builder never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = processes_mentioning(&sleep);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The closed connection is replaced.
    let ok = instantiate(&format!(r#"sh "socket-after-{tag}" "echo > $out" {{}}"#));
    build(&pool, &ok).await.0.unwrap();
    assert!(pool.opened() >= 2, "{}", pool.opened());
}

#[tokio::test]
async fn an_unreachable_socket_is_transient() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let mut config = PoolConfig::new(1);
    config.target = DaemonTarget::Socket(dir.path().join("no-socket"));
    let drv = instantiate(&format!(r#"sh "sock-{}" "echo > $out" {{}}"#, unique("s")));
    let err = build(&DaemonPool::new(config), &drv).await.0.unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
    assert!(err.to_string().contains("no-socket"), "{err}");
}

/// Processes (pid, command line) whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push((pid, cmdline));
            }
        }
    }
    found
}

/// The command name and parent of a live (not zombie) process.
fn stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_owned();
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    Some((comm, fields.next()?.parse().ok()?))
}

/// The parent of a live process.
fn parent(pid: u32) -> Option<u32> {
    stat(pid).map(|(_, ppid)| ppid)
}

/// The nearest ancestor of `pid` (or `pid` itself) whose command is `name`.
fn ancestor_named(mut pid: u32, name: &str) -> Option<u32> {
    while pid > 1 {
        let (comm, ppid) = stat(pid)?;
        if comm == name {
            return Some(pid);
        }
        pid = ppid;
    }
    None
}

#[tokio::test]
async fn dropping_a_build_stops_its_builder_and_its_daemon() {
    let pool = pool(1);
    let tag = unique("sleep");
    let seconds = 3000 + std::process::id() % 1000;
    let sleep = format!("/bin/sleep {seconds}.{} ", tag.len());
    let drv = instantiate(&format!(
        r#"sh "sleep-{tag}" "echo started; {sleep}; echo > $out" {{}}"#
    ));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let (pool, drv, lines) = (pool.clone(), drv.clone(), Arc::clone(&lines));
        async move {
            pool.build(&drv, &BuildSettings::default(), move |l| {
                if let BuildLog::Line(l) = l {
                    lines.lock().unwrap().push(l)
                }
            })
            .await
        }
    });
    // The log streams while the build runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_mentioning(&sleep).is_empty()
        || !lines.lock().unwrap().contains(&"started".to_owned())
    {
        assert!(Instant::now() < deadline, "the builder never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The daemon process serving the connection that runs the builder is a fork of the
    // pool's private daemon, our child.
    let daemon = processes_mentioning(&sleep)
        .iter()
        .find_map(|(pid, _)| ancestor_named(*pid, "nix-daemon"))
        .expect("the builder runs under a nix-daemon");
    let private = parent(daemon).expect("the connection's daemon has a parent");
    assert_eq!(parent(private), Some(std::process::id()));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = processes_mentioning(&sleep);
        let daemon_left = parent(daemon).is_some();
        if left.is_empty() && !daemon_left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the build was dropped: {left:?}, daemon {daemon_left}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The interrupted connection was not reused: the next build opens another.
    let ok = instantiate(&format!(r#"sh "after-{tag}" "echo > $out" {{}}"#));
    build(&pool, &ok).await.0.unwrap();
    assert_eq!(pool.opened(), 2);
}
