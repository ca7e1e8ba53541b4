//! Pulling an image from an http(s) URL on the board itself, so a big image
//! need not pass through the dispatcher's host: the body is streamed into
//! the deploy pipeline, and a dropped connection is resumed with a `Range`
//! request (guarded by `If-Range`, so a file that changed on the server is
//! never spliced), a bounded number of times, all within the deploy's deadline.

use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::deploy::SOURCE_BROKE;

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts after the first one (each resumes where the last stopped).
    pub retries: u32,
    /// Pause before the first retry; doubled each time, at most 8x.
    pub backoff: Duration,
    /// A connection delivering nothing for this long counts as dropped.
    pub idle: Duration,
}

/// Why a download could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL is not an http(s) URL.
    #[error("{url:?} is not an http or https URL")]
    BadUrl {
        /// The URL.
        url: String,
    },
    /// The server answered with an error status.
    #[error("GET {url}: the server answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// Its answer.
        status: StatusCode,
    },
    /// The request failed every time it was tried.
    #[error("GET {url}: {why} (after {attempts} attempts)")]
    Failed {
        /// The URL.
        url: String,
        /// The last failure.
        why: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A body was larger than allowed (a bmap).
    #[error("GET {url}: more than {limit} bytes")]
    TooBig {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
}

/// An HTTP client for the agent: rustls with bundled roots, no proxies
/// from the environment (the board's network is the lab's).
///
/// # Errors
/// When the TLS setup fails.
pub fn client(connect: Duration) -> Result<reqwest::Client, DownloadError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .no_proxy()
        .build()
        .map_err(|e| DownloadError::Failed {
            url: String::new(),
            why: e.to_string(),
            attempts: 0,
        })
}

fn check_url(url: &str) -> Result<reqwest::Url, DownloadError> {
    reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| DownloadError::BadUrl { url: url.into() })
}

/// An image download under way: the first response has arrived.
pub struct Download {
    client: reqwest::Client,
    url: reqwest::Url,
    response: reqwest::Response,
    /// The body's length, when the server says it.
    pub size: Option<u64>,
    validator: Option<HeaderValue>,
    retry: Retry,
    deadline: Instant,
}

/// The pause before retry number `n` (0-based).
fn backoff(retry: &Retry, n: u32) -> Duration {
    retry.backoff * 2u32.pow(n.min(3))
}

