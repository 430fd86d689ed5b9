//! NAR throughput: our writer and unpacker against `nix-store --dump` and
//! `nix-store --restore` on the same tree (about 50 MiB: one large file, many
//! small ones, nested directories, symlinks, executables).
//!
//! Run: `cargo bench -p nixspace-nix-formats --bench nar` (needs Nix on PATH).

// A benchmark aborts on a broken setup; the crate's no-expect rule is for library code.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(clippy::expect_used, missing_docs)]

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nixspace_nix_formats::nar::fs::{dump_path, restore_path};

fn make_tree(root: &Path) -> io::Result<()> {
    fs::create_dir(root)?;
    let big = vec![0x5au8; 20 << 20];
    fs::write(root.join("big.bin"), &big)?;
    for d in 0..20 {
        let dir = root.join(format!("dir-{d:02}"));
        fs::create_dir(&dir)?;
        for f in 0..25 {
            let body: Vec<u8> = (0..64 * 1024)
                .map(|i| ((i * 31 + f * 7 + d) % 251) as u8)
                .collect();
            let p = dir.join(format!("file-{f:02}"));
            fs::write(&p, body)?;
            if f % 5 == 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            }
        }
        std::os::unix::fs::symlink(format!("file-{:02}", d % 25), dir.join("link"))?;
        fs::create_dir(dir.join("empty"))?;
    }
    Ok(())
}

fn nar_benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tree = tmp.path().join("tree");
    make_tree(&tree).expect("tree");
    let mut nar = Vec::new();
    let summary = dump_path(&tree, &mut nar).expect("dump");

    let mut pack = c.benchmark_group("nar_pack");
    pack.throughput(Throughput::Bytes(summary.size));
    pack.sample_size(10);
    pack.bench_function("nixspace dump_path", |b| {
        b.iter(|| dump_path(&tree, io::sink()).expect("dump"))
    });
    pack.bench_function("nix-store --dump", |b| {
        b.iter(|| {
            let status = Command::new("nix-store")
                .arg("--dump")
                .arg(&tree)
                .stdout(Stdio::null())
                .status()
                .expect("nix-store");
            assert!(status.success());
        })
    });
    pack.finish();

    let mut unpack = c.benchmark_group("nar_unpack");
    unpack.throughput(Throughput::Bytes(summary.size));
    unpack.sample_size(10);
    let mut n = 0u64;
    let mut fresh = || {
        n += 1;
        tmp.path().join(format!("out-{n}"))
    };
    unpack.bench_function("nixspace restore_path", |b| {
        b.iter_batched(
            &mut fresh,
            |target| {
                restore_path(nar.as_slice(), &target).expect("restore");
                fs::remove_dir_all(&target).expect("cleanup");
            },
            BatchSize::PerIteration,
        )
    });
    unpack.bench_function("nix-store --restore", |b| {
        b.iter_batched(
            &mut fresh,
            |target| {
                let mut child = Command::new("nix-store")
                    .arg("--restore")
                    .arg(&target)
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("nix-store");
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(&nar)
                    .expect("write");
                assert!(child.wait().expect("wait").success());
                fs::remove_dir_all(&target).expect("cleanup");
            },
            BatchSize::PerIteration,
        )
    });
    unpack.finish();
}

criterion_group!(benches, nar_benches);
criterion_main!(benches);
