//! End-to-end: the serve protocol (`nix-store --serve`, the remote side of Nix's legacy
//! `ssh://` store) served by `nixspace daemon --serve`: the same session against the real
//! `nix-store --serve --write` and against nixspace gives the same answers; Nix 2.8's own
//! `ssh://` store copies closures to and from it and builds on it as a remote builder (an `ssh`
//! on PATH that runs its last argument stands in for sshd).
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::nar_copy::copy_nar;
use nixspace_nix_protocol::serve::{
    client_handshake, read_export_next, read_path_infos, write_export_end, ExportTrailer,
    ServeRequest, ServeVersion, SERVE_PROTOCOL_VERSION,
};
use nixspace_nix_protocol::version::NIX_2_8;
use nixspace_nix_protocol::{NixReader, NixWriter, ValidPathInfo};
use nixspace_test_support::{nixspace_bin, nonce, repo_root, run};
use tokio::process::{ChildStdin, ChildStdout};

const LIMIT: Duration = Duration::from_secs(120);

/// The tests' Nix configuration, a fake `ssh`, and scratch space.
struct Remote {
    tmp: tempfile::TempDir,
    conf: PathBuf,
    fake_ssh: PathBuf,
}

impl Remote {
    fn new() -> Remote {
        let tmp = tempfile::Builder::new()
            .prefix("nixspace-serve-test-")
            .tempdir()
            .expect("tempdir");
        let conf = tmp.path().join("nix-conf");
        nixspace_test_support::write_nix_conf(&conf).expect("nix.conf");
        let fake_ssh =
            nixspace_test_support::fake_ssh(&tmp.path().join("fake-ssh")).expect("fake ssh");
        Remote {
            tmp,
            conf,
            fake_ssh,
        }
    }

    /// `program` with the tests' Nix configuration on the local store, the fake `ssh` first
    /// on PATH.
    fn nix(&self, program: &str) -> std::process::Command {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(self.fake_ssh.clone()).chain(std::env::split_paths(&rest)),
        )
        .expect("PATH");
        let mut c = std::process::Command::new(program);
        c.env("NIX_CONF_DIR", &self.conf)
            .env("NIX_REMOTE", "local")
            .env("PATH", path)
            .stdin(Stdio::null());
        c
    }

    /// Run `program args`; it must succeed. Its stdout, trimmed.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let mut c = self.nix(program);
        c.args(args);
        let out = run(c, LIMIT);
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        out.stdout.trim().to_owned()
    }

    /// A fresh copy of the demo graph (four derivations).
    fn demo_file(&self) -> String {
        let demo = repo_root().join("examples/demo/default.nix");
        let file = self.tmp.path().join(format!("demo-{}.nix", nonce()));
        std::fs::write(
            &file,
            format!("import {} {{ nonce = \"{}\"; }}", demo.display(), nonce()),
        )
        .expect("demo.nix");
        file.display().to_string()
    }

    /// The legacy ssh store whose remote side is `nixspace daemon --serve --write`.
    fn ssh_store(&self) -> String {
        format!(
            "ssh://nixspace-test?remote-program={}%20daemon",
            nixspace_bin().display()
        )
    }

    /// The real `nix-store --serve` (with `--write` if `write`).
    fn real_serve(&self, write: bool) -> tokio::process::Command {
        let mut c = self.nix("nix-store");
        c.arg("--serve");
        if write {
            c.arg("--write");
        }
        tokio::process::Command::from(c)
    }

    /// nixspace's `daemon --serve` (with `--write` if `write`).
    fn nixspace_serve(&self, write: bool) -> tokio::process::Command {
        let mut c = self.nix(nixspace_bin().to_str().expect("path"));
        c.args(["daemon", "--serve"]);
        if write {
            c.arg("--write");
        }
        tokio::process::Command::from(c)
    }
}

fn store_path(printed: &str) -> StorePath {
    StorePath::from_base_name(
        printed
            .trim()
            .strip_prefix("/nix/store/")
            .expect("store path"),
    )
    .expect("store path")
}

/// A serve-protocol client of a child process.
struct ServeClient {
    child: tokio::process::Child,
    r: NixReader<ChildStdout>,
    w: NixWriter<ChildStdin>,
    version: ServeVersion,
    stderr: tokio::task::JoinHandle<String>,
}