async fn get(
    client: &reqwest::Client,
    url: &reqwest::Url,
    range: Option<(u64, Option<&HeaderValue>)>,
    deadline: Instant,
) -> Result<reqwest::Response, String> {
    let mut req = client.get(url.clone());
    if let Some((from, validator)) = range {
        req = req.header(RANGE, format!("bytes={from}-"));
        if let Some(v) = validator {
            req = req.header(IF_RANGE, v.clone());
        }
    }
    match tokio::time::timeout_at(deadline, req.send()).await {
        Err(_) => Err("the deploy timeout passed".into()),
        Ok(Err(e)) => Err(error_chain(&e)),
        Ok(Ok(r)) => Ok(r),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

impl Download {
    /// Sends the first request, retrying connection failures and 5xx answers.
    ///
    /// # Errors
    /// A bad URL, a 4xx answer, or every attempt failed.
    pub async fn start(
        client: reqwest::Client,
        url: &str,
        retry: Retry,
        deadline: Instant,
    ) -> Result<Download, DownloadError> {
        let url = check_url(url)?;
        let mut attempt = 0;
        loop {
            let why = match get(&client, &url, None, deadline).await {
                Ok(r) if r.status().is_success() => {
                    let size = r.content_length();
                    // A strong validator lets a resumed request be refused if the file changed.
                    let validator = r
                        .headers()
                        .get(ETAG)
                        .filter(|v| !v.as_bytes().starts_with(b"W/"))
                        .or_else(|| r.headers().get(LAST_MODIFIED))
                        .cloned();
                    return Ok(Download {
                        client,
                        url,
                        response: r,
                        size,
                        validator,
                        retry,
                        deadline,
                    });
                }
                Ok(r) if !r.status().is_server_error() => {
                    return Err(DownloadError::Status {
                        url: url.to_string(),
                        status: r.status(),
                    })
                }
                Ok(r) => format!("the server answered {}", r.status()),
                Err(why) => why,
            };
            attempt += 1;
            if attempt > retry.retries || Instant::now() + backoff(&retry, attempt - 1) >= deadline
            {
                return Err(DownloadError::Failed {
                    url: url.to_string(),
                    why,
                    attempts: attempt,
                });
            }
            tracing::warn!(%url, attempt, "download failed, retrying: {why}");
            tokio::time::sleep(backoff(&retry, attempt - 1)).await;
        }
    }

    /// Streams the body into `tx`, resuming after drops. Ends by closing
    /// `tx` after the last byte, or by sending one error of kind
    /// [`SOURCE_BROKE`] (the pipeline then reports the transfer as broken).
    pub async fn pump(mut self, tx: mpsc::Sender<std::io::Result<Vec<u8>>>) {
        let mut received = 0u64;
        let mut attempt = 0u32;
        let broke = |why: String| std::io::Error::new(SOURCE_BROKE, why);
        loop {
            // Read this response until it ends or drops.
            let why = loop {
                let next = tokio::time::timeout_at(
                    self.deadline.min(Instant::now() + self.retry.idle),
                    self.response.chunk(),
                )
                .await;
                match next {
                    Ok(Ok(Some(bytes))) => {
                        received += bytes.len() as u64;
                        if tx.send(Ok(bytes.to_vec())).await.is_err() {
                            return; // the writer stopped; its error says why
                        }
                    }
                    Ok(Ok(None)) => match self.size {
                        Some(size) if received < size => {
                            break format!("the connection ended at byte {received} of {size}")
                        }
                        _ => return,
                    },
                    Ok(Err(e)) => break error_chain(&e),
                    Err(_) if Instant::now() >= self.deadline => {
                        let _ = tx
                            .send(Err(broke(format!(
                                "the deploy timeout passed after {received} bytes"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => break format!("no data for {:?}", self.retry.idle),
                }
            };
            // Resume where it stopped, if allowed.
            let resumed = loop {
                attempt += 1;
                let pause = backoff(&self.retry, attempt - 1);
                if attempt > self.retry.retries || Instant::now() + pause >= self.deadline {
                    break Err(format!("{why}; gave up after {} attempts", attempt));
                }
                tracing::warn!(url = %self.url, received, attempt, "download dropped, resuming: {why}");
                tokio::time::sleep(pause).await;
                let r = match get(
                    &self.client,
                    &self.url,
                    Some((received, self.validator.as_ref())),
                    self.deadline,
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(url = %self.url, "resume failed: {e}");
                        continue;
                    }
                };
                if r.status() == StatusCode::PARTIAL_CONTENT {
                    let from = r
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if from == Some(received) {
                        break Ok(r);
                    }
                    break Err(format!(
                        "{why}; the server resumed at {from:?}, not at byte {received}"
                    ));
                }
                if r.status().is_server_error() {
                    continue;
                }
                break Err(format!(
                    "{why}; the server answered {} to a resume from byte {received} (no ranges, or the file changed)",
                    r.status()
                ));
            };
            match resumed {
                Ok(r) => self.response = r,
                Err(why) => {
                    let _ = tx
                        .send(Err(broke(format!("GET {}: {why}", self.url))))
                        .await;
                    return;
                }
            }
        }
    }
}

/// Fetches a small file (a bmap) whole, with the same retries.
///
/// # Errors
/// As [`Download::start`], a body over `limit`, or a drop.
pub async fn small(
    client: reqwest::Client,
    url: &str,
    retry: Retry,
    deadline: Instant,
    limit: u64,
) -> Result<Vec<u8>, DownloadError> {
    let d = Download::start(client, url, retry, deadline).await?;
    let url = d.url.to_string();
    if d.size.is_some_and(|s| s > limit) {
        return Err(DownloadError::TooBig { url, limit });
    }
    let (tx, mut rx) = mpsc::channel(8);
    let pump = tokio::spawn(d.pump(tx));
    let mut body = Vec::new();
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Ok(c) => {
                body.extend_from_slice(&c);
                if body.len() as u64 > limit {
                    pump.abort();
                    return Err(DownloadError::TooBig { url, limit });
                }
            }
            Err(e) => {
                return Err(DownloadError::Failed {
                    url,
                    why: e.to_string(),
                    attempts: retry.retries + 1,
                })
            }
        }
    }
    Ok(body)
}
