//! A real headless browser for the dashboard tests: Debian's `chromium`,
//! driven through `chromedriver` over the W3C WebDriver protocol (plain
//! JSON over HTTP on loopback, so a few calls cover what the tests need).

use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The element reference key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
#[error("webdriver: {0}")]
pub struct BrowserError(pub String);

type Result<T> = std::result::Result<T, BrowserError>;

fn find(names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

impl Browser {
    /// Starts chromedriver on a free port and a headless chromium session.
    pub async fn start() -> Result<Browser> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let driver_path = find(&["chromedriver", "chromium-driver"]).ok_or_else(|| {
            BrowserError("chromedriver is not installed: run .ci/install-test-tools (Debian chromium-driver)".into())
        })?;
        let chromium = find(&["chromium", "chromium-browser"]).ok_or_else(|| {
            BrowserError("chromium is not installed: run .ci/install-test-tools".into())
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| BrowserError(e.to_string()))?
            .port();
        let driver = Command::new(driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BrowserError(format!("start chromedriver: {e}")))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .map_err(|e| BrowserError(e.to_string()))?;
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match browser
                .http
                .get(format!("{}/status", browser.base))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => return Err(BrowserError("chromedriver did not come up".into())),
            }
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        }}});
        let value = browser.call("POST", "/session", Some(caps)).await?;
        browser.session = value["sessionId"]
            .as_str()
            .ok_or_else(|| BrowserError(format!("no session in {value}")))?
            .to_string();
        Ok(browser)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body.unwrap_or(json!({}))),
        };
        let response = request
            .send()
            .await
            .map_err(|e| BrowserError(format!("{method} {path}: {e}")))?;
        let value: Value = response
            .json()
            .await
            .map_err(|e| BrowserError(format!("{method} {path}: {e}")))?;
        let value = value.get("value").cloned().unwrap_or(Value::Null);
        if let Some(error) = value.get("error") {
            return Err(BrowserError(format!(
                "{method} {path}: {error}: {}",
                value
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default()
            )));
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.call(
            "POST",
            &self.session_path("/url"),
            Some(json!({"url": url})),
        )
        .await
        .map(drop)
    }

    pub async fn current_url(&self) -> Result<String> {
        let v = self.call("GET", &self.session_path("/url"), None).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Every URL the browser was sent to so far is in its history; this
    /// is the page's own source, as served.
    /// The page's URL once it is `wanted` (a click that submits a form
    /// may return before the navigation ends), or the last one seen after
    /// `timeout`.
    pub async fn wait_url(&self, wanted: &str, timeout: std::time::Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let url = self.current_url().await?;
            if url == wanted || std::time::Instant::now() >= deadline {
                return Ok(url);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn source(&self) -> Result<String> {
        let v = self
            .call("GET", &self.session_path("/source"), None)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The first element matching `css`, waited for up to 5 s: after a
    /// click that submits a form, the next page may still be loading on a
    /// busy machine.
    async fn element(&self, css: &str) -> Result<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let found = self
                .call(
                    "POST",
                    &self.session_path("/element"),
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await;
            match found {
                Ok(v) if v[ELEMENT].is_string() => {
                    return Ok(v[ELEMENT].as_str().unwrap_or_default().to_string());
                }
                Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Ok(v) => return Err(BrowserError(format!("no element {css}: {v}"))),
                Err(e) => return Err(e),
            }
        }
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> Result<String> {
        let id = self.element(css).await?;
        let v = self
            .call(
                "GET",
                &self.session_path(&format!("/element/{id}/text")),
                None,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The texts of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Result<Vec<String>> {
        let v = self
            .call(
                "POST",
                &self.session_path("/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        let mut texts = Vec::new();
        for element in v.as_array().cloned().unwrap_or_default() {
            if let Some(id) = element[ELEMENT].as_str() {
                let t = self
                    .call(
                        "GET",
                        &self.session_path(&format!("/element/{id}/text")),
                        None,
                    )
                    .await?;
                texts.push(t.as_str().unwrap_or_default().to_string());
            }
        }
        Ok(texts)
    }

    pub async fn attribute(&self, css: &str, name: &str) -> Result<Option<String>> {
        let id = self.element(css).await?;
        let v = self
            .call(
                "GET",
                &self.session_path(&format!("/element/{id}/attribute/{name}")),
                None,
            )
            .await?;
        Ok(v.as_str().map(str::to_string))
    }

    pub async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/clear")),
            None,
        )
        .await?;
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/value")),
            Some(json!({"text": text})),
        )
        .await
        .map(drop)
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/click")),
            None,
        )
        .await
        .map(drop)
    }

    /// Selects the option with `value` in the `<select>` matching `css`.
    pub async fn select(&self, css: &str, value: &str) -> Result<()> {
        self.click(&format!("{css} option[value=\"{value}\"]"))
            .await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        use base64::Engine;
        let v = self
            .call("GET", &self.session_path("/screenshot"), None)
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| BrowserError(e.to_string()))
    }
}

impl Drop for Browser {
    /// Ends the WebDriver session first: that is what stops chromium
    /// (killing chromedriver alone would leave the browser running).
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if !self.session.is_empty()
            && let Some(addr) = self.base.strip_prefix("http://")
            && let Ok(mut stream) = std::net::TcpStream::connect(addr)
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
                self.session
            );
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
