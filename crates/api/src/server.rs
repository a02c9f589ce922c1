//! `distill serve`: an OpenAI-compatible HTTP API over a teacher model dir.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
//! `GET /v1/admin/usage` (the distillation-pattern report over the audit log; admin keys only).

use crate::engine::{Engine, Event, Finish, Job, TokenLogprob};
use crate::guard::{
    prompt_shape, read_audit, report_markdown, usage_report, AuditRecord, Caller, Guard, KeySpec,
};
use crate::protocol::{parse_request, ApiError, Endpoint, GenSpec, PromptIn, DEFAULT_MAX_TOKENS};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::Device;
use distill_core::{Result, Tokenizer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    /// The model id clients must name; default: the model dir's name.
    pub model_name: Option<String>,
    pub device: Device,
    /// Most rows (choices) decoded together.
    pub max_batch: usize,
    pub keys: Option<Vec<KeySpec>>,
    /// JSONL audit log, appended to.
    pub audit_log: Option<PathBuf>,
    /// The window of the keys' `requests_per_minute` (60 s; shorter in tests).
    pub rate_window: std::time::Duration,
    /// The quotas' usage, kept across restarts (see [`Guard::with_quota_state`]).
    pub quota_state: Option<PathBuf>,
}

/// Everything the handlers share.
pub struct AppState {
    pub model_name: String,
    tokenizer: Tokenizer,
    token_bytes: Arc<Vec<Vec<u8>>>,
    engine: Engine,
    pub guard: Guard,
    context: usize,
    created: u64,
    fingerprint: String,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl AppState {
    /// Loads the model and starts the engine thread.
    pub fn load(opts: &ServeOptions) -> Result<Arc<Self>> {
        let teacher = distill_core::ModelDir::load(&opts.model_dir, &opts.device)?;
        let token_bytes = teacher.tokenizer.token_bytes_table();
        let stop_ids = teacher.tokenizer.stop_ids();
        let model_name = opts
            .model_name
            .clone()
            .unwrap_or_else(|| model_id(&opts.model_dir));
        let context = teacher.config.max_position_embeddings;
        let fingerprint = format!("distill-{}", &teacher.tokenizer.hash()[..10]);
        let mut guard =
            Guard::with_minute(opts.keys.clone(), opts.audit_log.clone(), opts.rate_window)?;
        if let Some(path) = &opts.quota_state {
            guard = guard.with_quota_state(path.clone())?;
        }
        let engine = Engine::start(teacher.model, token_bytes.clone(), stop_ids, opts.max_batch);
        Ok(Arc::new(Self {
            model_name,
            tokenizer: teacher.tokenizer,
            token_bytes: Arc::new(token_bytes),
            engine,
            guard,
            context,
            created: now_unix() as u64,
            fingerprint,
        }))
    }

    fn token_json(&self, id: u32, logprob: f32) -> Value {
        let bytes = self
            .token_bytes
            .get(id as usize)
            .cloned()
            .unwrap_or_default();
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": logprob,
            "bytes": bytes,
        })
    }

    /// Chat `logprobs.content[]` entry.
    fn chat_logprob(&self, t: &TokenLogprob) -> Value {
        let mut v = self.token_json(t.id, t.logprob);
        v["top_logprobs"] = t
            .top
            .iter()
            .map(|&(id, lp)| self.token_json(id, lp))
            .collect();
        v
    }

    fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes.get(id as usize).map_or(&[][..], |b| b))
            .into_owned()
    }
}

/// A model id from a dir name: `models/smollm2-135m-instruct` → `smollm2-135m-instruct`.
pub fn model_id(dir: &Path) -> String {
    dir.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/admin/usage", get(admin_usage))
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("Unknown route.").into_response() })
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "model": st.model_name}))
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.guard.authenticate(authorization(&headers)) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": st.model_name, "object": "model", "created": st.created, "owned_by": "distill",
    }]}))
    .into_response()
}

