//! A real browser for the tests: headless Chromium (Debian's `chromium`), driven over its
//! DevTools protocol on a WebSocket: open a page, run JavaScript in it, press keys, take a
//! screenshot. The browser runs with a profile of its own and is killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long the browser may take to start, and to answer one command.
const ANSWER: Duration = Duration::from_secs(30);

/// Headless Chromium with one page open.
pub struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start Chromium and open `url` in a page of 1280×900 pixels.
    pub fn open(url: &str) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("nixspace-test-chromium-")
            .tempdir()
            .expect("profile directory");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium (apt-get install chromium; ./setup.sh deps does)");
        let stderr = child.stderr.take().expect("chromium's stderr");
        let (tx, rx) = mpsc::channel();
        // Read the DevTools address, then drain the rest so the browser never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_owned());
                }
            }
        });
        let address = rx
            .recv_timeout(ANSWER)
            .expect("chromium did not print its DevTools address");
        let (socket, _) = tungstenite::connect(address.as_str()).expect("connect to DevTools");
        if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(ANSWER)).expect("read timeout");
        }
        let mut browser = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = browser.command("Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.command(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        browser.command(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser.command("Page.navigate", json!({ "url": url }));
        browser
    }

    /// Send one DevTools command (to the page once attached) and return its result.
    fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(message.to_string()))
            .expect("send to DevTools");
        let deadline = Instant::now() + ANSWER;
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let Message::Text(text) = self.socket.read().expect("read from DevTools") else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).expect("DevTools JSON");
            // Events (no id) and answers to other commands are skipped.
            if answer["id"] == json!(id) {
                assert!(answer["error"].is_null(), "{method} failed: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// The value of the JavaScript expression `js` in the page (`null` if it threw).
    pub fn eval(&mut self, js: &str) -> Value {
        let result = self.command(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// Evaluate `js` until it is `true`, failing after `limit` with `what` and the page's text.
    pub fn wait_for(&mut self, what: &str, js: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.eval(js) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text the page shows.
    pub fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Press and release `key` (a DOM key name such as `Enter` or `Tab`) in the page.
    pub fn press(&mut self, key: &str, code: u32) {
        let text = match key {
            "Enter" => "\r",
            _ => "",
        };
        self.command(
            "Input.dispatchKeyEvent",
            json!({ "type": "keyDown", "key": key, "code": key,
                    "windowsVirtualKeyCode": code, "text": text }),
        );
        self.command(
            "Input.dispatchKeyEvent",
            json!({ "type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": code }),
        );
    }

    /// Write a PNG of the page as shown to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.command("Page.captureScreenshot", json!({ "format": "png" }));
        let png = data_encoding::BASE64
            .decode(shot["data"].as_str().expect("screenshot data").as_bytes())
            .expect("base64 screenshot");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
