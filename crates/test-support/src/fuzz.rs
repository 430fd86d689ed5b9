//! Fuzzing: how many inputs a fuzz test tries, and the regression corpus.
//!
//! Default runs are quick; `NIXSPACE_FUZZ_LONG=1` multiplies every budget so
//! that the fuzz tests together try well over a million inputs (see
//! `docs/RELIABILITY.md`).

use std::path::PathBuf;

use proptest::prelude::*;

/// The environment variable that selects the long runs.
pub const LONG_ENV: &str = "NIXSPACE_FUZZ_LONG";

/// Whether the long runs were asked for.
pub fn long() -> bool {
    std::env::var(LONG_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `quick` inputs by default, `thorough` under [`LONG_ENV`].
pub fn cases(quick: u32, thorough: u32) -> u32 {
    if long() {
        thorough
    } else {
        quick
    }
}

/// A proptest runner for `cases(quick, thorough)` inputs that keeps no
/// failure files of its own (failing inputs go to the corpus instead).
pub fn runner(quick: u32, thorough: u32) -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: cases(quick, thorough),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// The regression corpus of one target: `tests/corpus/<target>/` at the
/// repository root. Every input that ever failed is kept there.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/corpus")
        .join(target)
}

/// Every file of a target's corpus, by name, sorted.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).ok()?;
            Some((name, bytes))
        })
        .collect();
    files.sort();
    files
}

/// Byte-level mutations of a valid input.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// XOR the byte at (index mod length) with a non-zero mask.
    Flip(usize, u8),
    /// Insert bytes at (index mod length + 1).
    Insert(usize, Vec<u8>),
    /// Delete up to `n` bytes from (index mod length).
    Delete(usize, usize),
    /// Keep only the first (index mod length) bytes.
    Truncate(usize),
    /// Overwrite an 8-byte word (lengths, tokens) with a chosen value.
    Word(usize, u64),
}

/// One random [`Mutation`].
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..32usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                Just(0),
                Just(1),
                Just(7),
                Just(255),
                Just(u64::MAX),
                any::<u64>()
            ]
        )
            .prop_map(|(i, w)| Mutation::Word(i, w)),
    ]
}

/// Apply `mutations` in order to `bytes`.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if let Some(x) = bytes.get_mut(i % len) {
                    *x ^= b;
                }
            }
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Word(i, w) => {
                let at = (i % len) / 8 * 8;
                if at + 8 <= bytes.len() {
                    bytes[at..at + 8].copy_from_slice(&w.to_le_bytes());
                }
            }
        }
    }
    bytes
}

/// Inputs made from one of `seeds` with up to three mutations (none for
/// about one case in eight, so valid inputs are exercised too).
pub fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(), 0..4),
        0..8u8,
    )
        .prop_map(|(seed, mutations, keep)| {
            if keep == 0 {
                seed
            } else {
                mutate(seed, &mutations)
            }
        })
}