async fn admin_usage(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let start = Instant::now();
    let path = "/v1/admin/usage";
    let caller = match st.guard.authenticate(authorization(&headers)) {
        Ok(c) => c,
        Err(e) => return refused(&st, &headers, path, None, &[], start, e),
    };
    if !caller.admin {
        let message = match st.guard.has_keys() {
            true => "This key may not read the usage report.",
            false => "The usage report needs an admin key: this server was started without --keys.",
        };
        let e = ApiError {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("forbidden"),
            retry_after_s: None,
        };
        return refused(&st, &headers, path, Some(&caller), &[], start, e);
    }
    let Some(path) = st.guard.audit_path() else {
        return ApiError::not_found("The server was started without an audit log (--audit-log).")
            .into_response();
    };
    match read_audit(path) {
        Ok(records) => {
            let report = usage_report(&records);
            Json(json!({"object": "usage_report", "keys": report, "markdown": report_markdown(&report)}))
                .into_response()
        }
        Err(e) => ApiError::server(e.to_string()).into_response(),
    }
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Chat, headers, body).await
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Completions, headers, body).await
}

/// What the audit log needs from a request, whatever happens to it.
struct Audit {
    st: Arc<AppState>,
    caller: Caller,
    endpoint: Endpoint,
    spec: GenSpec,
    prompt_tokens: u64,
    start: Instant,
}

impl Audit {
    fn finish(&self, status: u16, completion_tokens: u64) {
        if status == 200 {
            self.st
                .guard
                .charge(&self.caller, self.prompt_tokens + completion_tokens);
        }
        let text = self.spec.prompt.flat_text();
        self.st.guard.record(&AuditRecord {
            time: now_unix(),
            key: self.caller.name.clone(),
            endpoint: self.endpoint.path().into(),
            status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            logprobs: self.spec.top_logprobs.is_some(),
            top_logprobs: self.spec.top_logprobs.unwrap_or(0) as u32,
            n: self.spec.n as u32,
            stream: self.spec.stream,
            prompt_sha256: distill_core::digest::sha256_hex(text.as_bytes()),
            prompt_shape: prompt_shape(&text),
            latency_ms: self.start.elapsed().as_millis() as u64,
        });
    }
}

/// Answers a request refused before it was understood (401, 403, 400) and writes it to the audit
/// log: who (the key's name, or which way authentication failed), where, the status, and a hash
/// of the raw body.
fn refused(
    st: &AppState,
    headers: &HeaderMap,
    endpoint: &str,
    caller: Option<&Caller>,
    body: &[u8],
    start: Instant,
    e: ApiError,
) -> Response {
    let key = match (caller, authorization(headers)) {
        (Some(c), _) => c.name.clone(),
        (None, Some(h)) if h.starts_with("Bearer ") => "(unknown key)".into(),
        (None, _) => "(no key)".into(),
    };
    st.guard.record(&AuditRecord {
        time: now_unix(),
        key,
        endpoint: endpoint.into(),
        status: e.status.as_u16(),
        prompt_tokens: 0,
        completion_tokens: 0,
        logprobs: false,
        top_logprobs: 0,
        n: 0,
        stream: false,
        prompt_sha256: distill_core::digest::sha256_hex(body),
        prompt_shape: String::new(),
        latency_ms: start.elapsed().as_millis() as u64,
    });
    e.into_response()
}

fn random_id(prefix: &str) -> String {
    let n: u128 = rand::random();
    format!("{prefix}-{n:032x}")
}

async fn handle(
    st: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let path = endpoint.path();
    let caller = match st.guard.authenticate(authorization(&headers)) {
        Ok(c) => c,
        Err(e) => return refused(&st, &headers, path, None, &body, start, e),
    };
    let spec = match parse_request(endpoint, &body) {
        Ok(s) => s,
        Err(e) => return refused(&st, &headers, path, Some(&caller), &body, start, e),
    };
    if spec.model != st.model_name {
        let e = ApiError::invalid(
            format!(
                "The model '{}' does not exist. This server serves '{}'.",
                spec.model, st.model_name
            ),
            Some("model"),
        )
        .with_code("model_not_found");
        return refused(&st, &headers, path, Some(&caller), &body, start, e);
    }
    let prompt_text = match &spec.prompt {
        PromptIn::Text(t) => t.clone(),
        PromptIn::Messages(m) => match st.tokenizer.apply_chat_template(m, true) {
            Ok(t) => t,
            Err(e) => return ApiError::invalid(e.to_string(), Some("messages")).into_response(),
        },
    };
    let prompt = match st.tokenizer.encode(&prompt_text, true) {
        Ok(p) => p,
        Err(e) => return ApiError::server(e.to_string()).into_response(),
    };
    let audit = Audit {
        st: st.clone(),
        caller,
        endpoint,
        spec,
        prompt_tokens: prompt.len() as u64,
        start,
    };
    if let Err(e) = st.guard.admit(&audit.caller) {
        audit.finish(429, 0);
        return e.into_response();
    }
    let room = st.context.saturating_sub(prompt.len());
    if prompt.is_empty() || room == 0 || audit.spec.max_tokens.is_some_and(|m| m > room) {
        audit.finish(400, 0);
        return ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {} for the completion).",
                st.context,
                prompt.len() + audit.spec.max_tokens.unwrap_or(0),
                prompt.len(),
                audit.spec.max_tokens.unwrap_or(0)
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded")
        .into_response();
    }
    let max_tokens = audit
        .spec
        .max_tokens
        .unwrap_or(DEFAULT_MAX_TOKENS.min(room));
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: prompt.clone(),
        n: audit.spec.n,
        max_tokens,
        temperature: audit.spec.temperature,
        top_p: audit.spec.top_p,
        seed: audit.spec.seed.unwrap_or_else(rand::random),
        stop: audit.spec.stop.clone(),
        top_logprobs: audit.spec.top_logprobs,
        score_prompt: audit.spec.echo && audit.spec.top_logprobs.is_some(),
        events: tx,
    };
    if !st.engine.submit(job) {
        audit.finish(500, 0);
        return ApiError::server("The engine has stopped.").into_response();
    }
    if audit.spec.stream {
        stream_response(audit, rx)
    } else {
        whole_response(audit, rx, prompt, prompt_text).await
    }
}

