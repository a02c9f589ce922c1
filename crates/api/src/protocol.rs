//! OpenAI's request and error shapes, as far as distill serves them: request bodies parsed and
//! validated into one [`GenSpec`], and `{"error": {message, type, param, code}}` errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use distill_core::ChatMessage;
use serde::Deserialize;
use serde_json::{json, Value};

/// The most `top_logprobs` a chat request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS_CHAT: usize = 20;
/// The most `logprobs` a completions request may ask for (OpenAI's limit).
pub const MAX_LOGPROBS_COMPLETIONS: usize = 5;
/// The most choices per request.
pub const MAX_N: usize = 16;
/// Completion length when the request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// An error in OpenAI's JSON shape, with its HTTP status (and `Retry-After` for 429).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after_s: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_s: None,
        }
    }

    pub fn rate_limited(
        message: impl Into<String>,
        kind: &'static str,
        retry_after_s: u64,
    ) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind,
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after_s: Some(retry_after_s.max(1)),
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after_s: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&s.to_string()).expect("digits are a header value"),
            );
        }
        resp
    }
}

/// `"stop"`: a string or a list of up to four strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A chat message's content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields of `/v1/chat/completions` and `/v1/completions` that distill reads; others are
/// accepted and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Clone, Deserialize)]
struct RequestIn {
    model: Option<String>,
    messages: Option<Vec<MessageIn>>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    echo: Option<bool>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// What a request's prompt is before tokenization.
#[derive(Debug, Clone)]
pub enum PromptIn {
    Messages(Vec<ChatMessage>),
    Text(String),
}

impl PromptIn {
    /// The prompt as one text, for the audit log's diversity signals.
    pub fn flat_text(&self) -> String {
        match self {
            PromptIn::Text(t) => t.clone(),
            PromptIn::Messages(m) => m
                .iter()
                .filter(|m| m.role != "system")
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A validated generation request, whichever endpoint it came from.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt: PromptIn,
    /// None: up to the context length, capped at [`DEFAULT_MAX_TOKENS`].
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    /// Alternatives per generated token; None = no logprobs at all.
    pub top_logprobs: Option<usize>,
    /// Completions: return the prompt before the completion (scored when logprobs are asked).
    pub echo: bool,
    pub stream: bool,
    pub include_usage: bool,
}

fn non_negative(v: Option<i64>, param: &'static str) -> Result<Option<usize>, ApiError> {
    match v {
        Some(x) if x < 0 => Err(ApiError::invalid(
            format!("Invalid '{param}': integer below minimum value. Expected a value >= 0, but got {x} instead."),
            Some(param),
        )
        .with_code("integer_below_min_value")),
        Some(x) => Ok(Some(x as usize)),
        None => Ok(None),
    }
}

/// Parses and validates a request body for `endpoint`.
pub fn parse_request(endpoint: Endpoint, body: &[u8]) -> Result<GenSpec, ApiError> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
        .with_code("invalid_json")
    })?;
    if !raw.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    let r: RequestIn = serde_json::from_value(raw)
        .map_err(|e| ApiError::invalid(format!("Invalid request: {e}"), None))?;
    let model = r
        .model
        .ok_or_else(|| ApiError::invalid("Missing required parameter: 'model'.", Some("model")))?;
    let prompt = match endpoint {
        Endpoint::Chat => {
            let msgs = r.messages.ok_or_else(|| {
                ApiError::invalid("Missing required parameter: 'messages'.", Some("messages"))
            })?;
            if msgs.is_empty() {
                return Err(ApiError::invalid(
                    "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                    Some("messages"),
                ));
            }
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str())
                {
                    return Err(ApiError::invalid(
                        format!("Invalid value for 'messages.role': '{}'.", m.role),
                        Some("messages"),
                    ));
                }
                let content = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(""),
                };
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                out.push(ChatMessage::new(role, &content));
            }
            PromptIn::Messages(out)
        }
        Endpoint::Completions => match r.prompt {
            Some(Value::String(s)) => PromptIn::Text(s),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                PromptIn::Text(a[0].as_str().unwrap_or_default().to_string())
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "Invalid 'prompt': distill serves one string prompt per request.",
                    Some("prompt"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    "Missing required parameter: 'prompt'.",
                    Some("prompt"),
                ))
            }
        },
    };
    let max_tokens = match non_negative(r.max_completion_tokens, "max_completion_tokens")? {
        Some(m) => Some(m),
        None => non_negative(r.max_tokens, "max_tokens")?,
    };
    let temperature = r.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("Invalid 'temperature': {temperature}. Expected a value between 0 and 2."),
            Some("temperature"),
        ));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("Invalid 'top_p': {top_p}. Expected a value in (0, 1]."),
            Some("top_p"),
        ));
    }
    let n = non_negative(r.n, "n")?.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(ApiError::invalid(
            format!("Invalid 'n': {n}. Expected a value between 1 and {MAX_N}."),
            Some("n"),
        ));
    }
    let stop = match r.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "Invalid 'stop': up to 4 non-empty strings.",
            Some("stop"),
        ));
    }
    let top_logprobs = match endpoint {
        Endpoint::Chat => {
            let asked = match r.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "Invalid 'logprobs': expected a boolean.",
                        Some("logprobs"),
                    ))
                }
            };
            let k = non_negative(r.top_logprobs, "top_logprobs")?;
            if let Some(k) = k {
                if k > MAX_TOP_LOGPROBS_CHAT {
                    return Err(ApiError::invalid(
                        format!("Invalid 'top_logprobs': integer above maximum value. Expected a value <= {MAX_TOP_LOGPROBS_CHAT}, but got {k} instead."),
                        Some("top_logprobs"),
                    )
                    .with_code("integer_above_max_value"));
                }
                if !asked {
                    return Err(ApiError::invalid(
                        "Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
                        Some("top_logprobs"),
                    ));
                }
            }
            asked.then_some(k.unwrap_or(0))
        }
        Endpoint::Completions => match r.logprobs {
            None | Some(Value::Null) => None,
            Some(Value::Number(x)) => {
                let k = non_negative(x.as_i64(), "logprobs")?.unwrap_or(0);
                if k > MAX_LOGPROBS_COMPLETIONS {
                    return Err(ApiError::invalid(
                        format!("Invalid 'logprobs': integer above maximum value. Expected a value <= {MAX_LOGPROBS_COMPLETIONS}, but got {k} instead."),
                        Some("logprobs"),
                    )
                    .with_code("integer_above_max_value"));
                }
                Some(k)
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "Invalid 'logprobs': expected an integer (0-5).",
                    Some("logprobs"),
                ))
            }
        },
    };
    let echo = r.echo.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(ApiError::invalid(
            "Unrecognized request argument supplied: echo",
            Some("echo"),
        ));
    }
    if echo && r.stream {
        return Err(ApiError::invalid(
            "'echo' cannot be combined with 'stream'.",
            Some("echo"),
        ));
    }
    Ok(GenSpec {
        endpoint,
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed: r.seed.map(|s| s as u64),
        stop,
        n,
        top_logprobs,
        echo,
        stream: r.stream,
        include_usage: r.stream_options.unwrap_or_default().include_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<GenSpec, ApiError> {
        parse_request(Endpoint::Chat, body.to_string().as_bytes())
    }

    #[test]
    fn parses_and_refuses() {
        let ok = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 7, "stop": "x"}),
        )
        .unwrap();
        assert_eq!(ok.top_logprobs, Some(3));
        assert_eq!(ok.max_tokens, Some(7));
        assert_eq!(ok.stop, vec!["x".to_string()]);
        let bad = |body: Value, param: &str| {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                e.param,
                Some(param).filter(|p| !p.is_empty()),
                "{}",
                e.message
            );
        };
        bad(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        );
        bad(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": -1}),
            "max_tokens",
        );
        bad(json!({"model": "m", "messages": []}), "messages");
        bad(
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "model",
        );
        bad(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}),
            "n",
        );
        let e = parse_request(Endpoint::Chat, b"{not json").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse_request(
            Endpoint::Completions,
            json!({"model": "m", "prompt": "a", "logprobs": 6})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.param, Some("logprobs"));
    }
}
