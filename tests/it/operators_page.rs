//! `GET /`, the operators' page: served open as self-contained HTML with the element ids
//! its script fills, and (where Debian's chromium is installed) rendered by a headless
//! browser against a live server: both chart series drawn, the live numbers equal to
//! `/v1/kv`'s, and a plain 401 message when the server wants a key.

use crate::http::{start_model, Server, Setup};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A 4-layer model whose layers share KV in pairs (2 slots), so the two chart series differ.
async fn start_cla(api_key: Option<&str>) -> Server {
    let ck = crate::http::small_cla_checkpoint();
    let m = ck.load();
    start_model(
        Setup {
            api_key: api_key.map(str::to_string),
            ..Default::default()
        },
        ck,
        m,
    )
    .await
}

/// The opening tag of the element with this id.
fn tag_with_id<'a>(html: &'a str, id: &str) -> Option<&'a str> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let start = html[..at].rfind('<')?;
    let end = at + html[at..].find('>')?;
    Some(&html[start..=end])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let at = tag.find(&pat)? + pat.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

/// The text of the element with this id up to its first child or closing tag.
fn text_of_id<'a>(html: &'a str, id: &str) -> Option<&'a str> {
    let tag = tag_with_id(html, id)?;
    let after = html.find(tag)? + tag.len();
    Some(&html[after..after + html[after..].find('<')?])
}

const IDS: [&str; 10] = [
    "series-shared",
    "series-unshared",
    "series-shared-alt",
    "series-unshared-alt",
    "running",
    "waiting",
    "blocks-used",
    "tokens-per-second",
    "layout",
    "api-key",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_is_open_self_contained_html() {
    for key in [None, Some("sekret")] {
        let s = start_cla(key).await;
        let r = s.client.get(format!("{}/", s.base)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "key {key:?}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"), "{h:?}");
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'"));
        let page = r.text().await.unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        for id in IDS {
            assert!(tag_with_id(&page, id).is_some(), "no element #{id}");
        }
        for series in [
            "series-shared",
            "series-unshared",
            "series-shared-alt",
            "series-unshared-alt",
        ] {
            let tag = tag_with_id(&page, series).unwrap();
            assert!(tag.starts_with("<path"), "{tag}");
            assert_eq!(attr(tag, "d"), None, "{series} is drawn only once data arrives: {tag}");
        }
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "the page names an external URL"
        );
        assert!(!page.contains(" src="), "the page loads nothing of its own");
        for fetched in [
            "\"/v1/kv\"",
            "\"/metrics\"",
            "crosskv_generation_tokens_total",
            "Authorization",
        ] {
            assert!(page.contains(fetched), "the page's script lacks {fetched}");
        }
        // The page is open; the data stays behind the key.
        let kv = s.get("/v1/kv").await.0;
        assert_eq!(kv, if key.is_some() { 401 } else { 200 }, "key {key:?}");
        assert_eq!(s.get("/metrics").await.0, 200);
        if let Some(k) = key {
            let r = s
                .client
                .get(format!("{}/v1/kv", s.base))
                .bearer_auth(k)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        assert_eq!(s.get("/nope").await.0, 404);
    }
}

/// The DOM headless chromium builds from the page after 5 s of virtual time.
async fn dump_dom(s: &Server) -> String {
    let url = format!("{}/", s.base);
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .args(["--dump-dom", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        let out = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.expect("chromium runs"),
            Err(_) => {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                panic!("chromium did not finish in 120 s");
            }
        };
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_chart_and_live_numbers() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
        return;
    }
    let s = start_cla(None).await;
    let dom = dump_dom(&s).await;
    let kv = s.wait_idle().await;
    let all = [
        "series-shared",
        "series-unshared",
        "series-shared-alt",
        "series-unshared-alt",
    ];
    for series in all {
        let tag = tag_with_id(&dom, series).unwrap_or_else(|| panic!("no #{series} in\n{dom}"));
        let d = attr(tag, "d").unwrap_or_default();
        assert!(d.starts_with('M') && d.len() > 10, "{series} not drawn: {tag}");
    }
    // Sharing halves the KV per token here, and the other dtype (fp8 beside this f32
    // cache) quarters it: four different series.
    let drawn: std::collections::HashSet<_> = all.iter().map(|s| attr(tag_with_id(&dom, s).unwrap(), "d")).collect();
    assert_eq!(drawn.len(), 4, "the series coincide");
    assert!(dom.contains("with sharing, fp8"), "the legend names the other dtype");
    for (id, field) in [
        ("running", "num_running"),
        ("waiting", "num_waiting"),
        ("blocks-used", "blocks_used"),
    ] {
        assert_eq!(
            text_of_id(&dom, id).map(str::trim),
            Some(kv[field].to_string().as_str()),
            "#{id} against /v1/kv {field}"
        );
    }
    assert_eq!(
        (kv["num_running"].as_u64(), kv["num_waiting"].as_u64()),
        (Some(0), Some(0))
    );
    // Idle: two refreshes of the generation counter give a rate of 0.
    assert_eq!(text_of_id(&dom, "tokens-per-second"), Some("0.0"));
    // The layout: 2 slots, each written by the first of its pair of layers.
    for (slot, layers) in [(0, "0, 1"), (1, "2, 3")] {
        assert!(
            dom.contains(&format!(
                "<td>slot {slot}</td><td>layer {}</td><td>{layers}</td>",
                2 * slot
            )),
            "slot {slot} row missing"
        );
    }
    assert!(tag_with_id(&dom, "slot-2-blocks").is_none());
    assert_eq!(text_of_id(&dom, "kv-status"), Some(""));

    // With --api-key and no key given, the page says /v1/kv refused it and shows no numbers.
    let s = start_cla(Some("sekret")).await;
    let dom = dump_dom(&s).await;
    let status = text_of_id(&dom, "kv-status").unwrap();
    assert!(status.contains("401") && status.contains("--api-key"), "{status:?}");
    assert_eq!(text_of_id(&dom, "running"), Some("–"));
    assert_eq!(attr(tag_with_id(&dom, "series-shared").unwrap(), "d"), None);
}
