//! A small Chrome DevTools Protocol driver for the browser tests: starts Debian's Chromium
//! headless (never a downloaded browser), opens pages in separate browser contexts, evaluates
//! JavaScript in them, and records every network request and console/log entry per page.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// What a page did: request URLs and log lines.
#[derive(Default)]
pub struct PageLog {
    pub requests: Vec<String>,
    pub logs: Vec<String>,
}

type Logs = Arc<Mutex<HashMap<String, PageLog>>>;

pub struct Browser {
    child: Child,
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    logs: Logs,
    next_id: AtomicU64,
    _profile: tempfile::TempDir,
}

pub struct Page<'a> {
    browser: &'a Browser,
    pub session: String,
}

fn chromium_path() -> String {
    if let Ok(p) = std::env::var("NANOCHAT_CHROMIUM") {
        return p;
    }
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(p).is_file() {
            return p.into();
        }
    }
    panic!(
        "Chromium not found: the browser tests need Debian's chromium. Install it with \
         `apt-get install -y chromium` (or point NANOCHAT_CHROMIUM at a Chromium binary)."
    );
}

impl Browser {
    pub async fn launch() -> Browser {
        Browser::launch_with(&[]).await
    }

    /// Chromium with `extra` command-line switches besides the usual ones.
    pub async fn launch_with(extra: &[&str]) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium_path())
            .args(extra)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium printed its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to DevTools");
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(text) = out_rx.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let logs: Logs = Arc::default();
        {
            let pending = pending.clone();
            let logs = logs.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        if let Some(tx) = pending.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                        continue;
                    }
                    let Some(session) = v["sessionId"].as_str() else {
                        continue;
                    };
                    let mut logs = logs.lock().unwrap();
                    let log = logs.entry(session.to_owned()).or_default();
                    let p = &v["params"];
                    match v["method"].as_str().unwrap_or("") {
                        "Network.requestWillBeSent" => log
                            .requests
                            .push(p["request"]["url"].as_str().unwrap_or("").into()),
                        "Network.webSocketCreated" => {
                            log.requests.push(p["url"].as_str().unwrap_or("").into())
                        }
                        "Log.entryAdded" => log
                            .logs
                            .push(format!("{}: {}", p["entry"]["level"], p["entry"]["text"])),
                        "Runtime.exceptionThrown" => log
                            .logs
                            .push(format!("exception: {}", p["exceptionDetails"])),
                        _ => {}
                    }
                }
            });
        }
        Browser {
            child,
            out,
            pending,
            logs,
            next_id: AtomicU64::new(1),
            _profile: profile,
        }
    }

    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(msg.to_string())
            .expect("DevTools connection open");
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method}"))
            .expect("answer");
        assert!(answer.get("error").is_none(), "{method} failed: {answer}");
        answer["result"].clone()
    }

    /// `new_page`, with `script` run before the page's own scripts at every load.
    pub async fn new_page_running(&self, url: &str, script: &str) -> Page<'_> {
        let page = self.new_page("about:blank").await;
        page.on_every_load(script).await;
        page.goto(url).await;
        page
    }

    /// A page in a fresh browser context (its own storage, like another person's browser).
    pub async fn new_page(&self, url: &str) -> Page<'_> {
        let ctx = self
            .call(None, "Target.createBrowserContext", json!({}))
            .await;
        self.new_page_in(&ctx["browserContextId"], url).await
    }

    /// A page in the browser context `context`.
    async fn new_page_in(&self, context: &Value, url: &str) -> Page<'_> {
        let target = self
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context}),
            )
            .await;
        let page = self.attach(&target["targetId"]).await;
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Network.enable",
            "Log.enable",
        ] {
            page.call(domain, json!({})).await;
        }
        page.goto(url).await;
        page
    }

    /// A session with the target `id` (a page or a worker).
    async fn attach(&self, id: &Value) -> Page<'_> {
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": id, "flatten": true}),
            )
            .await;
        Page {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        }
    }
}

