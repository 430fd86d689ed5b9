//! The web view of `up --http`, in a real browser (headless Chromium): the page follows the
//! farm live, and a running step's log grows on the page as the build writes it, without a
//! reload. With `NIXSPACE_SCREENSHOTS=DIR` set, the test saves what the page showed there.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nixspace_test_support::browser::Browser;
use nixspace_test_support::{http_get, nonce, Space};

use crate::jobs::{release, submit, submit_gated_job};

const LIMIT: Duration = Duration::from_secs(60);

/// Save what `browser` shows as `NAME.png` in `NIXSPACE_SCREENSHOTS`, when set.
fn screenshot(browser: &mut Browser, name: &str) {
    if let Some(dir) = std::env::var_os("NIXSPACE_SCREENSHOTS") {
        browser.screenshot(&std::path::Path::new(&dir).join(format!("{name}.png")));
    }
}

#[test]
fn a_running_steps_log_grows_on_the_page_without_a_reload() {
    let mut space = Space::start_with(&["--http", "127.0.0.1:0"]);
    space.worker("w1", &[]);
    let gate = space.tmp.path().join("gate");
    let tag = nonce();
    // The builder writes a line, waits for the test to open the gate, then writes another.
    let file = space.sh_derivation(
        "web.nix",
        "web-log",
        &format!(
            "echo first-line-{tag}; while [ ! -e {} ]; do /bin/sleep 0.1; done; \
             echo second-line-{tag}; echo done > $out",
            gate.display()
        ),
    );
    let mut build = space.spawn_build(&file);
    let address = space.web_address();
    let mut browser = Browser::open(&format!("http://{address}/"));
    browser.wait_for(
        "the worker building the step",
        "document.querySelector('#workers button.step') !== null",
        LIMIT,
    );
    // Opened from the keyboard: the step's button focused, then Enter.
    browser.eval("document.querySelector('#workers button.step').focus()");
    browser.press("Enter", 13);
    browser.wait_for(
        "the first line of the log",
        &format!("document.getElementById('log').textContent.includes('first-line-{tag}')"),
        LIMIT,
    );
    browser.wait_for(
        "one of the worker's slots in use",
        "document.getElementById('workers').innerText.includes('\t1/')",
        LIMIT,
    );
    // A mark a reload would wipe.
    browser.eval("window.stillTheSamePage = true");
    assert!(
        !browser.text().contains(&format!("second-line-{tag}")),
        "the second line cannot be there before the gate opens"
    );
    screenshot(&mut browser, "web-view-building");
    std::fs::write(&gate, "").unwrap();
    browser.wait_for(
        "the second line, as the build wrote it",
        &format!("document.getElementById('log').textContent.includes('second-line-{tag}')"),
        LIMIT,
    );
    assert_eq!(browser.eval("window.stillTheSamePage === true"), true);
    let status = build.wait().unwrap();
    assert!(status.success(), "{}", space.log("w1"));
    // The recent steps show the step built, with its attempt on w1.
    browser.wait_for(
        "the step built in the recent steps",
        "document.getElementById('history').innerText.includes('w1: built')",
        LIMIT,
    );
    // When the build is done, the page shows the worker idle again, live.
    browser.wait_for(
        "the worker idle",
        "document.querySelector('#workers button.step') === null \
         && document.getElementById('workers').innerText.includes('\t0/')",
        LIMIT,
    );
}

#[test]
fn the_endpoints_refuse_what_they_do_not_serve() {
    let space = Space::start_with(&["--http", "127.0.0.1:0"]);
    let address = space.web_address();
    // The positive controls: the page and the state are served.
    assert!(http_get(&address, "/").starts_with("HTTP/1.1 200"));
    let state = http_get(&address, "/state");
    assert!(state.starts_with("HTTP/1.1 200"), "{state}");
    assert!(state.contains("\"workers\":"), "{state}");
    let history = http_get(&address, "/history");
    assert!(history.starts_with("HTTP/1.1 200"), "{history}");
    assert!(history.ends_with("[]"), "no step yet: {history}");
    for (path, status) in [
        ("/log?drv=/etc/passwd", "400"),
        ("/log", "400"),
        ("/nothing-here", "404"),
    ] {
        let answer = http_get(&address, path);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{path}: {answer}"
        );
    }
}

