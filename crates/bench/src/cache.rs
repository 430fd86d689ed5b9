//! `nixspace bench cache`: binary caches over HTTP. `nix copy --from http://…` of the same
//! paths into a fresh store, from (a) a plain file server of the cache `nix copy --to
//! file://…?compression=zstd` wrote, (b) `nixspace cache serve` finding them through the
//! dataspace in `nixspace substitute` of (a), (c) `nixspace cache serve` finding them in a
//! worker's store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::Args;
use nixspace_nix_formats::signature::SecretKey;
use rand::{Rng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::error::BenchError;
use crate::measure::{succeeded, timed, Stats};
use crate::processes::{spawn_up, spawn_worker, Children, Scratch};

/// How long the dataspace may take to offer the paths once its processes started.
const READY: Duration = Duration::from_secs(60);

/// Binary caches over HTTP: `nix copy --from` a file server against `nixspace cache serve`.
///
/// Makes PATHS store paths of SIZE random bytes, copies them into a binary cache (zstd,
/// signed) and deletes them from the store; then, RUNS times each, copies them all with
/// `nix copy --from http://… --to local?root=<fresh>` from (a) a file server of the cache,
/// (b) `nixspace cache serve` with `nixspace substitute http://<(a)>` in the dataspace,
/// (c) `nixspace cache serve` with a worker serving the local store (the paths added again).
/// Needs to add to and delete from the local store; give it a nix.conf without substituters
/// (`NIX_CONF_DIR`).
#[derive(Args, Debug)]
pub struct CacheArgs {
    /// How many store paths.
    #[arg(long, default_value_t = 100)]
    paths: usize,
    /// Bytes per path.
    #[arg(long, default_value_t = 1 << 20)]
    size: usize,
    /// Copies per setup.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Run `nixspace bench cache`.
pub async fn run(args: CacheArgs) -> Result<ExitCode, BenchError> {
    if args.paths == 0 || args.runs == 0 || args.size == 0 {
        return Err(BenchError::Arguments(
            "--paths, --size and --runs must be at least 1",
        ));
    }
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-bench-cache-")?;
    let cache_dir = tmp.path().join("cache");
    let cached = make_cache(&args, tmp.path(), &cache_dir).await?;
    let result = measure(&args, &exe, tmp.path(), &dir, &mut children, &cached).await;
    children.stop().await;
    // Leave the store as it was: (c) added the paths again.
    if let Err(error) = succeeded(
        Command::new("nix-store")
            .arg("--delete")
            .args(&cached.paths),
    )
    .await
    {
        tracing::debug!(%error, "the paths were not all in the store");
    }
    result
}

/// What the setups copy: the paths, the key the cache is signed with, the files they were
/// made from.
struct Cached {
    paths: Vec<String>,
    public_key: String,
    secret_file: PathBuf,
    files: Vec<PathBuf>,
}

async fn measure(
    args: &CacheArgs,
    exe: &Path,
    tmp: &Path,
    dir: &Path,
    children: &mut Children,
    cached: &Cached,
) -> Result<ExitCode, BenchError> {
    let files = serve_files(tmp.join("cache")).await?;
    let files_url = format!("http://{files}");
    let mut rows = Vec::new();
    let a = copies(args, tmp, &files_url, cached).await?;
    rows.push(("(a) file server", a));

    let quiet = ["--log-level", "warn"];
    let state = tmp.join("state");
    let state = state.to_str().unwrap_or("state");
    spawn_up(exe, &quiet, dir, &["--state-dir", state], children).await?;
    let mut substitute = Command::new(exe)
        .args(quiet)
        .args(["substitute", "--name", "bench-cache", "--dir"])
        .arg(dir)
        .arg(&files_url)
        .args(["--trusted-public-key", &cached.public_key])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let serve = free_port().await?;
    children.push(
        Command::new(exe)
            .args(quiet)
            .args(["cache", "serve", "--name", "bench-serve", "--dir"])
            .arg(dir)
            .arg(serve.to_string())
            .arg("--secret-key")
            .arg(&cached.secret_file)
            .args(["--trusted-public-key", &cached.public_key])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    let serve_url = format!("http://{serve}");
    wait_offered(serve, &cached.paths[0]).await?;
    let b = copies(args, tmp, &serve_url, cached).await?;
    rows.push(("(b) cache serve <- substitute (a)", b));

    let _ = substitute.kill().await;
    succeeded(Command::new("nix-store").arg("--add").args(&cached.files)).await?;
    let worker_args = [std::ffi::OsStr::new("--dir"), dir.as_os_str()];
    spawn_worker(exe, &quiet, "bench-cache-worker", 1, &worker_args, children)?;
    wait_offered(serve, &cached.paths[0]).await?;
    let c = copies(args, tmp, &serve_url, cached).await?;
    rows.push(("(c) cache serve <- worker's store", c));

    println!(
        "nix copy --from http://… of {} paths of {} bytes, {} runs (seconds):",
        args.paths, args.size, args.runs
    );
    println!("{:<36} {:>8} {:>8} {:>8}", "", "min", "median", "max");
    for (name, times) in rows {
        let s = Stats::of(&times);
        println!(
            "{name:<36} {:>8.2} {:>8.2} {:>8.2}",
            s.min.as_secs_f64(),
            s.median.as_secs_f64(),
            s.max.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Make the paths, copy them into a signed zstd cache at `cache_dir` and delete them from
/// the store.
async fn make_cache(args: &CacheArgs, tmp: &Path, cache_dir: &Path) -> Result<Cached, BenchError> {
    let files_dir = tmp.join("files");
    std::fs::create_dir_all(&files_dir)?;
    let mut files = Vec::with_capacity(args.paths);
    let mut bytes = vec![0u8; args.size];
    let mut rng = rand::thread_rng();
    for i in 0..args.paths {
        rng.fill_bytes(&mut bytes);
        let file = files_dir.join(format!("bench-cache-{i}"));
        std::fs::write(&file, &bytes)?;
        files.push(file);
    }
    let seed: [u8; 32] = rng.gen();
    drop(rng);
    let added = succeeded(Command::new("nix-store").arg("--add").args(&files)).await?;
    let paths: Vec<String> = String::from_utf8_lossy(&added.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let key = SecretKey::from_seed("nixspace-bench-cache-1", &seed)
        .map_err(|_| BenchError::Setup("cannot make a signing key"))?;
    let secret_file = tmp.join("cache.key");
    std::fs::write(&secret_file, key.to_text())?;
    let copied = succeeded(
        Command::new("nix")
            .args([
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
            ])
            .arg(format!(
                "file://{}?compression=zstd&secret-key={}",
                cache_dir.display(),
                secret_file.display()
            ))
            .args(&paths),
    )
    .await;
    // Deleted either way: the setups find them in the cache only.
    succeeded(Command::new("nix-store").arg("--delete").args(&paths)).await?;
    copied?;
    Ok(Cached {
        paths,
        public_key: key.to_public().to_string(),
        secret_file,
        files,
    })
}

/// `args.runs` timings of copying all the paths from the cache at `url` into a fresh store.
async fn copies(
    args: &CacheArgs,
    tmp: &Path,
    url: &str,
    cached: &Cached,
) -> Result<Vec<Duration>, BenchError> {
    let fresh = tmp.join("fresh");
    let mut times = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh)?;
        }
        let took = timed(
            Command::new("nix")
                .args(["--extra-experimental-features", "nix-command", "copy"])
                .args(["--from", url, "--to"])
                .arg(format!("local?root={}", fresh.display()))
                .args(["--option", "trusted-public-keys", &cached.public_key])
                .args(&cached.paths)
                .stderr(Stdio::null()),
        )
        .await?;
        eprintln!("bench: {url}: run {} of {}: {took:?}", run + 1, args.runs);
        times.push(took);
    }
    Ok(times)
}

/// Serve the files under `dir` over HTTP on a free port of 127.0.0.1 (GET only, one request
/// per connection, 404 for what is not there); its address.
async fn serve_files(dir: PathBuf) -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_file(stream, dir.clone()));
        }
    });
    Ok(addr)
}

