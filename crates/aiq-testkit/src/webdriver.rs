//! A small client of the W3C WebDriver protocol (JSON over HTTP) that drives a real headless
//! Chromium through Debian's `chromedriver`, for the browser tests.
//!
//! [`Browser::start`] runs `chromedriver` on a free loopback port (a child that dies with us),
//! waits until its `/status` says ready and opens a session with a fresh profile folder. Dropping
//! the browser ends the session (which closes Chromium), stops the driver and removes the folder.
//! Every failure the driver reports carries its `error` and `message` ([`WebDriverError`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::localsvc::{die_with_parent, find_binary, free_port, run_folder};

/// The key under which W3C WebDriver names an element in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const POLL: Duration = Duration::from_millis(50);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Chromium's flags: headless, no sandbox (we may run as root), a fixed window, and none of its
/// own outgoing connections (refused on the test machines; these flags stop it trying).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
];

/// An error the WebDriver server answered with: its HTTP status, `error` code and `message`.
#[derive(Debug, Clone)]
pub struct WebDriverError {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "webdriver error {} ({}): {}",
            self.error, self.status, self.message
        )
    }
}

impl std::error::Error for WebDriverError {}

/// A headless Chromium in a WebDriver session of its own.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>`, the driver's address.
    base: String,
    port: u16,
    session: String,
    driver: Child,
    profile: PathBuf,
}

/// An element of the current page, as the driver names it.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Starts `chromedriver` and a headless Chromium in a new session. Fails with a clear
    /// message when either binary is missing (`scripts/ensure-deps` installs them).
    pub async fn start() -> anyhow::Result<Browser> {
        let driver_bin = find_binary("chromedriver")
            .context("chromedriver is not installed: run scripts/ensure-deps")?;
        let chromium = find_binary("chromium")
            .context("chromium is not installed: run scripts/ensure-deps")?;
        let profile = run_folder("chromium")?;
        let port = free_port()?;
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let driver = cmd
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut browser = Browser {
            http,
            base: format!("http://127.0.0.1:{port}"),
            port,
            session: String::new(),
            driver,
            profile,
        };
        browser.wait_ready().await?;
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": args},
                }
            }
        });
        let url = format!("{}/session", browser.base);
        let value = browser.send(browser.http.post(url).json(&caps)).await?;
        browser.session = value["sessionId"]
            .as_str()
            .context("the new session's answer has no sessionId")?
            .to_string();
        Ok(browser)
    }

    /// Polls the driver's `GET /status` until it says ready.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.driver.try_wait()? {
                bail!("chromedriver exited before it was ready: {status}");
            }
            let answer = self.http.get(format!("{}/status", self.base)).send().await;
            if let Ok(answer) = answer
                && let Ok(body) = answer.json::<Value>().await
                && body["value"]["ready"] == json!(true)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("chromedriver was not ready after {START_TIMEOUT:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends a request and returns the answer's `value`, or the driver's error.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let answer = request.send().await.context("calling chromedriver")?;
        let status = answer.status();
        let mut body: Value = answer
            .json()
            .await
            .with_context(|| format!("chromedriver's answer ({status}) is not JSON"))?;
        let value = body["value"].take();
        if status.is_success() {
            return Ok(value);
        }
        Err(WebDriverError {
            status: status.as_u16(),
            error: value["error"]
                .as_str()
                .unwrap_or("unknown error")
                .to_string(),
            message: value["message"].as_str().unwrap_or("").to_string(),
        }
        .into())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// Opens `url` and returns when the page has loaded.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.post("/url", json!({ "url": url })).await?;
        Ok(())
    }

    /// The address of the page now shown.
    pub async fn current_url(&self) -> anyhow::Result<String> {
        let v = self.get("/url").await?;
        v.as_str()
            .map(str::to_string)
            .context("the current url is not a string")
    }

    /// The page's HTML as the browser now has it.
    pub async fn page_source(&self) -> anyhow::Result<String> {
        let v = self.get("/source").await?;
        v.as_str()
            .map(str::to_string)
            .context("the page source is not a string")
    }

    /// The first element that matches the CSS selector, or the driver's `no such element`.
    pub async fn find(&self, css: &str) -> anyhow::Result<Element<'_>> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await
            .with_context(|| format!("finding {css:?}"))?;
        self.element(&v)
    }

    /// Every element that matches the CSS selector, in document order (none is not an error).
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element<'_>>> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await
            .with_context(|| format!("finding all {css:?}"))?;
        v.as_array()
            .context("the elements are not a list")?
            .iter()
            .map(|e| self.element(e))
            .collect()
    }

    fn element(&self, v: &Value) -> anyhow::Result<Element<'_>> {
        let id = v[ELEMENT_KEY]
            .as_str()
            .with_context(|| format!("no element reference in {v}"))?;
        Ok(Element {
            browser: self,
            id: id.to_string(),
        })
    }

    /// Polls until an element matches the CSS selector and returns it; fails after `timeout`
    /// with the last error the driver gave.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<Element<'_>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.find(css).await {
                Ok(e) => return Ok(e),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("waited {timeout:?} for {css:?}")));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Polls until the element that matches `css` has a text containing `needle`, reloading
    /// nothing (the page or its script must change); returns the text.
    pub async fn wait_for_text(
        &self,
        css: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.find(css).await
                && let Ok(text) = e.text().await
            {
                if text.contains(needle) {
                    return Ok(text);
                }
                last = text;
            }
            if Instant::now() >= deadline {
                bail!("waited {timeout:?} for {css:?} to contain {needle:?}; it held {last:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `script` (a function body; `return` gives its value) in the page and returns what
    /// it returned, as JSON. It reloads nothing.
    pub async fn execute(&self, script: &str) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({ "script": script, "args": [] }))
            .await
            .with_context(|| format!("running {script:?}"))
    }

    /// Deletes every cookie of the current page's site (a fresh sign-in without a new browser).
    pub async fn delete_cookies(&self) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url("/cookie"))).await?;
        Ok(())
    }

    /// Saves a PNG of the window to `path` (folders made as needed) and returns its bytes.
    pub async fn screenshot_png(&self, path: &Path) -> anyhow::Result<Vec<u8>> {
        let v = self.get("/screenshot").await?;
        let b64 = v.as_str().context("the screenshot is not a string")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("the screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
        Ok(png)
    }

    /// Ends the session with a plain blocking request, so that it also works from `drop`.
    fn delete_session(&self) -> std::io::Result<()> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            stream,
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session, self.port
        )?;
        // The answer comes once Chromium has closed; its content does not matter.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.delete_session();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Element<'_> {
    fn path(&self, tail: &str) -> String {
        format!("/element/{}{tail}", self.id)
    }

    /// Clicks the element (the driver scrolls it into view first).
    pub async fn click(&self) -> anyhow::Result<()> {
        self.browser.post(&self.path("/click"), json!({})).await?;
        Ok(())
    }

    /// Types `text` into the element.
    pub async fn send_keys(&self, text: &str) -> anyhow::Result<()> {
        self.browser
            .post(&self.path("/value"), json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// The element's rendered text.
    pub async fn text(&self) -> anyhow::Result<String> {
        let v = self.browser.get(&self.path("/text")).await?;
        v.as_str()
            .map(str::to_string)
            .context("the element's text is not a string")
    }

    /// The element's attribute `name`, or None when it has none.
    pub async fn attr(&self, name: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .browser
            .get(&self.path(&format!("/attribute/{name}")))
            .await?;
        Ok(v.as_str().map(str::to_string))
    }
}