/// The text of the route file `name` of `space`, as a JavaScript string.
fn route_text(space: &Space, name: &str) -> String {
    let text = std::fs::read_to_string(space.dir().join(name)).unwrap();
    serde_json::Value::from(text).to_string()
}

#[test]
fn a_job_is_cancelled_from_the_page_only_with_the_submit_capability() {
    let mut space = Space::start_with(&["--http", "127.0.0.1:0"]);
    space.worker("w1", &[]);
    let file = release(
        &space,
        "job.nix",
        r#"{ held = sh "held" "while true; do /bin/sleep 0.1; done"; }"#,
    );
    let id = submit(&space, &file, &[]);
    let mut browser = Browser::open(&format!("http://{}/", space.web_address()));
    browser.wait_for(
        "the job pending, its step building",
        "document.querySelector('button.cancel') !== null \
         && document.querySelector('#workers button.step') !== null",
        LIMIT,
    );
    // The worker's capability does not cancel it.
    let worker = route_text(&space, "worker.route");
    browser.eval(&format!(
        "sessionStorage.setItem('nixspace-capability', {worker})"
    ));
    browser.eval("document.querySelector('button.cancel').click()");
    browser.wait_for(
        "the refusal",
        "document.getElementById('cancel-result').textContent.includes('needs the submit capability')",
        LIMIT,
    );
    assert!(
        browser.text().contains(&format!("Cancel #{id}")),
        "still pending"
    );
    assert!(space
        .log("up")
        .contains("without the submit capability refused"));
    // The page forgot the refused capability and asks for one: the submit route cancels it.
    browser.eval("document.querySelector('button.cancel').click()");
    browser.wait_for(
        "the form asking for a capability",
        "!document.getElementById('capability').hidden",
        LIMIT,
    );
    screenshot(&mut browser, "web-view-cancel");
    let submit = route_text(&space, "submit.route");
    browser.eval(&format!(
        "document.getElementById('capability-text').value = {submit}; \
         document.getElementById('capability').requestSubmit()"
    ));
    browser.wait_for(
        "the job cancelled, its step stopped",
        &format!(
            "document.getElementById('cancel-result').textContent.includes('job {id} cancelled') \
             && document.getElementById('jobs').innerText.includes('cancelled') \
             && document.querySelector('#workers button.step') === null"
        ),
        LIMIT,
    );
}

#[test]
fn a_job_built_after_the_coordinator_was_killed_and_restarted_shows_built_on_the_page() {
    let mut space = Space::start_with(&["--http", "127.0.0.1:0"]);
    space.worker("w1", &[]);
    let (gate, id) = submit_gated_job(&space, "job.nix");
    space.kill_up();
    space.restart_up_logged("up");
    // The restarted job demands the step again and it is given back to w1 before it ends
    // (`jobs::a_step_finished_while_the_coordinator_was_down_is_not_left_running_in_the_history`
    // lets it end first).
    space.wait_for_status("the step given back to w1", |r| {
        r["workers"][0]["building"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
    });
    std::fs::write(&gate, "").unwrap();
    let mut browser = Browser::open(&format!("http://{}/", space.web_address()));
    browser.wait_for(
        "the job built",
        &format!("document.getElementById('jobs').innerText.includes('#{id}\\tjob\\tbuilt')"),
        LIMIT,
    );
    browser.wait_for(
        "its step built in the recent steps",
        "document.getElementById('history').innerText.includes('w1: built')",
        LIMIT,
    );
    screenshot(&mut browser, "web-view-job-built");
}
