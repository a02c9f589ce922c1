//! `distill collect`: asks an OpenAI-compatible endpoint for completions of many prompts, with
//! bounded concurrency, `429`/`Retry-After` back-off and retries of transient errors, writing each
//! answer to `responses.jsonl` as it arrives; a rerun with `resume` skips what is already there.
//!
//! Output dir: `collect.json` (what was asked: model, prompts file hash, sampling settings) and
//! `responses.jsonl`, one object per prompt in completion order:
//! `{"index", "messages", "model", "completion", "finish_reason", "usage", "logprobs"}` where
//! `logprobs` is the response's `choices[0].logprobs.content` (token, logprob, bytes,
//! top_logprobs) or null.

use distill_core::error::{Error, Result};
use distill_core::fsio::{read_text, write_atomic};
use distill_core::ChatMessage;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Base URL: `http://host:port` or `http://host:port/v1`.
    pub endpoint: String,
    pub api_key: Option<String>,
    /// None: the first model `GET /v1/models` lists.
    pub model: Option<String>,
    pub prompts: PathBuf,
    pub out: PathBuf,
    pub concurrency: usize,
    /// Alternatives per token (0–20); None: no logprobs asked.
    pub top_logprobs: Option<usize>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: Option<u64>,
    /// Prepended as a system message.
    pub system: Option<String>,
    pub resume: bool,
    /// Retries of one request after transient errors (5xx, timeouts, refused connections);
    /// 429s are waited out and not counted.
    pub max_retries: u32,
    /// Only the first N prompts.
    pub limit: Option<usize>,
    /// Ask `POST /v1/completions` with each prompt as plain text (the user turns' text joined
    /// by newlines) instead of the chat endpoint; `top_logprobs` ≤ 5 there.
    pub completions: bool,
}

/// What `collect.json` records; a resumed run must ask for the same.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CollectMeta {
    pub model: String,
    pub prompts_file: String,
    pub prompts_sha256: String,
    pub prompts: usize,
    pub top_logprobs: Option<usize>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub seed: Option<u64>,
    pub system: Option<String>,
    /// Asked of the plain-text completions endpoint (not chat).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub completions: bool,
}

/// One line of `responses.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Collected {
    pub index: usize,
    pub messages: Vec<ChatMessage>,
    pub model: String,
    pub completion: String,
    pub finish_reason: Option<String>,
    pub usage: Value,
    /// `choices[0].logprobs.content` as the server sent it.
    pub logprobs: Option<Vec<TokenInfo>>,
}

/// A token of a chat `logprobs.content` list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenInfo {
    pub token: String,
    pub logprob: f64,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    #[serde(default)]
    pub top_logprobs: Vec<TopInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopInfo {
    pub token: String,
    pub logprob: f64,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// Counters for the progress display.
#[derive(Debug, Clone, Default)]
pub struct CollectProgress {
    pub total: usize,
    /// Already in the file before this run.
    pub skipped: usize,
    pub done: usize,
    pub completion_tokens: u64,
    pub failed: usize,
    pub retries: u64,
    pub rate_limited: u64,
}

#[derive(Debug, Clone)]
pub struct CollectSummary {
    pub progress: CollectProgress,
    pub failures: Vec<(usize, String)>,
    pub elapsed: Duration,
    pub responses: PathBuf,
}

/// A prompts file (one owner: `distill_core::prompts`).
pub use distill_core::prompts::read_prompts;

/// `http://h:p`, `http://h:p/`, `http://h:p/v1/` → `http://h:p/v1`.
pub fn api_base(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1") {
        e.to_string()
    } else {
        format!("{e}/v1")
    }
}

/// The indices already answered in `responses.jsonl`, after cutting a torn last line (a killed
/// run) off the file.
fn done_indices(path: &Path) -> Result<HashSet<usize>> {
    if !path.exists() {
        return Ok(HashSet::new());
    }
    let (records, complete) =
        distill_core::fsio::read_jsonl::<Collected>(path, "a collected response")?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(complete).map_err(|e| Error::io(path, e))?;
    Ok(records.into_iter().map(|r| r.index).collect())
}

enum Outcome {
    Ok(Box<Collected>),
    Failed(usize, String),
}

struct Requester {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    max_retries: u32,
}

