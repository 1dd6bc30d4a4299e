//! The WebDriver client against a real headless Chromium and a small page of the test's own: the
//! browser starts, typing and a click reach the server, a script's change is seen, a missing
//! element is the driver's own error, and a screenshot is a PNG of the window's width.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiq_testkit::webdriver::{Browser, WebDriverError};
use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;

const WAIT: Duration = Duration::from_secs(30);

const FORM_PAGE: &str = r#"<!doctype html>
<html><head><title>form</title></head><body>
<h1>Form</h1>
<form id="hello" action="/greet" method="get">
  <input id="name" name="name" type="text">
  <button id="go" type="submit">Go</button>
</form>
<p id="status">idle</p>
<button id="toggle" type="button">Toggle</button>
<ul><li>one</li><li>two</li><li>three</li></ul>
<a id="home" href="/">home</a>
<script>
document.getElementById("toggle").addEventListener("click", function () {
  document.getElementById("status").textContent = "clicked";
});
</script>
</body></html>"#;

#[derive(serde::Deserialize)]
struct Greet {
    name: String,
}

/// Serves the form at `/` and its answer at `/greet`, keeping every name it was sent.
async fn serve_pages() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/", get(|| async { Html(FORM_PAGE) }))
        .route(
            "/greet",
            get(
                |State(seen): State<Arc<Mutex<Vec<String>>>>, Query(q): Query<Greet>| async move {
                    seen.lock().unwrap().push(q.name.clone());
                    let name = q
                        .name
                        .replace('&', "&amp;")
                        .replace('<', "&lt;")
                        .replace('>', "&gt;");
                    Html(format!(
                        "<!doctype html><html><body><h1 id=\"greeting\">Hello, {name}</h1></body></html>"
                    ))
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// The width and height in a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "{} bytes are no PNG", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "the first chunk is not IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (w, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_chromium_fills_a_form_clicks_and_takes_a_screenshot() {
    let (base, seen) = serve_pages().await;
    let browser = Browser::start()
        .await
        .expect("starting chromedriver and chromium");

    browser.goto(&format!("{base}/")).await.unwrap();
    assert_eq!(
        browser.find("h1").await.unwrap().text().await.unwrap(),
        "Form"
    );
    let items = browser.find_all("ul li").await.unwrap();
    let mut texts = Vec::new();
    for li in &items {
        texts.push(li.text().await.unwrap());
    }
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(browser.find_all("table").await.unwrap().is_empty());
    let home = browser.find("a#home").await.unwrap();
    assert_eq!(home.attr("href").await.unwrap().as_deref(), Some("/"));
    assert_eq!(home.attr("data-missing").await.unwrap(), None);

    // A script on the page runs on a click.
    browser
        .find("#toggle")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .wait_for_text("#status", "clicked", WAIT)
        .await
        .unwrap();

    // Typing and a submit reach the server, and the browser shows its answer.
    browser
        .find("input#name")
        .await
        .unwrap()
        .send_keys("Ada <Lovelace>")
        .await
        .unwrap();
    browser
        .find("button#go")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let greeting = browser.wait_for("h1#greeting", WAIT).await.unwrap();
    assert_eq!(greeting.text().await.unwrap(), "Hello, Ada <Lovelace>");
    let url = browser.current_url().await.unwrap();
    assert!(url.starts_with(&format!("{base}/greet?name=")), "{url}");
    assert_eq!(*seen.lock().unwrap(), ["Ada <Lovelace>"]);
    let source = browser.page_source().await.unwrap();
    assert!(source.contains("Hello, Ada &lt;Lovelace&gt;"), "{source}");

    // What the page lacks is the driver's own error, with its code and message.
    let err = browser
        .find("#nope")
        .await
        .err()
        .expect("#nope is not on the page");
    let wd = err
        .downcast_ref::<WebDriverError>()
        .unwrap_or_else(|| panic!("not a WebDriverError: {err:#}"));
    assert_eq!(wd.error, "no such element", "{wd}");
    assert!(wd.message.contains("#nope"), "{wd}");
    let waited = browser
        .wait_for("#nope", Duration::from_millis(300))
        .await
        .err()
        .expect("waiting for #nope ends in an error");
    assert!(
        format!("{waited:#}").contains("no such element"),
        "{waited:#}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shots").join("greet.png");
    let png = browser.screenshot_png(&path).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), png);
    let (w, h) = png_size(&png);
    assert_eq!(w, 1280, "the window is 1280 wide ({w}x{h})");
    assert!(h > 0, "{w}x{h}");
}
