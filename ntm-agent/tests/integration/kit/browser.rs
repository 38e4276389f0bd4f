//! A real headless Chromium (Debian's `chromium`), driven over WebDriver
//! (Debian's `chromium-driver`, with fantoccini), inside a test namespace:
//! the browser reaches nothing but that namespace, and its console and
//! network logs are kept (chromedriver's `goog:loggingPrefs`) for the test
//! to read.

use std::{
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, wd::WebDriverCompatibleCommand};
use serde_json::{Value, json};

use super::{
    Netns,
    scrape::{Guard, TempDir},
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A browser session; every call blocks until the browser has answered.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    _driver: Guard,
    _profile: TempDir,
}

/// chromedriver's log endpoint (`browser`: the console; `performance`:
/// DevTools events, the network's among them), which fantoccini does not
/// wrap.
#[derive(Debug)]
struct GetLog(&'static str);

impl WebDriverCompatibleCommand for GetLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": self.0 }).to_string()),
        )
    }
}

impl Browser {
    /// Starts chromedriver in `ns` on `port`, and a session of a fresh
    /// Chromium profile. Call it on a thread that has entered `ns` (see
    /// [`Netns::run`]): the WebDriver connections are made from it.
    pub fn start(ns: &Netns, port: u16, window: (u32, u32)) -> Self {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: apt-get install chromium chromium-driver (cargo xtask test installs them)"
            );
        }
        let profile = TempDir::new(&format!("chromium-{}", ns.name));
        let driver = Guard(
            Command::new("ip")
                .args(["netns", "exec", &ns.name, CHROMEDRIVER])
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The flags that keep Chromium from reaching for the network on
        // its own (updates, sync, field trials), and a profile of its own.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--window-size={},{}", window.0, window.1),
            format!("--user-data-dir={}", profile.0.display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
            "goog:loggingPrefs": { "browser": "ALL", "performance": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = runtime
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a WebDriver session");
        Self {
            runtime,
            client: Some(client),
            _driver: driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    pub fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("load {url}: {e}"));
    }

    pub fn set_window_size(&self, width: u32, height: u32) {
        self.runtime
            .block_on(self.client().set_window_size(width, height))
            .unwrap();
    }

    /// Runs `body` (a function body: `return ...;`) in the page.
    pub fn script(&self, body: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(body, vec![]))
            .unwrap_or_else(|e| panic!("script {body}: {e}"))
    }

    /// The text the element at `css` shows (as the user reads it).
    pub fn text(&self, css: &str) -> String {
        self.runtime
            .block_on(async {
                let element = self.client().find(Locator::Css(css)).await?;
                element.text().await
            })
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    pub fn click(&self, css: &str) {
        self.runtime
            .block_on(async {
                let element = self.client().find(Locator::Css(css)).await?;
                element.click().await
            })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// The text of an open alert, if a script opened one.
    pub fn alert(&self) -> Option<String> {
        self.runtime.block_on(self.client().get_alert_text()).ok()
    }

    /// The entries of a log since the last call (`browser` or
    /// `performance`).
    pub fn log(&self, kind: &'static str) -> Vec<Value> {
        let value = self
            .runtime
            .block_on(self.client().issue_cmd(GetLog(kind)))
            .unwrap_or_else(|e| panic!("{kind} log: {e}"));
        value.as_array().cloned().unwrap_or_default()
    }

    /// Every URL the browser asked for, from the DevTools network events
    /// of the performance log.
    pub fn requested_urls(&self) -> Vec<String> {
        self.log("performance")
            .iter()
            .filter_map(|entry| {
                let message: Value = serde_json::from_str(entry["message"].as_str()?).ok()?;
                let message = &message["message"];
                (message["method"] == "Network.requestWillBeSent")
                    .then(|| {
                        message["params"]["request"]["url"]
                            .as_str()
                            .map(String::from)
                    })
                    .flatten()
            })
            .collect()
    }

    pub fn screenshot(&self, path: &Path) {
        let png = self
            .runtime
            .block_on(self.client().screenshot())
            .expect("a screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends the session, which closes Chromium; chromedriver is
            // killed after.
            let _ = self.runtime.block_on(client.close());
        }
    }
}