/// Seconds to wait from a 429's `Retry-After` (seconds) or `retry-after-ms` header.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

fn backoff(attempt: u32) -> Duration {
    let base = 0.25 * 2f64.powi(attempt.min(7) as i32);
    let jitter = rand::random::<f64>() * 0.25 * base;
    Duration::from_secs_f64((base + jitter).min(30.0))
}

impl Requester {
    /// Posts `body`, waiting out 429s and retrying transient failures. Returns the response JSON
    /// and the number of retries and 429s met.
    async fn post(&self, body: &Value) -> (std::result::Result<Value, String>, u64, u64) {
        let (mut retries, mut limited) = (0u64, 0u64);
        let mut attempt = 0u32;
        loop {
            let mut req = self.http.post(&self.url).json(body);
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            let transient = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return match resp.json::<Value>().await {
                            Ok(v) => (Ok(v), retries, limited),
                            Err(e) => (Err(format!("bad response body: {e}")), retries, limited),
                        };
                    }
                    if status.as_u16() == 429 {
                        limited += 1;
                        let wait = retry_after(resp.headers()).unwrap_or_else(|| backoff(attempt));
                        if limited > 1000 {
                            return (Err("rate limited 1000 times".into()), retries, limited);
                        }
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let text = resp.text().await.unwrap_or_default();
                    let msg = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                        .unwrap_or(text);
                    if status.is_server_error() || status.as_u16() == 408 {
                        format!("HTTP {status}: {msg}")
                    } else {
                        return (Err(format!("HTTP {status}: {msg}")), retries, limited);
                    }
                }
                Err(e) => format!("{e}"),
            };
            if attempt >= self.max_retries {
                return (
                    Err(format!("{transient} (after {attempt} retries)")),
                    retries,
                    limited,
                );
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
            retries += 1;
        }
    }
}

