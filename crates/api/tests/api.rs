//! The OpenAI-compatible server and the collector, over loopback, on a tiny random teacher.

use candle_core::{Device, Tensor};
use distill_api::client::{collect, CollectOptions, Collected};
use distill_api::guard::{read_audit, KeySpec};
use distill_api::server::{serve, AppState, ServeOptions};
use distill_core::testing::{tiny_config, write_tiny_model_dir};
use distill_core::{CausalLm, Tokenizer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Server {
    base: String,
    _dir: tempfile::TempDir,
    model_dir: PathBuf,
    audit: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn start(keys: Option<Vec<KeySpec>>, rate_window: Duration, max_batch: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("teacher");
    write_tiny_model_dir(&model_dir, &tiny_config(), 11).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let state = AppState::load(&ServeOptions {
        model_dir: model_dir.clone(),
        model_name: Some("tiny".into()),
        device: Device::Cpu,
        max_batch,
        keys,
        audit_log: Some(audit.clone()),
        rate_window,
        quota_state: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, state, async {
        let _ = rx.await;
    }));
    Server {
        base: format!("http://{addr}"),
        _dir: dir,
        model_dir,
        audit,
        stop: Some(tx),
    }
}

async fn post(
    base: &str,
    path: &str,
    body: Value,
    key: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v, headers)
}

/// POST to `/v1/chat/completions`.
async fn chat(
    base: &str,
    body: Value,
    key: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    post(base, "/v1/chat/completions", body, key).await
}

fn chat_body(prompt: &str, extra: Value) -> Value {
    let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": prompt}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The teacher's own log-softmax after `ids`, (V,).
fn teacher_logprobs(model: &CausalLm, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&x).unwrap();
    let lp = distill_core::model::log_softmax(&logits).unwrap();
    lp.squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn load_teacher(dir: &Path) -> (CausalLm, Tokenizer) {
    let (model, _) = distill_core::load_model(dir, &Device::Cpu).unwrap();
    (model, Tokenizer::from_dir(dir).unwrap())
}

fn assert_error_shape(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_has_openai_shapes_and_the_teachers_logprobs() {
    let s = start(None, Duration::from_secs(60), 8).await;
    let (status, v, _) = chat(&s.base,
        chat_body("hello there", json!({"temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 5, "n": 2})),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "tiny");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    let (model, tok) = load_teacher(&s.model_dir);
    let prompt_text = tok
        .apply_chat_template(
            &[distill_core::ChatMessage::new("user", "hello there")],
            true,
        )
        .unwrap();
    let prompt = tok.encode(&prompt_text, true).unwrap();
    let table = tok.token_bytes_table();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert!(!content.is_empty());
        // Greedy: both choices are the same and every token is the argmax.
        assert_eq!(c["message"]["content"], choices[0]["message"]["content"]);
        let mut ids = prompt.clone();
        let mut text_bytes = Vec::new();
        for t in content {
            let bytes: Vec<u8> = serde_json::from_value(t["bytes"].clone()).unwrap();
            let id = table.iter().position(|b| *b == bytes).unwrap() as u32;
            assert_eq!(t["token"], String::from_utf8_lossy(&bytes).as_ref());
            let lp = teacher_logprobs(&model, &ids);
            assert!((t["logprob"].as_f64().unwrap() as f32 - lp[id as usize]).abs() < 1e-4);
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            let mut sorted: Vec<(usize, f32)> = lp.iter().copied().enumerate().collect();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (alt, want) in top.iter().zip(&sorted) {
                assert!((alt["logprob"].as_f64().unwrap() as f32 - want.1).abs() < 1e-4);
                let alt_bytes: Vec<u8> = serde_json::from_value(alt["bytes"].clone()).unwrap();
                assert_eq!(alt_bytes, table[want.0]);
            }
            assert_eq!(id as usize, sorted[0].0, "greedy picks the argmax");
            text_bytes.extend_from_slice(&bytes);
            ids.push(id);
        }
        if c["finish_reason"] == "length" {
            assert_eq!(
                c["message"]["content"],
                String::from_utf8_lossy(&text_bytes).as_ref()
            );
        }
    }
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], prompt.len());
    let completion: usize = choices
        .iter()
        .map(|c| c["logprobs"]["content"].as_array().unwrap().len())
        .sum();
    assert_eq!(u["completion_tokens"], completion);
    assert_eq!(u["total_tokens"], prompt.len() + completion);

    // Completions with echo: the prompt's own tokens scored by the teacher.
    let (status, v, _) = post(
        &s.base,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "the cat sat", "max_tokens": 3, "temperature": 0,
               "logprobs": 2, "echo": true}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with("the cat sat"));
    let lp = &c["logprobs"];
    let ids = tok.encode("the cat sat", true).unwrap();
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), ids.len() + 3);
    assert!(lp["token_logprobs"][0].is_null());
    for j in 1..ids.len() {
        let want = teacher_logprobs(&model, &ids[..j])[ids[j] as usize];
        let got = lp["token_logprobs"][j].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < 1e-4,
            "prompt token {j}: {got} vs {want}"
        );
        assert_eq!(lp["top_logprobs"][j].as_object().unwrap().len(), 2);
    }
    assert_eq!(lp["text_offset"][0], 0);

    // Models and health.
    let m: Value = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["object"], "model");
    let h: Value = reqwest::get(format!("{}/health", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_requests_equal_single_ones() {
    let s = start(None, Duration::from_secs(60), 8).await;
    let prompts = [
        "a",
        "the old man ran past",
        "hi",
        "my friend slept near the bird today",
    ];
    let body = |p: &str| {
        chat_body(
            p,
            json!({"temperature": 0, "max_tokens": 10, "logprobs": true}),
        )
    };
    // One at a time...
    let mut alone = Vec::new();
    for p in prompts {
        let (st, v, _) = chat(&s.base, body(p), None).await;
        assert_eq!(st, 200);
        alone.push(v);
    }
    // ...and all at once, several times over, so that they share batches.
    for _ in 0..3 {
        let futs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let base = s.base.clone();
                let b = body(p);
                tokio::spawn(async move { chat(&base, b, None).await })
            })
            .collect();
        for (f, a) in futs.into_iter().zip(&alone) {
            let (st, v, _) = f.await.unwrap();
            assert_eq!(st, 200);
            assert_eq!(v["choices"][0]["message"], a["choices"][0]["message"]);
            let (x, y) = (
                &v["choices"][0]["logprobs"]["content"],
                &a["choices"][0]["logprobs"]["content"],
            );
            for (tx, ty) in x.as_array().unwrap().iter().zip(y.as_array().unwrap()) {
                assert_eq!(tx["token"], ty["token"]);
                let d = (tx["logprob"].as_f64().unwrap() - ty["logprob"].as_f64().unwrap()).abs();
                assert!(d < 1e-4, "batched logprob differs by {d}");
            }
        }
    }
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_add_up_to_the_whole_answer() {
    let s = start(None, Duration::from_secs(60), 8).await;
    let extra = json!({"temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 2});
    let (_, whole, _) = chat(&s.base, chat_body("tell me", extra.clone()), None).await;
    let mut b = chat_body("tell me", extra);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut finish = None;
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        for ch in c["choices"].as_array().unwrap() {
            text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            if let Some(lp) = ch["logprobs"]["content"].as_array() {
                tokens.extend(lp.iter().cloned());
            }
            if !ch["finish_reason"].is_null() {
                finish = Some(ch["finish_reason"].clone());
            }
        }
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let w = &whole["choices"][0];
    assert_eq!(text, w["message"]["content"].as_str().unwrap());
    assert_eq!(finish.unwrap(), w["finish_reason"]);
    assert_eq!(&Value::Array(tokens), &w["logprobs"]["content"]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage, &whole["usage"], "the last chunk carries the usage");
    assert!(chunks.last().unwrap()["choices"]
        .as_array()
        .unwrap()
        .is_empty());

    // Completions stream too.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": "tiny", "prompt": "abc", "max_tokens": 4, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_the_server_stays_up() {
    let s = start(None, Duration::from_secs(60), 8).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .body("{\"model\": \"tiny\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_error_shape(&v);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let cases = [
        (
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            chat_body("x", json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
        ),
        (chat_body("x", json!({"max_tokens": -1})), "max_tokens"),
        (chat_body("x", json!({"temperature": 5})), "temperature"),
        (chat_body("x", json!({"max_tokens": 100000})), "messages"),
        (json!({"model": "tiny"}), "messages"),
    ];
    for (body, param) in cases {
        let (st, v, _) = chat(&s.base, body.clone(), None).await;
        assert_eq!(st, 400, "{body} → {v}");
        assert_error_shape(&v);
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (st, v, _) = post(
        &s.base,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "x", "logprobs": 6}),
        None,
    )
    .await;
    assert_eq!(st, 400);
    assert_error_shape(&v);
    let (st, v, _) = post(&s.base, "/v1/nope", json!({}), None).await;
    assert_eq!(st, 404);
    assert_error_shape(&v);
    // Still serving.
    let (st, _, _) = chat(&s.base, chat_body("x", json!({"max_tokens": 2})), None).await;
    assert_eq!(st, 200);
    // The refusals are in the audit log too, with the raw body's hash.
    let records = read_audit(&s.audit).unwrap();
    let refused = records.iter().filter(|r| r.status == 400).count();
    assert!(refused >= 2, "{records:?}");
    assert!(records
        .iter()
        .any(|r| r.status == 400 && r.key == "anonymous" && r.prompt_tokens == 0));
    // Without keys everyone may generate, but no one may read the usage report.
    let resp = client
        .get(format!("{}/v1/admin/usage", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("without --keys"));
}

fn key(k: &str, name: &str, rpm: Option<u32>, admin: bool) -> KeySpec {
    KeySpec {
        key: k.into(),
        name: name.into(),
        requests_per_minute: rpm,
        tokens_per_day: None,
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_answer_429_and_collect_backs_off_and_completes() {
    // "Per minute" is one second here, so that the test waits out the quota quickly.
    let s = start(
        Some(vec![
            key("sk-collector-1", "collector", Some(3), false),
            key("sk-admin-0001", "admin", None, true),
        ]),
        Duration::from_secs(1),
        8,
    )
    .await;
    let (st, v, _) = chat(&s.base, chat_body("x", json!({"max_tokens": 1})), None).await;
    assert_eq!(st, 401);
    assert_error_shape(&v);
    let (st, _, _) = chat(
        &s.base,
        chat_body("x", json!({"max_tokens": 1})),
        Some("sk-wrong-key"),
    )
    .await;
    assert_eq!(st, 401);
    let mut saw_429 = false;
    for _ in 0..5 {
        let (st, v, h) = chat(
            &s.base,
            chat_body("x", json!({"max_tokens": 1})),
            Some("sk-collector-1"),
        )
        .await;
        if st == 429 {
            saw_429 = true;
            assert_error_shape(&v);
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
            let after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&after));
        }
    }
    assert!(saw_429);

    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..12)
        .map(|i| format!("Question {i}: what comes next?"))
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let opts = CollectOptions {
        endpoint: s.base.clone(),
        api_key: Some("sk-collector-1".into()),
        model: None,
        prompts: prompts.clone(),
        out: dir.path().join("out"),
        concurrency: 4,
        top_logprobs: Some(3),
        max_tokens: 4,
        temperature: 0.0,
        seed: Some(1),
        system: None,
        resume: false,
        max_retries: 3,
        limit: None,
        completions: false,
    };
    let summary = collect(&opts, |_| {}).await.unwrap();
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    assert_eq!(summary.progress.done, 12);
    assert!(
        summary.progress.rate_limited > 0,
        "the quota must have been hit"
    );
    let lines = std::fs::read_to_string(dir.path().join("out/responses.jsonl")).unwrap();
    let mut idx: Vec<usize> = lines
        .lines()
        .map(|l| serde_json::from_str::<Collected>(l).unwrap())
        .map(|c| {
            assert_eq!(c.logprobs.as_ref().unwrap()[0].top_logprobs.len(), 3);
            c.index
        })
        .collect();
    idx.sort();
    assert_eq!(idx, (0..12).collect::<Vec<_>>());
    // A second run without --resume refuses; with it, there is nothing left to do.
    assert!(collect(&opts, |_| {})
        .await
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    let again = collect(
        &CollectOptions {
            resume: true,
            ..opts.clone()
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((again.progress.done, again.progress.skipped), (0, 12));
    // Other settings on resume are refused.
    let e = collect(
        &CollectOptions {
            resume: true,
            max_tokens: 9,
            ..opts.clone()
        },
        |_| {},
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("collect.json") && e.contains("sampling"), "{e}");

    // The audit log and the report see the collection.
    let records = read_audit(&s.audit).unwrap();
    assert!(records
        .iter()
        .any(|r| r.status == 429 && r.key == "collector"));
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/admin/usage", s.base))
        .bearer_auth("sk-collector-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let report: Value = reqwest::Client::new()
        .get(format!("{}/v1/admin/usage", s.base))
        .bearer_auth("sk-admin-0001")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = report["keys"].as_array().unwrap();
    let c = keys.iter().find(|k| k["key"] == "collector").unwrap();
    // Refused before admission (no key, a wrong key, a key that is not an admin's): audited.
    let records = read_audit(&s.audit).unwrap();
    for (status, who) in [
        (401, "(no key)"),
        (401, "(unknown key)"),
        (403, "collector"),
    ] {
        assert!(
            records.iter().any(|r| r.status == status && r.key == who),
            "{status} {who}"
        );
    }
    assert!(c["requests"].as_u64().unwrap() >= 12);
    assert!(c["rate_limited"].as_u64().unwrap() >= 1);
    assert!(c["logprobs_share"].as_f64().unwrap() > 0.5);
    assert!(report["markdown"]
        .as_str()
        .unwrap()
        .contains("| collector |"));
}

/// A model dir with the teacher's config and tokenizer but no weights: all a black-box student
/// run knows of the teacher.
fn weightless_copy(model_dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(model_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_answers_become_masked_tokens_and_api_targets_that_train_a_student() {
    use distill_api::convert::{prepare_collected, PrepareCollectedOptions};
    use distill_core::cache::{CacheExpect, TeacherCache, TeacherTargets};
    use distill_core::shards::TokenShards;
    let s = start(None, Duration::from_secs(60), 8).await;
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..16).map(|i| format!("tell me about {i}")).collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let collected = dir.path().join("collected");
    let opts = CollectOptions {
        endpoint: s.base.clone(),
        api_key: None,
        model: None,
        prompts,
        out: collected.clone(),
        concurrency: 4,
        top_logprobs: Some(4),
        max_tokens: 16,
        temperature: 0.0,
        seed: None,
        system: None,
        resume: false,
        max_retries: 1,
        limit: None,
        completions: false,
    };
    collect(&opts, |_| {}).await.unwrap();
    let out = dir.path().join("prepared");
    let summary = prepare_collected(&PrepareCollectedOptions {
        collected: collected.clone(),
        tokenizer: s.model_dir.clone(),
        out: out.clone(),
        seq_len: 64,
        shard_sequences: 8,
    })
    .unwrap();
    assert_eq!(
        (summary.answers, summary.sequences, summary.unmapped),
        (16, 16, 0)
    );
    assert_eq!(summary.cache.as_ref().unwrap().1, 4);

    // Sequence 0 is prompt 0: the chat-templated prompt (masked), then the API's tokens (targets).
    let (model, tok) = load_teacher(&s.model_dir);
    let answers = distill_api::convert::read_collection(&collected).unwrap().1;
    let a = &answers[0];
    let shards = TokenShards::open(&out.join("tokens"), "train").unwrap();
    let ids = shards.sequence(0);
    let mask = shards.target_mask(0).unwrap();
    let prompt = tok
        .encode(&tok.apply_chat_template(&a.messages, true).unwrap(), true)
        .unwrap();
    assert_eq!(&ids[..prompt.len()], &prompt[..]);
    assert!(mask[..prompt.len()].iter().all(|&m| m == 0));
    let api_tokens = a.logprobs.as_ref().unwrap();
    let table = tok.token_bytes_table();
    for (j, t) in api_tokens.iter().enumerate() {
        let id = ids[prompt.len() + j];
        assert_eq!(Some(&table[id as usize]), t.bytes.as_ref());
        assert_eq!(mask[prompt.len() + j], 1);
    }
    // The cached alternatives at the position before each completion token are the API's, which
    // are the teacher's own log-softmax.
    let meta = distill_core::shards::TokenShardsMeta::read(&out.join("tokens")).unwrap();
    let cache = TeacherCache::open(
        &out.join("cache"),
        &meta,
        &CacheExpect {
            tokenizer_hash: Some(tok.hash()),
            ..Default::default()
        },
    )
    .unwrap();
    let TeacherTargets::Sparse {
        ids: cids,
        logprobs,
        ..
    } = cache.targets("train", &[0], &Device::Cpu).unwrap()
    else {
        panic!("a cache gives sparse targets")
    };
    let cids: Vec<Vec<Vec<u32>>> = cids.to_vec3().unwrap();
    let clps: Vec<Vec<Vec<f32>>> = logprobs.to_vec3().unwrap();
    for (j, api_token) in api_tokens.iter().enumerate().take(64 - prompt.len()) {
        let pos = prompt.len() + j - 1;
        let lp = teacher_logprobs(&model, &ids[..pos + 1]);
        for (alt, (&id, &l)) in api_token
            .top_logprobs
            .iter()
            .zip(cids[0][pos].iter().zip(&clps[0][pos]))
        {
            assert_eq!(Some(&table[id as usize]), alt.bytes.as_ref());
            assert!(
                (l - lp[id as usize]).abs() < 1e-4,
                "position {pos}: {l} vs {}",
                lp[id as usize]
            );
        }
    }

    // Both kinds of data train a student that knows the teacher only through the API: no weights
    // in its teacher dir.
    let blind = dir.path().join("tokenizer-only");
    weightless_copy(&s.model_dir, &blind);
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    for (name, extra) in [
        (
            "sparse",
            vec![format!("data.cache=\"{}\"", out.join("cache").display())],
        ),
        (
            "text",
            vec![
                "loss.alpha_kd=0.0".to_string(),
                "loss.alpha_ce=1.0".to_string(),
            ],
        ),
    ] {
        let mut sets = vec![
            format!("teacher.model=\"{}\"", blind.display()),
            format!("data.tokens=\"{}\"", out.join("tokens").display()),
            "train.max_steps=30".into(),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
            "loss.temperature=1.0".into(),
        ];
        sets.extend(extra);
        let cfg = distill_train::config::RunConfig::load(&tiny, &sets).unwrap();
        let run = dir.path().join(format!("run-{name}"));
        let mut losses = Vec::new();
        distill_train::trainer::train(
            cfg,
            &distill_train::trainer::RunOptions {
                out: run.clone(),
                resume: false,
                ignore_memory_plan: false,
                stop_after: None,
            },
            |e| {
                if let distill_train::trainer::Event::Step(m) = e {
                    losses.push(m.loss);
                }
            },
        )
        .unwrap();
        assert!(run.join("final/model.safetensors").exists());
        let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
        let last: f32 = losses[losses.len() - 5..].iter().sum::<f32>() / 5.0;
        assert!(last < first * 0.9, "{name}: loss {first} → {last}");
    }
}