impl ServeClient {
    async fn start(mut c: tokio::process::Command) -> ServeClient {
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = c.spawn().expect("spawn");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut err, &mut s)
                .await
                .expect("stderr");
            s
        });
        let mut r = NixReader::new(child.stdout.take().expect("stdout"), NIX_2_8);
        let mut w = NixWriter::new(child.stdin.take().expect("stdin"), NIX_2_8);
        let version = client_handshake(&mut r, &mut w, SERVE_PROTOCOL_VERSION)
            .await
            .expect("serve handshake");
        ServeClient {
            child,
            r,
            w,
            version,
            stderr,
        }
    }

    async fn send(&mut self, req: ServeRequest) {
        req.write(&mut self.w, self.version).await.expect("send");
        self.w.flush().await.expect("flush");
    }

    async fn valid(&mut self, paths: &BTreeSet<StorePath>, lock: bool) -> BTreeSet<StorePath> {
        self.send(ServeRequest::QueryValidPaths {
            lock,
            substitute: false,
            paths: paths.clone(),
        })
        .await;
        self.r.read_store_path_set("valid").await.expect("valid")
    }

    async fn infos(&mut self, paths: &BTreeSet<StorePath>) -> Vec<ValidPathInfo> {
        self.send(ServeRequest::QueryPathInfos(paths.clone())).await;
        read_path_infos(&mut self.r, self.version)
            .await
            .expect("infos")
    }

    async fn dump(&mut self, path: &StorePath) -> Vec<u8> {
        self.send(ServeRequest::DumpStorePath(path.clone())).await;
        let mut nar = Vec::new();
        copy_nar(&mut self.r, &mut nar).await.expect("nar");
        nar
    }

    async fn closure(&mut self, paths: &BTreeSet<StorePath>, outputs: bool) -> BTreeSet<StorePath> {
        self.send(ServeRequest::QueryClosure {
            include_outputs: outputs,
            paths: paths.clone(),
        })
        .await;
        self.r
            .read_store_path_set("closure")
            .await
            .expect("closure")
    }

    async fn export(&mut self, paths: &BTreeSet<StorePath>) -> Vec<(Vec<u8>, ExportTrailer)> {
        self.send(ServeRequest::ExportPaths(paths.clone())).await;
        let mut items = Vec::new();
        while read_export_next(&mut self.r).await.expect("export") {
            let mut nar = Vec::new();
            copy_nar(&mut self.r, &mut nar).await.expect("nar");
            items.push((
                nar,
                ExportTrailer::read(&mut self.r).await.expect("trailer"),
            ));
        }
        items
    }

    /// `ImportPaths` of an empty export: the answer, if any came.
    async fn import_nothing(&mut self) -> Option<u64> {
        self.send(ServeRequest::ImportPaths).await;
        write_export_end(&mut self.w).await.expect("end");
        self.w.flush().await.ok()?;
        self.r.read_u64("ImportPaths reply").await.ok()
    }

    /// Close the session; the exit status and stderr.
    async fn finish(self) -> (std::process::ExitStatus, String) {
        let ServeClient {
            mut child,
            r,
            w,
            stderr,
            ..
        } = self;
        drop(w);
        drop(r);
        let status = tokio::time::timeout(LIMIT, child.wait())
            .await
            .expect("the server exits")
            .expect("wait");
        (status, stderr.await.expect("stderr"))
    }
}