/// Runs a collection; `on_progress` is called after each answer.
pub async fn collect(
    opts: &CollectOptions,
    mut on_progress: impl FnMut(&CollectProgress),
) -> Result<CollectSummary> {
    let start = Instant::now();
    let mut prompts = read_prompts(&opts.prompts)?;
    if let Some(n) = opts.limit {
        prompts.truncate(n);
    }
    if opts.top_logprobs.is_some_and(|k| k > 20) {
        return Err(Error::Msg(
            "--top-logprobs: at most 20 (OpenAI's limit)".into(),
        ));
    }
    if opts.completions && opts.top_logprobs.is_some_and(|k| k > 5) {
        return Err(Error::Msg(
            "--top-logprobs: at most 5 with --completions (the completions endpoint's limit)"
                .into(),
        ));
    }
    let base = api_base(&opts.endpoint);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(900))
        .build()
        .map_err(|e| Error::Msg(format!("HTTP client: {e}")))?;
    let model = match &opts.model {
        Some(m) => m.clone(),
        None => {
            let mut req = http.get(format!("{base}/models"));
            if let Some(k) = &opts.api_key {
                req = req.bearer_auth(k);
            }
            let v: Value = req
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| Error::Msg(format!("{base}/models: {e}")))?
                .json()
                .await
                .map_err(|e| Error::Msg(format!("{base}/models: bad JSON: {e}")))?;
            v["data"][0]["id"]
                .as_str()
                .ok_or_else(|| Error::Msg(format!("{base}/models lists no model; pass --model")))?
                .to_string()
        }
    };
    let prompts_bytes = std::fs::read(&opts.prompts).map_err(|e| Error::io(&opts.prompts, e))?;
    let meta = CollectMeta {
        model: model.clone(),
        prompts_file: opts.prompts.display().to_string(),
        prompts_sha256: distill_core::digest::sha256_hex(&prompts_bytes),
        prompts: prompts.len(),
        top_logprobs: opts.top_logprobs,
        max_tokens: opts.max_tokens,
        temperature: opts.temperature,
        seed: opts.seed,
        system: opts.system.clone(),
        completions: opts.completions,
    };
    let meta_path = opts.out.join("collect.json");
    let responses = opts.out.join("responses.jsonl");
    if responses.exists() || meta_path.exists() {
        if !opts.resume {
            return Err(Error::file(
                &opts.out,
                "already holds a collection; pass --resume to continue it, or choose another --out",
            ));
        }
        let old: CollectMeta = serde_json::from_str(&read_text(&meta_path)?)
            .map_err(|e| Error::file(&meta_path, format!("not a collect.json: {e}")))?;
        let mut differ = Vec::new();
        if old.model != meta.model {
            differ.push(format!("model {} → {}", old.model, meta.model));
        }
        if old.prompts_sha256 != meta.prompts_sha256 {
            differ.push("prompts file contents".to_string());
        }
        if old.top_logprobs != meta.top_logprobs
            || old.max_tokens != meta.max_tokens
            || old.temperature != meta.temperature
            || old.seed != meta.seed
            || old.system != meta.system
        {
            differ.push(
                "sampling settings (top_logprobs, max_tokens, temperature, seed, system)".into(),
            );
        }
        if old.completions != meta.completions {
            differ.push("endpoint (chat or plain-text completions)".into());
        }
        if !differ.is_empty() {
            return Err(Error::file(
                &meta_path,
                format!(
                    "cannot resume: this run asks for other {}",
                    differ.join(", ")
                ),
            ));
        }
    } else {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        write_atomic(
            &meta_path,
            serde_json::to_string_pretty(&meta)
                .expect("meta serialises")
                .as_bytes(),
        )?;
    }
    let done = done_indices(&responses)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&responses)
        .map_err(|e| Error::io(&responses, e))?;
    let mut progress = CollectProgress {
        total: prompts.len(),
        skipped: prompts.len().min(done.len()),
        ..Default::default()
    };
    on_progress(&progress);
    let requester = std::sync::Arc::new(Requester {
        http,
        url: match opts.completions {
            true => format!("{base}/completions"),
            false => format!("{base}/chat/completions"),
        },
        api_key: opts.api_key.clone(),
        max_retries: opts.max_retries,
    });
    let todo: Vec<(usize, Vec<ChatMessage>)> = prompts
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !done.contains(i))
        .collect();
    let mut results = futures_util::stream::iter(todo.into_iter().map(|(index, user)| {
        let requester = requester.clone();
        let mut messages = Vec::new();
        if let Some(s) = &opts.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.extend(user);
        let mut body = match opts.completions {
            true => json!({
                "model": model, "max_tokens": opts.max_tokens, "temperature": opts.temperature,
                "prompt": messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
            }),
            false => json!({
                "model": model, "messages": messages, "max_tokens": opts.max_tokens,
                "temperature": opts.temperature,
            }),
        };
        match (opts.top_logprobs, opts.completions) {
            (Some(k), false) => {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(k);
            }
            (Some(k), true) => body["logprobs"] = json!(k),
            (None, _) => {}
        }
        if let Some(s) = opts.seed {
            body["seed"] = json!(s.wrapping_add(index as u64));
        }
        async move {
            let (res, retries, limited) = requester.post(&body).await;
            let outcome = match res {
                Ok(v) => match parse_answer(index, messages, &v) {
                    Ok(c) => Outcome::Ok(Box::new(c)),
                    Err(e) => Outcome::Failed(index, e),
                },
                Err(e) => Outcome::Failed(index, e),
            };
            (outcome, retries, limited)
        }
    }))
    .buffer_unordered(opts.concurrency.max(1));
    let mut failures = Vec::new();
    while let Some((outcome, retries, limited)) = results.next().await {
        progress.retries += retries;
        progress.rate_limited += limited;
        match outcome {
            Outcome::Ok(c) => {
                let mut line = serde_json::to_string(&c).expect("a response serialises");
                line.push('\n');
                file.write_all(line.as_bytes())
                    .and_then(|_| file.flush())
                    .map_err(|e| Error::io(&responses, e))?;
                progress.done += 1;
                progress.completion_tokens += c.usage["completion_tokens"].as_u64().unwrap_or(0);
            }
            Outcome::Failed(i, e) => {
                progress.failed += 1;
                failures.push((i, e));
            }
        }
        on_progress(&progress);
    }
    failures.sort();
    Ok(CollectSummary {
        progress,
        failures,
        elapsed: start.elapsed(),
        responses,
    })
}

