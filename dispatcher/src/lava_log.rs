//! The job log as lava-run sends it to lava-server: one line per record,
//! `{"dt": …, "lvl": …, "msg": …}` (JSON is YAML flow style, which is what
//! LAVA's `YAMLLogger` writes), posted to
//! `URL/scheduler/internal/v1/jobs/ID/logs/` as the form fields `lines`
//! (`- ` before each line, joined by newlines) and `index` (the number of
//! lines the server has already taken), with the job's `LAVA-Token` header.
//! As `lava_common.log.sender` does: a post every interval (or at once with
//! 1,000 lines waiting), at most 1,000 lines per post, the server's
//! `line_count` answer says how many it kept, the rest is sent again.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Lines per post, as LAVA's sender.
const MAX_RECORDS: usize = 1000;

/// One LAVA log line (without the leading `- `), stamped now.
pub fn line(lvl: &str, msg: Value) -> String {
    line_at(
        &crate::events::timestamp(std::time::SystemTime::now()),
        lvl,
        msg,
    )
}

/// One LAVA log line stamped `dt` (RFC 3339, as Ferry's events are).
pub fn line_at(dt: &str, lvl: &str, msg: Value) -> String {
    // LAVA writes naive UTC timestamps (`datetime.utcnow().isoformat()`).
    let dt = dt.trim_end_matches('Z');
    json!({ "dt": dt, "lvl": lvl, "msg": msg }).to_string()
}

/// A handle to queue log lines (cheap to clone).
#[derive(Clone)]
pub struct Log {
    tx: mpsc::UnboundedSender<String>,
}

impl Log {
    /// Queues a line.
    pub fn send(&self, lvl: &str, msg: Value) {
        let _ = self.tx.send(line(lvl, msg));
    }

    /// Queues a line of something that happened at `dt` (RFC 3339).
    pub fn send_at(&self, dt: &str, lvl: &str, msg: Value) {
        let _ = self.tx.send(line_at(dt, lvl, msg));
    }
}

/// Where the log goes.
pub struct Sink {
    tx: mpsc::UnboundedSender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Starts posting to `url` (lava-server's base URL) for job `job_id`
    /// every `interval`; without a URL, lines go to stdout.
    pub fn start(url: Option<&str>, job_id: &str, token: &str, interval: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = match url {
            Some(url) => {
                let endpoint = format!(
                    "{}/scheduler/internal/v1/jobs/{job_id}/logs/",
                    url.trim_end_matches('/')
                );
                tokio::spawn(sender(rx, endpoint, token.to_string(), interval))
            }
            None => tokio::spawn(async move {
                let mut rx = rx;
                while let Some(l) = rx.recv().await {
                    println!("- {l}");
                }
            }),
        };
        Sink { tx, task }
    }

    /// A handle to queue lines; the log ends when the sink is closed and
    /// every handle dropped.
    pub fn log(&self) -> Log {
        Log {
            tx: self.tx.clone(),
        }
    }

    /// Queues a line.
    pub fn send(&self, lvl: &str, msg: Value) {
        let _ = self.tx.send(line(lvl, msg));
    }

    /// Sends what is left, giving up after `limit` (a server that never
    /// answers must not keep a canceled job's board waiting).
    pub async fn close(self, limit: Duration) -> bool {
        drop(self.tx);
        tokio::time::timeout(limit, self.task).await.is_ok()
    }
}

/// Posts up to [`MAX_RECORDS`] lines; returns how many the server took.
async fn post(
    client: &reqwest::Client,
    endpoint: &str,
    token: &str,
    lines: &[String],
    index: usize,
) -> usize {
    let n = lines.len().min(MAX_RECORDS);
    let body = format!("- {}", lines[..n].join("\n- "));
    let form = [("lines", body), ("index", index.to_string())];
    let resp = client
        .post(endpoint)
        .header("LAVA-Token", token)
        .header(
            "User-Agent",
            concat!("lava-run (ferry ", env!("CARGO_PKG_VERSION"), ")"),
        )
        .form(&form)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => match r
            .text()
            .await
            .map(|t| serde_json::from_str::<Value>(&t).unwrap_or_default())
        {
            Ok(v) => v["line_count"]
                .as_u64()
                .or_else(|| v["line_count"].as_str().and_then(|s| s.parse().ok()))
                .map_or(0, |c| (c as usize).min(n)),
            Err(_) => 0,
        },
        Ok(r) => {
            tracing::warn!("lava-server refused log lines: {}", r.status());
            0
        }
        Err(e) => {
            tracing::warn!("posting log lines: {e}");
            0
        }
    }
}