/// One choice as it accumulates.
#[derive(Default, Clone)]
struct ChoiceAcc {
    text: String,
    tokens: Vec<TokenLogprob>,
    finish: Option<Finish>,
}

async fn whole_response(
    audit: Audit,
    mut rx: mpsc::UnboundedReceiver<Event>,
    prompt: Vec<u32>,
    prompt_text: String,
) -> Response {
    let st = audit.st.clone();
    let spec = &audit.spec;
    let mut choices = vec![ChoiceAcc::default(); spec.n];
    let mut prompt_scores = None;
    while choices.iter().any(|c| c.finish.is_none()) {
        match rx.recv().await {
            Some(Event::Prompt(s)) => prompt_scores = Some(s),
            Some(Event::Token {
                choice,
                token,
                text,
            }) => {
                choices[choice].text.push_str(&text);
                choices[choice].tokens.push(token);
            }
            Some(Event::Finished {
                choice,
                reason,
                text,
            }) => {
                choices[choice].text.push_str(&text);
                choices[choice].finish = Some(reason);
            }
            Some(Event::Error(e)) => {
                audit.finish(500, 0);
                return ApiError::server(e).into_response();
            }
            None => {
                audit.finish(500, 0);
                return ApiError::server("The engine stopped mid-request.").into_response();
            }
        }
    }
    let completion_tokens: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let usage = json!({
        "prompt_tokens": prompt.len(),
        "completion_tokens": completion_tokens,
        "total_tokens": prompt.len() + completion_tokens,
    });
    let created = now_unix() as u64;
    let body = match spec.endpoint {
        Endpoint::Chat => {
            let out: Vec<Value> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({
                        "index": i,
                        "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": spec.top_logprobs.map(|_| json!({
                            "content": c.tokens.iter().map(|t| st.chat_logprob(t)).collect::<Vec<_>>(),
                            "refusal": null,
                        })),
                        "finish_reason": c.finish.map(Finish::as_str),
                    })
                })
                .collect();
            json!({
                "id": random_id("chatcmpl"), "object": "chat.completion", "created": created,
                "model": st.model_name, "system_fingerprint": st.fingerprint,
                "choices": out, "usage": usage,
            })
        }
        Endpoint::Completions => {
            let out: Vec<Value> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let text = if spec.echo {
                        format!("{prompt_text}{}", c.text)
                    } else {
                        c.text.clone()
                    };
                    let logprobs = spec.top_logprobs.map(|_| {
                        let mut entries: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
                        if spec.echo {
                            let scores = prompt_scores.as_deref().unwrap_or(&[]);
                            for (j, &id) in prompt.iter().enumerate() {
                                entries.push((id, scores.get(j).and_then(Option::as_ref)));
                            }
                        }
                        entries.extend(c.tokens.iter().map(|t| (t.id, Some(t))));
                        completions_logprobs(&st, &entries)
                    });
                    json!({"index": i, "text": text, "logprobs": logprobs,
                           "finish_reason": c.finish.map(Finish::as_str)})
                })
                .collect();
            json!({
                "id": random_id("cmpl"), "object": "text_completion", "created": created,
                "model": st.model_name, "system_fingerprint": st.fingerprint,
                "choices": out, "usage": usage,
            })
        }
    };
    audit.finish(200, completion_tokens as u64);
    Json(body).into_response()
}