fn parse_answer(
    index: usize,
    messages: Vec<ChatMessage>,
    v: &Value,
) -> std::result::Result<Collected, String> {
    let choice = &v["choices"][0];
    let (completion, logprobs) = match choice["text"].as_str() {
        // The plain-text completions endpoint.
        Some(text) => (text.to_string(), completions_logprobs(&choice["logprobs"])?),
        None => {
            let completion = choice["message"]["content"]
                .as_str()
                .ok_or_else(|| "response has no choices[0].message.content".to_string())?
                .to_string();
            let logprobs = match &choice["logprobs"]["content"] {
                Value::Null => None,
                c => Some(
                    serde_json::from_value::<Vec<TokenInfo>>(c.clone())
                        .map_err(|e| format!("bad logprobs.content: {e}"))?,
                ),
            };
            (completion, logprobs)
        }
    };
    Ok(Collected {
        index,
        messages,
        model: v["model"].as_str().unwrap_or_default().to_string(),
        completion,
        finish_reason: choice["finish_reason"].as_str().map(str::to_string),
        usage: v["usage"].clone(),
        logprobs,
    })
}

/// The completions endpoint's `logprobs` object (parallel `tokens`, `token_logprobs`, and
/// `top_logprobs` maps of token → logprob) as chat-style tokens, alternatives most likely first.
fn completions_logprobs(v: &Value) -> std::result::Result<Option<Vec<TokenInfo>>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let bad = |what: &str| format!("bad completions logprobs: {what}");
    let tokens = v["tokens"].as_array().ok_or_else(|| bad("no tokens"))?;
    let lps = v["token_logprobs"]
        .as_array()
        .ok_or_else(|| bad("no token_logprobs"))?;
    let tops = v["top_logprobs"].as_array();
    let mut out = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let mut top: Vec<TopInfo> = tops
            .and_then(|a| a.get(i))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, lp)| {
                        lp.as_f64().map(|logprob| TopInfo {
                            token: k.clone(),
                            logprob,
                            bytes: None,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
        out.push(TokenInfo {
            token: t
                .as_str()
                .ok_or_else(|| bad("a token is not a string"))?
                .to_string(),
            logprob: lps.get(i).and_then(Value::as_f64).unwrap_or(f64::NAN),
            bytes: None,
            top_logprobs: top,
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_answers_parse_into_chat_style_tokens() {
        let v = json!({"model": "m", "choices": [{"text": " the cat", "finish_reason": "length",
            "logprobs": {"tokens": [" the", " cat"], "token_logprobs": [-0.5, -1.0],
                "top_logprobs": [{" a": -1.5, " the": -0.5}, {" cat": -1.0}]}}]});
        let c = parse_answer(3, vec![ChatMessage::new("user", "p")], &v).unwrap();
        assert_eq!(c.completion, " the cat");
        let lp = c.logprobs.unwrap();
        assert_eq!(lp[0].token, " the");
        assert_eq!(lp[0].top_logprobs[0].token, " the"); // most likely first
        assert_eq!(lp[0].top_logprobs[1].token, " a");
        assert_eq!(lp[1].top_logprobs.len(), 1);
    }

    #[test]
    fn base_urls() {
        assert_eq!(api_base("http://h:1"), "http://h:1/v1");
        assert_eq!(api_base("http://h:1/"), "http://h:1/v1");
        assert_eq!(api_base("http://h:1/v1/"), "http://h:1/v1");
    }

    #[test]
    fn prompts_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        std::fs::write(&p, "hello\n\n{\"prompt\": \"x\"}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"u\"}]}\n").unwrap();
        let ps = read_prompts(&p).unwrap();
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[2][0].role, "system");
        std::fs::write(&p, "{\"nope\": 1}\n").unwrap();
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains("p.txt") && e.contains("line 1"), "{e}");
        std::fs::write(&p, "\n\n").unwrap();
        assert!(read_prompts(&p)
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
        // A torn last line is cut off and not counted.
        let r = dir.path().join("responses.jsonl");
        let rec = Collected {
            index: 4,
            messages: vec![],
            model: "m".into(),
            completion: "c".into(),
            finish_reason: Some("stop".into()),
            usage: json!({}),
            logprobs: None,
        };
        let line = serde_json::to_string(&rec).unwrap();
        std::fs::write(&r, format!("{line}\n{}", &line[..10])).unwrap();
        let done = done_indices(&r).unwrap();
        assert_eq!(done, HashSet::from([4]));
        assert_eq!(std::fs::read_to_string(&r).unwrap(), format!("{line}\n"));
    }
}