async fn sender(
    mut rx: mpsc::UnboundedReceiver<String>,
    endpoint: String,
    token: String,
    interval: Duration,
) {
    // Each post is bounded; a failed one is retried at the next interval.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot make an HTTP client: {e}");
            return;
        }
    };
    let mut pending: Vec<String> = Vec::new();
    let mut index = 0usize;
    let mut last = Instant::now();
    let mut open = true;
    while open {
        let wait = interval.saturating_sub(last.elapsed());
        if pending.is_empty() {
            match rx.recv().await {
                Some(l) => pending.push(l),
                None => open = false,
            }
        } else {
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(l)) => pending.push(l),
                Ok(None) => open = false,
                Err(_) => {}
            }
        }
        while let Ok(l) = rx.try_recv() {
            pending.push(l);
        }
        if !pending.is_empty() && (pending.len() >= MAX_RECORDS || last.elapsed() >= interval) {
            last = Instant::now();
            let took = post(&client, &endpoint, &token, &pending, index).await;
            pending.drain(..took);
            index += took;
        }
    }
    // The job is over: send the rest (the caller bounds how long).
    while !pending.is_empty() {
        let took = post(&client, &endpoint, &token, &pending, index).await;
        if took == 0 {
            tokio::time::sleep(interval.max(Duration::from_millis(200))).await;
        }
        pending.drain(..took);
        index += took;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_lava_yaml_flow_mappings() {
        let l = line(
            "results",
            json!({"definition": "smoke", "case": "a: b", "result": "pass"}),
        );
        let v: serde_norway::Value = serde_norway::from_str(&l).expect("yaml");
        assert_eq!(v["lvl"], "results");
        assert_eq!(v["msg"]["case"], "a: b");
        let dt = v["dt"].as_str().expect("dt");
        assert!(dt.len() >= 19 && !dt.ends_with('Z'), "{dt}");
    }

    /// A server that keeps only part of each post gets the rest again, with
    /// the index moved on by what it kept.
    #[tokio::test]
    async fn partial_posts_are_resent_from_the_right_index() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            let mut total = 0;
            while total < 5 {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers, then the body by Content-Length.
                let body = loop {
                    let n = s.read(&mut chunk).await.expect("read");
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(h) = text.find("\r\n\r\n") {
                        let len: usize = text[..h]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= h + 4 + len {
                            break text[h + 4..].to_string();
                        }
                    }
                };
                let lines: Vec<(String, String)> = url_decode(&body);
                let got = lines
                    .iter()
                    .find(|(k, _)| k == "lines")
                    .map(|(_, v)| v.matches("\n- ").count() + 1)
                    .unwrap_or(0);
                let index = lines
                    .iter()
                    .find(|(k, _)| k == "index")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                bodies.push((index, got));
                // Keep at most two lines per post.
                let kept = got.min(2);
                total += kept;
                let resp = format!("{{\"line_count\": {kept}}}");
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{resp}", resp.len()).as_bytes())
                    .await;
            }
            bodies
        });
        let sink = Sink::start(
            Some(&format!("http://{addr}")),
            "7",
            "tok",
            Duration::from_millis(50),
        );
        for i in 0..5 {
            sink.send("info", json!(format!("line {i}")));
        }
        assert!(sink.close(Duration::from_secs(10)).await, "flushed");
        let bodies = server.await.expect("server");
        let indexes: Vec<&str> = bodies.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(indexes, ["0", "2", "4"], "{bodies:?}");
        assert_eq!(bodies.last().map(|b| b.1), Some(1));
    }

    fn url_decode(body: &str) -> Vec<(String, String)> {
        body.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                let v = v.replace('+', " ");
                let mut out = Vec::new();
                let b = v.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i] == b'%' && i + 2 < b.len() {
                        if let Ok(x) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                            out.push(x);
                            i += 3;
                            continue;
                        }
                    }
                    out.push(b[i]);
                    i += 1;
                }
                (k.to_string(), String::from_utf8_lossy(&out).to_string())
            })
            .collect()
    }
}
