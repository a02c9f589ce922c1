//! The defence side: API keys, per-key quotas, the audit log, and the distillation-pattern report
//! built from that log.
//!
//! What the report's signals can tell, and what they cannot: a key that sends many requests, asks
//! for log-probabilities on most of them, and fills a few fixed templates with varying content
//! looks like a collection job rather than a person or an application. None of these signals is
//! proof: evaluation harnesses, batch translation jobs and retrieval pipelines look the same, and
//! a careful collector spreads its traffic over many keys, drops logprobs (sequence-level
//! distillation needs only the text), paraphrases its prompts with another model and stays under
//! the quotas. The report shows where to look; it does not decide.

use crate::protocol::ApiError;
use distill_core::error::{Error, Result};
use distill_core::fsio::read_text;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// One key in the keys file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub key: String,
    pub name: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    /// May read `/v1/admin/usage`.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeySpec>,
}

/// Reads a keys file (TOML, `[[keys]]` tables with `key`, `name`, optional
/// `requests_per_minute`, `tokens_per_day`, `admin`).
pub fn load_keys(path: &Path) -> Result<Vec<KeySpec>> {
    let text = read_text(path)?;
    let file: KeysFile = toml::from_str(&text)
        .map_err(|e| Error::file(path, format!("not a keys file: {}", e.message())))?;
    if file.keys.is_empty() {
        return Err(Error::file(path, "no [[keys]] entries"));
    }
    let mut seen = HashSet::new();
    for k in &file.keys {
        if k.key.len() < 8 {
            return Err(Error::file(
                path,
                format!("key of '{}' is shorter than 8 characters", k.name),
            ));
        }
        if !seen.insert(k.key.clone()) {
            return Err(Error::file(
                path,
                format!("key of '{}' appears twice", k.name),
            ));
        }
    }
    Ok(file.keys)
}

/// Who made a request: a key's name, or "anonymous" on a server without keys.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub admin: bool,
    limits: Option<KeySpec>,
}

/// One caller's recent use, in Unix seconds (so that it survives a restart in the quota state).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Usage {
    /// Times of the requests admitted in the last minute.
    requests: VecDeque<f64>,
    /// (time, tokens) of the requests finished in the last day.
    tokens: VecDeque<(f64, u64)>,
}

/// The quota state file: every caller's [`Usage`], rewritten atomically after each change.
#[derive(Debug, Serialize, Deserialize)]
struct QuotaState {
    format_version: u32,
    usage: HashMap<String, Usage>,
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: f64 = 86_400.0;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Keys, quotas and the audit log of one server.
pub struct Guard {
    keys: Option<HashMap<String, KeySpec>>,
    usage: Mutex<HashMap<String, Usage>>,
    audit: Mutex<Option<std::fs::File>>,
    audit_path: Option<PathBuf>,
    /// Where the quotas' usage is kept across restarts (none: in memory only).
    quota_state: Option<PathBuf>,
    /// The window of `requests_per_minute`: a minute, shorter in tests.
    minute: f64,
}

impl Guard {
    pub fn new(keys: Option<Vec<KeySpec>>, audit_path: Option<PathBuf>) -> Result<Self> {
        Self::with_minute(keys, audit_path, MINUTE)
    }

