//! Binary caches over HTTP, both ways: `nixspace substitute http://…` substitutes from caches
//! `nix copy` wrote (xz and zstd), served by a small HTTP server, only what is signed by a
//! trusted key; `nixspace cache serve` answers plain Nix clients from the dataspace's stores.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::time::Duration;

use nixspace_nix_formats::signature::SecretKey;
use nixspace_test_support::http_files::FileServer;
use nixspace_test_support::{assert_each_step_built_once, http_get, run, KillOnDrop};

use crate::stores::{
    cache_key, cached_chain, referring_chain, space_trusting_the_cache_key, substituter,
};

const LIMIT: Duration = Duration::from_secs(120);

/// Whether `server` was asked for a narinfo and a NAR.
fn served_narinfo_and_nar(server: &FileServer) -> bool {
    let requests = server.requests();
    requests.iter().any(|r| r.ends_with(".narinfo"))
        && requests.iter().any(|r| r.starts_with("/nar/"))
}

#[test]
fn outputs_in_http_caches_compressed_with_xz_and_zstd_are_substituted_not_built() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let tmp = space.tmp.path().to_owned();
    let (xz_runs, xz_cache) = (tmp.join("xz-runs"), tmp.join("xz-cache"));
    let (zstd_runs, zstd_cache) = (tmp.join("zstd-runs"), tmp.join("zstd-cache"));
    let (chain, xz_top) = cached_chain(&space, &xz_runs, &xz_cache, "xz", &secret);
    // The next chain's Nix file takes the same name.
    let xz_file = tmp.join("xz-chain.nix");
    std::fs::rename(chain, &xz_file).unwrap();
    let (zstd_file, zstd_top) = cached_chain(&space, &zstd_runs, &zstd_cache, "zstd", &secret);
    let zstd_nar = std::fs::read_dir(zstd_cache.join("nar")).unwrap();
    assert!(
        zstd_nar
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .all(|n| n.ends_with(".nar.zst")),
        "nix copy wrote zstd NARs"
    );
    let (xz_server, zstd_server) = (FileServer::start(&xz_cache), FileServer::start(&zstd_cache));
    space.worker("w1", &[]);
    let (xz_url, zstd_url) = (xz_server.url(), zstd_server.url());
    let _cache = substituter(&space, &[OsStr::new(&xz_url), OsStr::new(&zstd_url)]);

    for (file, top, runs, server) in [
        (&xz_file, &xz_top, &xz_runs, &xz_server),
        (&zstd_file, &zstd_top, &zstd_runs, &zstd_server),
    ] {
        let built = space.build(file, LIMIT);
        assert!(built.status.success(), "{built:?}");
        assert_eq!(built.stdout.trim(), top);
        assert!(std::fs::read_to_string(top)
            .unwrap()
            .starts_with("top /nix/store/"));
        assert!(
            !runs.exists(),
            "nothing was built: {:?}",
            std::fs::read_to_string(runs)
        );
        assert!(served_narinfo_and_nar(server), "{:?}", server.requests());
        let mut verify = space.nix("nix-store", None);
        verify.args(["--verify-path", top]);
        assert!(run(verify, LIMIT).status.success());
    }
    let worker = space.log("w1");
    assert!(
        worker.contains("fetched") && worker.contains("cache"),
        "{worker}"
    );
}

#[test]
fn an_http_cache_signed_by_an_untrusted_key_is_read_but_not_used() {
    // The control is the test above: the same chain, cache and server, signed by the key the
    // stores trust, is substituted.
    let (mut space, _) = space_trusting_the_cache_key();
    let tmp = space.tmp.path().to_owned();
    let other = tmp.join("other.key");
    let other_key = SecretKey::from_seed("other-cache-1", &[6; 32]).unwrap();
    assert_ne!(other_key.name(), cache_key().name());
    std::fs::write(&other, other_key.to_text()).unwrap();
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    let (file, top) = cached_chain(&space, &runs, &cache, "zstd", &other);
    let server = FileServer::start(&cache);
    space.worker("w1", &[]);
    let url = server.url();
    let _cache = substituter(&space, &[OsStr::new(&url)]);

    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built.stdout.trim(), top);
    assert!(
        server.requests().iter().any(|r| r.ends_with(".narinfo")),
        "the cache was asked: {:?}",
        server.requests()
    );
    assert_each_step_built_once(&runs, 2);
    let worker = space.log("w1");
    assert!(
        worker.contains("refusing a path another store offers"),
        "{worker}"
    );
}