/// Answer one request on `stream` with a file under `dir`.
async fn answer_file(mut stream: TcpStream, dir: PathBuf) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let path = head.split_whitespace().nth(1).unwrap_or_default();
    let file = path
        .strip_prefix('/')
        .filter(|p| !p.split('/').any(|c| c == ".." || c.is_empty()))
        .map(|p| dir.join(p));
    match file {
        Some(file) if file.is_file() => {
            let mut f = tokio::fs::File::open(&file).await?;
            let length = f.metadata().await?.len();
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            tokio::io::copy(&mut f, &mut stream).await?;
        }
        _ => {
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?
        }
    }
    stream.shutdown().await
}

/// A request or response head, read up to its blank line (at most 8 KiB).
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A port of 127.0.0.1 free now.
async fn free_port() -> Result<SocketAddr, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?)
}

/// Wait until the cache at `addr` has `path`'s narinfo.
async fn wait_offered(addr: SocketAddr, path: &str) -> Result<(), BenchError> {
    let hash_part = path
        .rsplit('/')
        .next()
        .and_then(|base| base.get(..32))
        .unwrap_or_default();
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let request = format!("GET /{hash_part}.narinfo HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            if read_head(&mut stream).await?.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BenchError::Setup(
                "the dataspace did not offer the paths within a minute",
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