    /// A guard whose request quotas count over `minute` instead of 60 s (for tests).
    pub fn with_minute(
        keys: Option<Vec<KeySpec>>,
        audit_path: Option<PathBuf>,
        minute: Duration,
    ) -> Result<Self> {
        let audit = match &audit_path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?,
            ),
            None => None,
        };
        Ok(Self {
            keys: keys.map(|ks| ks.into_iter().map(|k| (k.key.clone(), k)).collect()),
            usage: Mutex::new(HashMap::new()),
            audit: Mutex::new(audit),
            audit_path,
            quota_state: None,
            minute: minute.as_secs_f64(),
        })
    }

    /// Keeps the quotas' usage in `path` (read now if it exists, rewritten atomically after
    /// every admitted request and every charge), so a restart does not reset anyone's quota.
    pub fn with_quota_state(mut self, path: PathBuf) -> Result<Self> {
        if path.exists() {
            let state: QuotaState = serde_json::from_str(&read_text(&path)?)
                .map_err(|e| Error::file(&path, format!("not a quota state file: {e}")))?;
            if state.format_version != 1 {
                return Err(Error::file(
                    &path,
                    format!("quota state format {} (expected 1)", state.format_version),
                ));
            }
            *self.usage.lock().expect("usage lock poisoned") = state.usage;
        }
        self.quota_state = Some(path);
        Ok(self)
    }

    pub fn audit_path(&self) -> Option<&Path> {
        self.audit_path.as_deref()
    }

    /// Writes the quota state (if kept); a failure is reported, never fatal to the request.
    fn persist(&self, usage: &HashMap<String, Usage>) {
        let Some(path) = &self.quota_state else {
            return;
        };
        let state = QuotaState {
            format_version: 1,
            usage: usage.clone(),
        };
        let text = serde_json::to_string(&state).expect("the quota state serialises");
        if let Err(e) = distill_core::fsio::write_atomic(path, text.as_bytes()) {
            eprintln!("distill serve: writing the quota state failed: {e}");
        }
    }

    /// The caller behind an `Authorization` header value. A server without keys serves
    /// everyone as "anonymous", who is not an admin: the usage report needs a key.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> std::result::Result<Caller, ApiError> {
        let Some(keys) = &self.keys else {
            return Ok(Caller {
                name: "anonymous".into(),
                admin: false,
                limits: None,
            });
        };
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "You didn't provide an API key. Provide it in an Authorization header: 'Authorization: Bearer YOUR_KEY'.",
                )
            })?;
        let spec = keys
            .get(token)
            .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))?;
        Ok(Caller {
            name: spec.name.clone(),
            admin: spec.admin,
            limits: Some(spec.clone()),
        })
    }

    /// Whether this server has keys at all.
    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// Admits a request against the caller's quotas (counting it), or says when to come back.
    pub fn admit(&self, caller: &Caller) -> std::result::Result<(), ApiError> {
        let Some(limits) = &caller.limits else {
            return Ok(());
        };
        let now = unix_now();
        let mut all = self.usage.lock().expect("usage lock poisoned");
        let u = all.entry(caller.name.clone()).or_default();
        while u.requests.front().is_some_and(|&t| now - t >= self.minute) {
            u.requests.pop_front();
        }
        while u.tokens.front().is_some_and(|&(t, _)| now - t >= DAY) {
            u.tokens.pop_front();
        }
        if let Some(rpm) = limits.requests_per_minute {
            if u.requests.len() >= rpm as usize {
                let wait = self.minute - (now - u.requests[u.requests.len() - rpm as usize]);
                return Err(ApiError::rate_limited(
                    format!(
                        "Rate limit reached for '{}' on requests per min (RPM): Limit {rpm}, Used {}. Please try again in {:.1}s.",
                        caller.name,
                        u.requests.len(),
                        wait
                    ),
                    "requests",
                    wait.max(0.0).ceil() as u64,
                ));
            }
        }
        if let Some(tpd) = limits.tokens_per_day {
            let used: u64 = u.tokens.iter().map(|&(_, n)| n).sum();
            if used >= tpd {
                // Wait until enough of the day's tokens expire to go under the limit.
                let mut left = used;
                let mut wait = DAY;
                for &(t, n) in &u.tokens {
                    left -= n;
                    if left < tpd {
                        wait = DAY - (now - t);
                        break;
                    }
                }
                return Err(ApiError::rate_limited(
                    format!(
                        "Rate limit reached for '{}' on tokens per day (TPD): Limit {tpd}, Used {used}.",
                        caller.name
                    ),
                    "tokens",
                    wait.max(0.0).ceil() as u64,
                ));
            }
        }
        u.requests.push_back(now);
        self.persist(&all);
        Ok(())
    }

    /// Counts a finished request's tokens against the caller's daily quota.
    pub fn charge(&self, caller: &Caller, tokens: u64) {
        if caller.limits.is_none() {
            return;
        }
        let mut all = self.usage.lock().expect("usage lock poisoned");
        all.entry(caller.name.clone())
            .or_default()
            .tokens
            .push_back((unix_now(), tokens));
        self.persist(&all);
    }

    /// Appends one record to the audit log (one JSON line, flushed).
    pub fn record(&self, rec: &AuditRecord) {
        let mut audit = self.audit.lock().expect("audit lock poisoned");
        if let Some(f) = audit.as_mut() {
            let mut line = serde_json::to_string(rec).expect("an audit record serialises");
            line.push('\n');
            if let Err(e) = f.write_all(line.as_bytes()) {
                eprintln!("distill serve: writing the audit log failed: {e}");
            }
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Unix time, seconds.
    pub time: f64,
    pub key: String,
    pub endpoint: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Whether token log-probabilities were asked for.
    pub logprobs: bool,
    pub top_logprobs: u32,
    pub n: u32,
    pub stream: bool,
    /// sha256 of the prompt text (the text itself is not kept).
    pub prompt_sha256: String,
    /// The prompt's template signature, see [`prompt_shape`].
    pub prompt_shape: String,
    pub latency_ms: u64,
}

/// A prompt's template signature: the first six words, lowercased and digits replaced by 0.
/// Prompts filled into one template ("Translate to French: ...", "Q: ... A:") share it.
pub fn prompt_shape(text: &str) -> String {
    text.split_whitespace()
        .take(6)
        .map(|w| {
            w.chars()
                .map(|c| {
                    if c.is_ascii_digit() {
                        '0'
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per-key summary of an audit log: the signals labs say they watch for distillation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyUsage {
    pub key: String,
    pub requests: u64,
    /// Requests refused with 429.
    pub rate_limited: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The most requests admitted in any 60-second window.
    pub peak_requests_per_minute: u64,
    /// Share of admitted requests that asked for token log-probabilities.
    pub logprobs_share: f64,
    pub mean_top_logprobs: f64,
    /// Distinct prompts / admitted requests.
    pub distinct_prompt_share: f64,
    /// Share of prompts whose shape (see [`prompt_shape`]) is shared by at least 5% of the key's
    /// prompts and at least 3 of them.
    pub templated_share: f64,
    /// The most common shape and how many prompts have it.
    pub top_template: Option<(String, u64)>,
    pub first_time: f64,
    pub last_time: f64,
    /// Plain-language flags raised by the signals above.
    pub flags: Vec<String>,
}

/// Builds the per-key report from audit records.
pub fn usage_report(records: &[AuditRecord]) -> Vec<KeyUsage> {
    let mut by_key: HashMap<&str, Vec<&AuditRecord>> = HashMap::new();
    for r in records {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    let mut out: Vec<KeyUsage> = by_key
        .into_iter()
        .map(|(key, recs)| {
            let ok: Vec<&&AuditRecord> = recs.iter().filter(|r| r.status == 200).collect();
            let n = ok.len().max(1) as f64;
            let mut times: Vec<f64> = ok.iter().map(|r| r.time).collect();
            times.sort_by(f64::total_cmp);
            let mut peak = 0;
            let mut lo = 0;
            for hi in 0..times.len() {
                while times[hi] - times[lo] >= 60.0 {
                    lo += 1;
                }
                peak = peak.max(hi - lo + 1);
            }
            let distinct: HashSet<&str> = ok.iter().map(|r| r.prompt_sha256.as_str()).collect();
            let mut shapes: HashMap<&str, u64> = HashMap::new();
            for r in &ok {
                *shapes.entry(r.prompt_shape.as_str()).or_default() += 1;
            }
            let threshold = ((ok.len() as f64 * 0.05).ceil() as u64).max(3);
            let templated: u64 = shapes.values().filter(|&&c| c >= threshold).sum();
            let top_template = shapes
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(s, &c)| (s.to_string(), c));
            let logprobs = ok.iter().filter(|r| r.logprobs).count() as f64 / n;
            let templated_share = templated as f64 / n;
            let mut flags = Vec::new();
            if peak >= 30 {
                flags.push(format!("bursty volume: {peak} requests in one minute"));
            }
            if ok.len() >= 20 && logprobs >= 0.5 {
                flags.push(format!(
                    "asks for log-probabilities on {:.0}% of requests",
                    100.0 * logprobs
                ));
            }
            if ok.len() >= 20 && templated_share >= 0.5 {
                flags.push(format!(
                    "{:.0}% of prompts fill a few templates",
                    100.0 * templated_share
                ));
            }
            KeyUsage {
                key: key.to_string(),
                requests: ok.len() as u64,
                rate_limited: recs.iter().filter(|r| r.status == 429).count() as u64,
                prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
                completion_tokens: ok.iter().map(|r| r.completion_tokens).sum(),
                peak_requests_per_minute: peak as u64,
                logprobs_share: logprobs,
                mean_top_logprobs: ok.iter().map(|r| r.top_logprobs as f64).sum::<f64>() / n,
                distinct_prompt_share: distinct.len() as f64 / n,
                templated_share,
                top_template,
                first_time: times.first().copied().unwrap_or(0.0),
                last_time: times.last().copied().unwrap_or(0.0),
                flags,
            }
        })
        .collect();
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.key.cmp(&b.key)));
    out
}

/// Reads an audit log; a torn last line (the server killed mid-write) is skipped.
pub fn read_audit(path: &Path) -> Result<Vec<AuditRecord>> {
    Ok(distill_core::fsio::read_jsonl(path, "an audit record")?.0)
}

/// The report as a markdown table.
pub fn report_markdown(report: &[KeyUsage]) -> String {
    let mut s = String::from(
        "| key | requests | 429s | prompt tok | completion tok | peak req/min | logprobs | distinct prompts | templated | top template | flags |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for k in report {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.0}% | {:.0}% | {:.0}% | {} | {} |\n",
            k.key,
            k.requests,
            k.rate_limited,
            k.prompt_tokens,
            k.completion_tokens,
            k.peak_requests_per_minute,
            100.0 * k.logprobs_share,
            100.0 * k.distinct_prompt_share,
            100.0 * k.templated_share,
            k.top_template
                .as_ref()
                .map(|(t, c)| format!("`{}` ×{c}", t.replace('|', "\\|")))
                .unwrap_or_default(),
            if k.flags.is_empty() {
                "—".to_string()
            } else {
                k.flags.join("; ")
            },
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, time: f64, prompt: &str, logprobs: bool) -> AuditRecord {
        AuditRecord {
            time,
            key: key.into(),
            endpoint: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: 10,
            completion_tokens: 5,
            logprobs,
            top_logprobs: if logprobs { 20 } else { 0 },
            n: 1,
            stream: false,
            prompt_sha256: distill_core::digest::sha256_hex(prompt.as_bytes()),
            prompt_shape: prompt_shape(prompt),
            latency_ms: 1,
        }
    }

    #[test]
    fn report_separates_a_collector_from_a_person() {
        let mut recs = Vec::new();
        // A collector: 40 templated prompts within a minute, all asking for logprobs.
        for i in 0..40 {
            recs.push(rec(
                "bot",
                i as f64,
                &format!("Answer the question: what is {i} plus {i}? Be brief"),
                true,
            ));
        }
        // A person: 5 varied prompts over an hour, one repeated.
        for (i, p) in [
            "hello there",
            "write a poem about rain",
            "hello there",
            "why is the sky blue",
            "thanks!",
        ]
        .iter()
        .enumerate()
        {
            recs.push(rec("alice", 600.0 * i as f64, p, false));
        }
        let report = usage_report(&recs);
        let bot = &report[0];
        assert_eq!(bot.key, "bot");
        assert_eq!(bot.requests, 40);
        assert_eq!(bot.peak_requests_per_minute, 40);
        assert_eq!(bot.logprobs_share, 1.0);
        assert_eq!(bot.distinct_prompt_share, 1.0);
        // All 40 share "answer the question: what is 0" → templated.
        assert_eq!(bot.templated_share, 1.0);
        assert_eq!(bot.flags.len(), 3, "{:?}", bot.flags);
        let alice = &report[1];
        assert_eq!(alice.peak_requests_per_minute, 1);
        assert_eq!(alice.distinct_prompt_share, 0.8);
        assert_eq!(alice.templated_share, 0.0);
        assert!(alice.flags.is_empty());
        assert!(report_markdown(&report).contains("| bot | 40 |"));
    }

    #[test]
    fn quotas_refuse_with_retry_after() {
        let spec = KeySpec {
            key: "sk-test-123".into(),
            name: "t".into(),
            requests_per_minute: Some(2),
            tokens_per_day: Some(100),
            admin: false,
        };
        let g = Guard::new(Some(vec![spec]), None).unwrap();
        let c = g.authenticate(Some("Bearer sk-test-123")).unwrap();
        assert!(g.authenticate(Some("Bearer nope")).is_err());
        assert!(g.authenticate(None).is_err());
        g.admit(&c).unwrap();
        g.admit(&c).unwrap();
        let e = g.admit(&c).unwrap_err();
        assert_eq!(e.status.as_u16(), 429);
        assert!((59..=60).contains(&e.retry_after_s.unwrap()));
        let g2 = Guard::new(
            Some(vec![KeySpec {
                key: "sk-test-456".into(),
                name: "u".into(),
                requests_per_minute: None,
                tokens_per_day: Some(100),
                admin: false,
            }]),
            None,
        )
        .unwrap();
        let c2 = g2.authenticate(Some("Bearer sk-test-456")).unwrap();
        g2.admit(&c2).unwrap();
        g2.charge(&c2, 150);
        let e = g2.admit(&c2).unwrap_err();
        assert_eq!(e.kind, "tokens");
        assert!(e.retry_after_s.unwrap() > 86_000);
    }

    /// A restart keeps the quotas: the usage lives in the state file, written atomically.
    #[test]
    fn quotas_survive_a_restart_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("quota.json");
        let spec = KeySpec {
            key: "sk-test-789".into(),
            name: "v".into(),
            requests_per_minute: Some(2),
            tokens_per_day: Some(100),
            admin: false,
        };
        let start = || {
            Guard::new(Some(vec![spec.clone()]), None)
                .unwrap()
                .with_quota_state(state.clone())
                .unwrap()
        };
        let g = start();
        let c = g.authenticate(Some("Bearer sk-test-789")).unwrap();
        g.admit(&c).unwrap();
        g.charge(&c, 60);
        drop(g);
        let g = start();
        g.admit(&c).unwrap();
        assert_eq!(g.admit(&c).unwrap_err().kind, "requests");
        g.charge(&c, 60);
        drop(g);
        // 120 tokens of 100 used before this restart: refused for the day.
        let g = Guard::with_minute(Some(vec![spec.clone()]), None, Duration::from_millis(1))
            .unwrap()
            .with_quota_state(state.clone())
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(g.admit(&c).unwrap_err().kind, "tokens");
        assert!(!tmp_left(dir.path()));
        std::fs::write(&state, "{").unwrap();
        let err = Guard::new(None, None)
            .unwrap()
            .with_quota_state(state.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("quota.json") && err.contains("not a quota state file"),
            "{err}"
        );
    }

    fn tmp_left(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp"))
    }

    #[test]
    fn a_keyless_server_serves_everyone_but_no_one_is_admin() {
        let g = Guard::new(None, None).unwrap();
        let c = g.authenticate(None).unwrap();
        assert_eq!(c.name, "anonymous");
        assert!(!c.admin);
    }
}
