//! End-to-end: Nix's activities and results of a build (its phases, the activities the
//! builder starts under it and their progress) reach a client through the translator as
//! `nix-daemon` sends them: the same derivation built once against a plain `nix-daemon` and
//! once through nixspace, compared in `nix build --log-format internal-json`.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use nixspace_test_support::{nonce, run, Space};
use serde_json::{json, Value};

use crate::translator::PlainDaemon;

const LIMIT: Duration = Duration::from_secs(120);

/// Nix's `actBuild`, `actFileTransfer`, `resultBuildLogLine`.
const ACT_BUILD: u64 = 105;
const ACT_FILE_TRANSFER: u64 = 101;
const RESULT_BUILD_LOG_LINE: u64 = 101;

/// A derivation named `name` whose builder says, as stdenv does, which phase it is in, then
/// starts a download of its own under the build, reports its progress and ends it.
fn phased(space: &Space, name: &str) -> std::path::PathBuf {
    space.nix_file(
        &format!("{name}.nix"),
        &format!(
            r#"derivation {{
  name = "{name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    echo '@nix {{"action":"setPhase","phase":"myPhase"}}' >&2
    echo working
    echo '@nix {{"action":"start","id":1,"level":3,"type":101,"text":"fetching x","fields":[]}}' >&2
    echo '@nix {{"action":"result","id":1,"type":105,"fields":[1,4,1,0]}}' >&2
    echo '@nix {{"action":"result","id":1,"type":105,"fields":[4,4,0,0]}}' >&2
    echo '@nix {{"action":"stop","id":1}}' >&2
    echo '@nix {{"action":"setPhase","phase":"installPhase"}}' >&2
    echo done > $out
  '' ];
}}"#
        ),
    )
}

/// `nix build --log-format internal-json -L` of `file` against the daemon at `socket`: its
/// JSON log messages.
fn internal_json(space: &Space, socket: &Path, file: &Path) -> Vec<Value> {
    let mut c = space.nix("nix", Some(socket));
    c.args([
        "build",
        "--no-link",
        "-L",
        "--log-format",
        "internal-json",
        "-f",
    ])
    .arg(file);
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
    built
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .map(|l| serde_json::from_str(l).expect("a JSON log message"))
        .collect()
}

/// What happened under the build activity of `messages`, ids replaced by their relation to
/// it: results of the build (but its log lines), starts, results and stops of activities
/// under it. Nix 2.8's JSON log names no parent, so activities under the build are the file
/// transfers started while it runs (the builder's own: nothing is substituted here).
fn under_the_build(messages: &[Value]) -> Vec<Value> {
    let build = messages
        .iter()
        .find(|m| m["action"] == "start" && m["type"] == ACT_BUILD)
        .unwrap_or_else(|| panic!("no build activity in {messages:?}"))["id"]
        .clone();
    let mut nested: Vec<Value> = Vec::new();
    let mut seen = Vec::new();
    for m in messages {
        let id = &m["id"];
        let relation = if *id == build {
            "build".to_owned()
        } else if let Some(i) = nested.iter().position(|n| n == id) {
            format!("nested {i}")
        } else if m["action"] == "start" && m["type"] == ACT_FILE_TRANSFER {
            nested.push(id.clone());
            format!("nested {}", nested.len() - 1)
        } else {
            continue;
        };
        // The JSON log leaves empty fields out.
        let fields = m.get("fields").cloned().unwrap_or(json!([]));
        match m["action"].as_str() {
            Some("result") if m["type"] == RESULT_BUILD_LOG_LINE => {}
            Some("result") => seen.push(json!([relation, "result", m["type"], fields])),
            Some("start") if *id != build => seen.push(json!([
                relation, "start", m["type"], m["level"], m["text"], fields
            ])),
            Some("stop") if *id != build => seen.push(json!([relation, "stop"])),
            _ => {}
        }
    }
    seen
}

#[test]
fn a_builds_phases_and_progress_reach_the_client_as_nix_daemon_sends_them() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let plain = PlainDaemon::start(&space);
    // Two derivations alike but for their names, so that neither build finds the other's
    // output valid.
    let tag = nonce();
    let (direct_file, via_file) = (
        phased(&space, &format!("phased-direct-{tag}")),
        phased(&space, &format!("phased-via-{tag}")),
    );
    let direct = under_the_build(&internal_json(&space, &plain.socket, &direct_file));
    let via = under_the_build(&internal_json(&space, &socket, &via_file));
    // Positive control: nix-daemon's build activity carries the phases and the download.
    let set_phase = |phase: &str| json!(["build", "result", 104, [phase]]);
    assert_eq!(
        direct,
        vec![
            set_phase("myPhase"),
            json!(["nested 0", "start", ACT_FILE_TRANSFER, 3, "fetching x", []]),
            json!(["nested 0", "result", 105, [1, 4, 1, 0]]),
            json!(["nested 0", "result", 105, [4, 4, 0, 0]]),
            json!(["nested 0", "stop"]),
            set_phase("installPhase"),
        ],
        "nix-daemon"
    );
    assert_eq!(via, direct, "through nixspace");
}