/// The same questions, and the answers as text.
async fn session(
    c: tokio::process::Command,
    drv: &StorePath,
    outs: &BTreeSet<StorePath>,
) -> Vec<String> {
    let missing = StorePath::from_base_name("00000000000000000000000000000000-missing").unwrap();
    let mut asked: BTreeSet<StorePath> = outs.clone();
    asked.insert(drv.clone());
    asked.insert(missing);
    let mut client = ServeClient::start(c).await;
    let mut answers = vec![
        format!("{:?}", client.valid(&asked, false).await),
        format!("{:?}", client.valid(&asked, true).await),
        format!("{:?}", client.infos(&asked).await),
        format!("{:?}", client.dump(drv).await),
    ];
    let drv_only = BTreeSet::from([drv.clone()]);
    let closure = client.closure(&drv_only, false).await;
    assert!(closure.len() >= 4, "{closure:?}");
    answers.push(format!("{closure:?}"));
    answers.push(format!("{:?}", client.closure(&drv_only, true).await));
    answers.push(format!("{:?}", client.export(&closure).await));
    let (status, stderr) = client.finish().await;
    assert!(status.success(), "{status:?}: {stderr}");
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn a_serve_session_answers_as_nix_store_serve_does() {
    let remote = Remote::new();
    let file = remote.demo_file();
    let drv = remote.ok("nix-instantiate", &[&file]);
    let outs: BTreeSet<StorePath> = remote
        .ok("nix-store", &["-r", &drv])
        .lines()
        .map(store_path)
        .collect();
    let drv = store_path(&drv);
    let real = session(remote.real_serve(true), &drv, &outs).await;
    let ours = session(remote.nixspace_serve(true), &drv, &outs).await;
    for (i, (r, o)) in real.iter().zip(&ours).enumerate() {
        assert_eq!(r, o, "answer {i}");
    }
    assert_eq!(real.len(), ours.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_that_write_end_a_session_without_write_as_in_nix() {
    let remote = Remote::new();
    for (name, serve) in [
        (
            "nix-store",
            Remote::real_serve as fn(&Remote, bool) -> tokio::process::Command,
        ),
        ("nixspace", Remote::nixspace_serve),
    ] {
        // The positive control: with --write, an (empty) import is answered and the session
        // goes on.
        let mut client = ServeClient::start(serve(&remote, true)).await;
        assert_eq!(client.import_nothing().await, Some(1), "{name}");
        assert!(client.valid(&BTreeSet::new(), false).await.is_empty());
        let (status, stderr) = client.finish().await;
        assert!(status.success(), "{name}: {stderr}");
        // Without it, the session ends at the command, saying why, with exit status 1.
        let mut client = ServeClient::start(serve(&remote, false)).await;
        assert_eq!(client.import_nothing().await, None, "{name}");
        let (status, stderr) = client.finish().await;
        assert_eq!(status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("importing paths is not allowed"),
            "{name}: {stderr}"
        );
        // Builds too, refused before their arguments are read.
        let mut client = ServeClient::start(serve(&remote, false)).await;
        client.w.write_u64(8, "BuildDerivation").await.unwrap();
        client.w.flush().await.unwrap();
        let (status, stderr) = client.finish().await;
        assert_eq!(status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("building paths is not allowed"),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn nix_copy_to_and_from_an_ssh_store_served_by_nixspace() {
    let remote = Remote::new();
    let in_local = |path: &str| {
        let mut c = remote.nix("nix-store");
        c.args(["--check-validity", path]);
        run(c, LIMIT).status.success()
    };
    // To it: a derivation closure (four `.drv` files referring to each other) only a store of
    // the client's own holds.
    let client_store = remote.tmp.path().join("client-store");
    let client_uri = client_store.display().to_string();
    let file = remote.demo_file();
    let drv = remote.ok("nix-instantiate", &["--store", &client_uri, &file]);
    assert!(!in_local(&drv));
    remote.ok(
        "nix",
        &[
            "copy",
            "--derivation",
            "--from",
            &client_uri,
            "--to",
            &remote.ssh_store(),
            &drv,
        ],
    );
    assert!(in_local(&drv));
    let copied = remote.ok("nix-store", &["-qR", &drv]);
    let sent = remote.ok("nix-store", &["--store", &client_uri, "-qR", &drv]);
    assert_eq!(copied.lines().count(), 4, "{copied}");
    assert_eq!(copied, sent);
    // From it: an output that refers to another, into another store of the client's own.
    let nonce = nonce();
    let refs = remote.tmp.path().join("refs.nix");
    std::fs::write(
        &refs,
        format!(
            r#"let step = name: text: derivation {{
                 inherit name;
                 system = builtins.currentSystem;
                 builder = "/bin/sh";
                 args = [ "-c" "echo ${{text}} > $out" ];
               }};
             in step "serve-top" (step "serve-dep" "{nonce}")"#
        ),
    )
    .expect("refs.nix");
    let top = remote.ok(
        "nix-build",
        &["--no-out-link", refs.to_str().expect("path")],
    );
    let closure = remote.ok("nix-store", &["-qR", &top]);
    assert_eq!(closure.lines().count(), 2, "{closure}");
    let other_uri = remote.tmp.path().join("other-store").display().to_string();
    remote.ok(
        "nix",
        &[
            "copy",
            // Built here, so unsigned: as from any remote store, Nix wants them signed.
            "--no-check-sigs",
            "--from",
            &remote.ssh_store(),
            "--to",
            &other_uri,
            &top,
        ],
    );
    let received = remote.ok("nix-store", &["--store", &other_uri, "-qR", &top]);
    assert_eq!(received, closure);
}

/// Nix's remote building to an `ssh://` builder served by nixspace: the client has a store
/// of its own (a builder sharing the client's store cannot build there, with Nix's own
/// `nix-store --serve` either: the client holds the outputs' locks while the builder runs),
/// the derivations are also in the builder's store (as when the client had copied them),
/// and every step builds on the builder's nixspace worker, its outputs copied back by Nix.
#[test]
fn nix_build_with_an_ssh_builder_builds_on_a_nixspace_worker() {
    let remote = Remote::new();
    let file = remote.demo_file();
    let top_drv = remote.ok("nix-instantiate", &[&file]);
    let client_uri = remote.tmp.path().join("client-store").display().to_string();
    let builders = format!(
        "{} {}",
        remote.ssh_store(),
        nixspace_nix_tools::current_system()
    );
    let mut build = remote.nix("nix-build");
    build
        .args([
            "--store",
            &client_uri,
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            &builders,
        ])
        .arg(&file);
    let built = run(build, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let top = built.stdout.trim();
    assert!(top.ends_with("-demo-top"), "{built:?}");
    for step in ["base", "left", "right", "top"] {
        let on_worker = format!("-demo-{step}.drv' on nixspace worker");
        assert!(built.stderr.contains(&on_worker), "{step}: {built:?}");
    }
    remote.ok(
        "nix-store",
        &["--store", &client_uri, "--check-validity", top],
    );
    // The builder's store has the outputs too (the worker built them there).
    let outputs = remote.ok("nix-store", &["-q", "--outputs", &top_drv]);
    assert_eq!(outputs, top);
    remote.ok("nix-store", &["--check-validity", top]);
}

/// `ImportPaths` (what clients before serve protocol 2.5 copy with) takes what `nix-store
/// --export` writes: a closure exported from a store of the client's own is valid afterwards,
/// with its references.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_made_by_nix_store_imports_through_the_serve_protocol() {
    let remote = Remote::new();
    let client_uri = remote.tmp.path().join("client-store").display().to_string();
    let file = remote.demo_file();
    let drv = remote.ok("nix-instantiate", &["--store", &client_uri, &file]);
    let closure = remote.ok("nix-store", &["--store", &client_uri, "-qR", &drv]);
    let mut export = remote.nix("nix-store");
    export
        .args(["--store", &client_uri, "--export"])
        .args(closure.lines());
    let exported = export.output().expect("nix-store --export");
    assert!(exported.status.success(), "{exported:?}");
    let mut client = ServeClient::start(remote.nixspace_serve(true)).await;
    client.send(ServeRequest::ImportPaths).await;
    client
        .w
        .write_raw(&exported.stdout, "export")
        .await
        .expect("export");
    client.w.flush().await.expect("flush");
    assert_eq!(client.r.read_u64("ImportPaths reply").await.unwrap(), 1);
    let (status, stderr) = client.finish().await;
    assert!(status.success(), "{stderr}");
    assert_eq!(remote.ok("nix-store", &["-qR", &drv]), closure);
}

/// Installed as a package's `bin/nix-store` first on PATH, nixspace is what an `ssh://` store
/// runs by default (`nix-store --serve --write`); its `--version` is the real one's.
#[test]
fn nixspace_installed_as_nix_store_serves_an_ssh_store_with_the_default_remote_program() {
    let remote = Remote::new();
    let bin = remote.tmp.path().join("pkg/bin");
    std::fs::create_dir_all(&bin).expect("pkg/bin");
    std::os::unix::fs::symlink(nixspace_bin(), bin.join("nix-store")).expect("symlink");
    let package_first = |c: &mut std::process::Command| {
        let rest = c
            .get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v.map(ToOwned::to_owned))
            .expect("PATH");
        let mut dirs = std::env::split_paths(&rest).collect::<Vec<_>>();
        // After the fake ssh, before the real nix-store.
        dirs.insert(1, bin.clone());
        c.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    };
    // A path added here (a `.drv` would be read as a derivation, which an ssh store cannot).
    let file = remote.tmp.path().join(format!("added-{}", nonce()));
    std::fs::write(&file, nonce()).expect("file");
    let added = remote.ok("nix-store", &["--add", file.to_str().expect("path")]);
    let mut info = remote.nix("nix");
    info.args([
        "path-info",
        "--json",
        "--store",
        "ssh://nixspace-test",
        &added,
    ]);
    package_first(&mut info);
    let served = run(info, LIMIT);
    assert!(served.status.success(), "{served:?}");
    let local = remote.ok("nix", &["path-info", "--json", &added]);
    // The same, but for the registration time, which the serve protocol does not carry.
    let served = served.stdout.trim().trim_end_matches("}]");
    assert!(local.starts_with(served), "{served} / {local}");
    assert!(served.contains("narHash"), "{served}");
    // Whatever asks its version is told the real nix-store's.
    let mut version = remote.nix(bin.join("nix-store").to_str().expect("path"));
    version.arg("--version");
    package_first(&mut version);
    let ours = run(version, LIMIT);
    assert!(ours.status.success(), "{ours:?}");
    assert_eq!(ours.stdout.trim(), remote.ok("nix-store", &["--version"]));
    // And any other use is refused, saying so.
    let mut other = remote.nix(bin.join("nix-store").to_str().expect("path"));
    other.args(["-qR", &added]);
    let refused = run(other, LIMIT);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("serves only"), "{refused:?}");
}