/// A script for `new_page_running` that sets the page's clock `ms` off: `Date.now()` and
/// `new Date()` say so, as on a device whose clock is wrong.
pub fn clock_off_by(ms: i64) -> String {
    format!(
        "(() => {{ const off = {ms}; const Real = Date; const realNow = Real.now.bind(Real); \
         class Off extends Real {{ \
           constructor(...a) {{ if (a.length === 0) super(realNow() + off); else super(...a); }} \
           static now() {{ return realNow() + off; }} }} \
         globalThis.Date = Off; }})()"
    )
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    pub async fn goto(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", 20)
            .await;
    }

    pub async fn reload(&self) {
        self.call("Page.reload", json!({})).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.wait_for("document.readyState === 'complete'", 20)
            .await;
    }

    /// How many elements of the page match a CSS selector.
    pub async fn count(&self, selector: &str) -> u64 {
        let expression = format!("document.querySelectorAll({}).length", json!(selector));
        self.eval(&expression).await.as_u64().expect("a count")
    }

    /// Evaluate an expression (promises are awaited) and return its JSON value.
    pub async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Wait until `expression` is truthy; returns its value.
    pub async fn wait_for(&self, expression: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self
                .call(
                    "Runtime.evaluate",
                    json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
                )
                .await;
            let v = r["result"]["value"].clone();
            let truthy = !(v.is_null()
                || v == json!(false)
                || v == json!(0)
                || v == json!("")
                || r.get("exceptionDetails").is_some());
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expression}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Open a blank tab in front of this page in its window, as a person switching tabs
    /// does: this page becomes hidden (`document.hidden`) until `bring_to_front`.
    pub async fn open_tab_in_front(&self) {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": "window.open('about:blank') !== null", "userGesture": true, "returnByValue": true}),
            )
            .await;
        assert_eq!(r["result"]["value"], json!(true), "the new tab opened");
        self.wait_for("document.hidden", 10).await;
    }

    /// Make this page the tab in front again.
    pub async fn bring_to_front(&self) {
        self.call("Page.bringToFront", json!({})).await;
        self.wait_for("!document.hidden", 10).await;
    }

    /// Run `script` in this page before its own scripts, at every load from the next one on.
    async fn on_every_load(&self, script: &str) {
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": script}),
        )
        .await;
    }

    /// This page's browser context.
    async fn context(&self) -> Value {
        let info = self.call("Target.getTargetInfo", json!({})).await;
        info["targetInfo"]["browserContextId"].clone()
    }

    /// Another tab in this page's browser context (the same person's browser), at `url`,
    /// running `script` as `new_page_running` does.
    pub async fn open_beside(&self, url: &str, script: &str) -> Page<'_> {
        let page = self
            .browser
            .new_page_in(&self.context().await, "about:blank")
            .await;
        page.on_every_load(script).await;
        page.goto(url).await;
        page
    }

    /// The service worker whose script is at `url`, running for this page's browser context
    /// (waits up to 10 s for it to start): `eval` runs in its global scope.
    pub async fn service_worker(&self, url: &str) -> Page<'_> {
        let context = self.context().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let targets = self
                .browser
                .call(None, "Target.getTargets", json!({}))
                .await;
            let worker = targets["targetInfos"].as_array().and_then(|all| {
                all.iter().find(|t| {
                    t["type"] == "service_worker"
                        && t["url"] == url
                        && t["browserContextId"] == context
                })
            });
            if let Some(worker) = worker {
                return self.browser.attach(&worker["targetId"]).await;
            }
            assert!(Instant::now() < deadline, "no service worker {url} started");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Grant this page's browser context a permission (as "Allow" in the browser's prompt)
    /// for `origin`.
    pub async fn grant(&self, permission: &str, origin: &str) {
        let context = self.context().await;
        self.browser
            .call(
                None,
                "Browser.grantPermissions",
                json!({
                    "permissions": [permission],
                    "origin": origin,
                    "browserContextId": context,
                }),
            )
            .await;
    }

    /// Run no script of the page from now on (as a browser with JavaScript turned off).
    pub async fn disable_javascript(&self) {
        self.call(
            "Emulation.setScriptExecutionDisabled",
            json!({"value": true}),
        )
        .await;
    }

    /// Emulate the user's light or dark colour-scheme preference.
    pub async fn prefer_color_scheme(&self, scheme: &str) {
        self.call(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        )
        .await;
    }

    /// Emulate a screen of this size (CSS pixels), and return once the page has laid itself
    /// out for it (two animation frames: resize observers have run by then).
    pub async fn set_viewport(&self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 2, "mobile": true}),
        )
        .await;
        self.eval(
            "new Promise(done => { requestAnimationFrame(() => requestAnimationFrame(done)); \
             setTimeout(done, 1000); }).then(() => true)",
        )
        .await;
    }

    /// A PNG of what the element `selector` covers, scrolled into view first.
    pub async fn screenshot_of(&self, selector: &str) -> Vec<u8> {
        let rect = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); e.scrollIntoView(); \
                 const r = e.getBoundingClientRect(); \
                 return {{x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}}; }})()"
            ))
            .await;
        self.capture(json!({"format": "png", "clip": {
            "x": rect["x"], "y": rect["y"], "width": rect["width"], "height": rect["height"], "scale": 1
        }}))
        .await
    }

    async fn capture(&self, params: Value) -> Vec<u8> {
        use base64::Engine as _;
        let shot = self.call("Page.captureScreenshot", params).await;
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64 PNG")
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        self.capture(json!({"format": "png"})).await
    }

    /// URLs this page requested so far.
    pub fn requests(&self) -> Vec<String> {
        let logs = self.browser.logs.lock().unwrap();
        logs.get(&self.session)
            .map(|l| l.requests.clone())
            .unwrap_or_default()
    }

    /// Console and browser log lines of this page so far.
    pub fn logs(&self) -> Vec<String> {
        let logs = self.browser.logs.lock().unwrap();
        logs.get(&self.session)
            .map(|l| l.logs.clone())
            .unwrap_or_default()
    }
}