#[test]
fn nix_build_in_a_fresh_store_substitutes_what_a_worker_built_from_cache_serve() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let tmp = space.tmp.path().to_owned();
    let runs = tmp.join("runs");
    let file = referring_chain(&space, &runs);
    space.worker("w1", &[]);
    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let top = built.stdout.trim().to_owned();
    assert_each_step_built_once(&runs, 2);

    let log = tmp.join("cache-serve.log");
    let child = space
        .command(&["cache", "serve", "127.0.0.1:0", "--name", "cache-serve"])
        // Generous for a loaded machine: only a path no store has waits that long.
        .args(["--wait", "10"])
        .arg("--secret-key")
        .arg(&secret)
        .arg("--dir")
        .arg(space.dir())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _serve = KillOnDrop(child);
    space.wait_for_log("cache-serve", "serving http://", LIMIT);
    let served = space.log("cache-serve");
    let addr = served
        .split("serving http://")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap()
        .trim()
        .to_owned();
    let info = http_get(&addr, "/nix-cache-info");
    assert!(info.starts_with("HTTP/1.1 200"), "{info}");
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    let unknown = http_get(&addr, "/00000000000000000000000000000000.narinfo");
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    // Nix asks whether a narinfo exists with HEAD: the head alone.
    let hash_part = &top["/nix/store/".len()..][..32];
    let head = http_head(&addr, &format!("/{hash_part}.narinfo"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "{head}");
    let narinfo = http_get(&addr, &format!("/{hash_part}.narinfo"));
    assert!(narinfo.contains(&format!("StorePath: {top}")), "{narinfo}");
    assert!(
        narinfo.contains(&format!("Sig: {}:", cache_key().name())),
        "{narinfo}"
    );

    let fresh = tmp.join("fresh");
    let mut fetch = space.nix("nix-build", None);
    fetch
        .arg(&file)
        .arg("--no-out-link")
        .arg("--store")
        .arg(&fresh)
        .args(["--option", "substituters", &format!("http://{addr}")])
        .args([
            "--option",
            "trusted-public-keys",
            &cache_key().to_public().to_string(),
        ]);
    let fetched = run(fetch, LIMIT);
    assert!(fetched.status.success(), "{fetched:?}");
    assert_eq!(fetched.stdout.trim(), top);
    let copy = fresh.join(top.trim_start_matches('/'));
    assert!(
        std::fs::read_to_string(&copy)
            .unwrap()
            .starts_with("top /nix/store/"),
        "{}",
        copy.display()
    );
    // Substituted, not built again.
    assert_each_step_built_once(&runs, 2);

    // A path the worker's store has but nobody trusted signed (built by plain nix-build on
    // the same store) is not served: the store offers it, the cache refuses to vouch for it.
    let unsigned_runs = tmp.join("unsigned-runs");
    let mut plain = space.nix("nix-build", None);
    plain
        .arg(referring_chain(&space, &unsigned_runs))
        .arg("--no-out-link");
    let plain = run(plain, LIMIT);
    assert!(plain.status.success(), "{plain:?}");
    let unsigned = plain.stdout.trim().to_owned();
    let hash_part = &unsigned["/nix/store/".len()..][..32];
    let refused = http_get(&addr, &format!("/{hash_part}.narinfo"));
    assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
    assert!(
        space
            .log("cache-serve")
            .contains("not serving a path another store offers"),
        "{}",
        space.log("cache-serve")
    );
}

/// The whole HTTP/1.1 response to `HEAD path` from `addr`.
fn http_head(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "HEAD {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response
}
