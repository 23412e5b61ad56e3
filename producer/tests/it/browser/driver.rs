//! A real headless Chromium driven over WebDriver: Debian's `chromedriver`
//! on a free port, a fresh profile per browser, and helpers that wait on
//! what the page shows (never on time).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use warren::testing::Process;

use crate::helpers::free_port;

const WAIT: Duration = Duration::from_secs(20);

pub struct Browser {
    pub client: Client,
    _driver: Process,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = Process::spawn(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1"),
        )
        .expect("start chromedriver (Debian package chromium-driver; deploy/test.sh installs it)");
        let base = format!("http://127.0.0.1:{port}");
        warren::testing::eventually(WAIT, "chromedriver /status", || async {
            let r = reqwest::get(format!("{base}/status")).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"binary": "/usr/bin/chromium", "args": args}),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&base)
            .await
            .expect("a Chromium session");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    pub async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current URL")
            .path()
            .to_owned()
    }

    /// The element `css`, waiting for it to appear.
    pub async fn el(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("element {css}: {e}"))
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.el(css).await;
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.el(css).await.click().await.expect("click");
    }

    pub async fn text(&self, css: &str) -> String {
        self.el(css).await.text().await.expect("text")
    }

    /// Wait until the element `css` shows text containing `want`.
    pub async fn wait_text(&self, css: &str, want: &str) -> String {
        warren::testing::eventually(WAIT, &format!("{css} to show {want:?}"), || async {
            let e = self.client.find(Locator::Css(css)).await.ok()?;
            let t = e.text().await.ok()?;
            t.contains(want).then_some(t)
        })
        .await
    }

    /// Wait until the page is at `path`.
    pub async fn wait_path(&self, path: &str) {
        warren::testing::eventually(WAIT, &format!("the page {path}"), || async {
            (self.path().await == path).then_some(())
        })
        .await
    }

    /// Save a screenshot as `target/console-screenshots/<name>.png`.
    pub async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    /// Run `script` (a function body that returns a value) in the page.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Screenshots of the whole page at desktop (1280) and phone (390)
    /// width, `<name>.png` and `<name>-phone.png`, checking on both that
    /// the page does not scroll sideways and that nothing overflows a card.
    pub async fn shots(&self, name: &str) {
        for (width, suffix) in [(1280u32, ""), (390, "-phone")] {
            self.client
                .set_window_size(width, 900)
                .await
                .expect("resize");
            let wide = self
                .js("return document.documentElement.scrollWidth > window.innerWidth + 1;")
                .await;
            assert_eq!(
                wide,
                serde_json::Value::Bool(false),
                "{name} at {width} px scrolls sideways"
            );
            let spilled = self
                .js("return Array.from(document.querySelectorAll('.card'))\
                     .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.textContent.slice(0, 80));")
                .await;
            assert_eq!(
                spilled,
                serde_json::json!([]),
                "{name} at {width} px: a card overflows"
            );
            // The window is taller than its viewport by the browser's frame.
            let height = self
                .js("return document.documentElement.scrollHeight + 900 - window.innerHeight;")
                .await
                .as_u64()
                .unwrap_or(900)
                .clamp(600, 4000);
            self.client
                .set_window_size(width, u32::try_from(height).unwrap_or(900))
                .await
                .expect("resize");
            self.shot(&format!("{name}{suffix}")).await;
        }
        self.client
            .set_window_size(1280, 900)
            .await
            .expect("resize");
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("console-screenshots")
}