/// The legacy completions `logprobs` object: parallel lists of tokens, their log-probabilities,
/// `{token: logprob}` maps of the alternatives, and each token's character offset in the text.
fn completions_logprobs(st: &AppState, entries: &[(u32, Option<&TokenLogprob>)]) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut offset = 0usize;
    for &(id, t) in entries {
        let text = st.token_text(id);
        text_offset.push(offset);
        offset += text.chars().count();
        tokens.push(text);
        token_logprobs.push(t.map(|t| t.logprob));
        top_logprobs.push(t.map(|t| {
            let mut m = serde_json::Map::new();
            for &(alt, lp) in &t.top {
                m.entry(st.token_text(alt)).or_insert(json!(lp));
            }
            Value::Object(m)
        }));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
           "text_offset": text_offset})
}

fn stream_response(audit: Audit, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (out_tx, out_rx) = mpsc::channel::<std::result::Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let st = audit.st.clone();
        let spec = audit.spec.clone();
        let id = random_id(if spec.endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        });
        let created = now_unix() as u64;
        let chunk = |choices: Value, usage: Option<Value>| -> SseEvent {
            let mut v = match spec.endpoint {
                Endpoint::Chat => json!({"id": id, "object": "chat.completion.chunk",
                    "created": created, "model": st.model_name,
                    "system_fingerprint": st.fingerprint, "choices": choices}),
                Endpoint::Completions => json!({"id": id, "object": "text_completion",
                    "created": created, "model": st.model_name,
                    "system_fingerprint": st.fingerprint, "choices": choices}),
            };
            if spec.include_usage {
                v["usage"] = usage.unwrap_or(Value::Null);
            }
            SseEvent::default().data(v.to_string())
        };
        let chat = spec.endpoint == Endpoint::Chat;
        if chat {
            for i in 0..spec.n {
                let c = json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}]);
                if out_tx.send(Ok(chunk(c, None))).await.is_err() {
                    return;
                }
            }
        }
        let mut finished = 0;
        let mut completion_tokens = 0u64;
        let mut failed = false;
        while finished < spec.n {
            let ev = match rx.recv().await {
                Some(ev) => ev,
                None => {
                    failed = true;
                    break;
                }
            };
            let choices = match ev {
                Event::Prompt(_) => continue,
                Event::Token {
                    choice,
                    token,
                    text,
                } => {
                    completion_tokens += 1;
                    if chat {
                        let lp = spec.top_logprobs.map(
                            |_| json!({"content": [st.chat_logprob(&token)], "refusal": null}),
                        );
                        json!([{"index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}])
                    } else {
                        let lp = spec
                            .top_logprobs
                            .map(|_| completions_logprobs(&st, &[(token.id, Some(&token))]));
                        json!([{"index": choice, "text": text, "logprobs": lp, "finish_reason": null}])
                    }
                }
                Event::Finished {
                    choice,
                    reason,
                    text,
                } => {
                    finished += 1;
                    if !text.is_empty() {
                        let c = if chat {
                            json!([{"index": choice, "delta": {"content": text}, "logprobs": null, "finish_reason": null}])
                        } else {
                            json!([{"index": choice, "text": text, "logprobs": null, "finish_reason": null}])
                        };
                        if out_tx.send(Ok(chunk(c, None))).await.is_err() {
                            break;
                        }
                    }
                    if chat {
                        json!([{"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason.as_str()}])
                    } else {
                        json!([{"index": choice, "text": "", "logprobs": null, "finish_reason": reason.as_str()}])
                    }
                }
                Event::Error(e) => {
                    let err = ApiError::server(e).body();
                    let _ = out_tx
                        .send(Ok(SseEvent::default().data(err.to_string())))
                        .await;
                    failed = true;
                    break;
                }
            };
            if out_tx.send(Ok(chunk(choices, None))).await.is_err() {
                failed = true; // the client went away; dropping rx tells the engine
                break;
            }
        }
        if !failed {
            if spec.include_usage {
                let usage = json!({"prompt_tokens": audit.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": audit.prompt_tokens + completion_tokens});
                let _ = out_tx.send(Ok(chunk(json!([]), Some(usage)))).await;
            }
            let _ = out_tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        }
        audit.finish(if failed { 499 } else { 200 }, completion_tokens);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
