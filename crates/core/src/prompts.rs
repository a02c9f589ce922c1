//! Prompts files, read by everything that asks a model questions (`distill collect`,
//! `distill provenance`, on-policy training): one prompt per non-empty line, or a JSON object
//! per line with `"prompt"` (text) or `"messages"` (chat turns).

use crate::error::{Error, Result};
use crate::fsio::read_text;
use crate::ChatMessage;
use serde_json::Value;
use std::path::Path;

/// The prompts of a prompts file, each as chat turns (a plain line is one user turn).
pub fn read_prompts(path: &Path) -> Result<Vec<Vec<ChatMessage>>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('{') {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::file(path, format!("line {}: bad JSON: {e}", i + 1)))?;
            if let Some(p) = v.get("prompt").and_then(Value::as_str) {
                out.push(vec![ChatMessage::new("user", p)]);
            } else if let Some(m) = v.get("messages") {
                let msgs: Vec<ChatMessage> = serde_json::from_value(m.clone())
                    .map_err(|e| Error::file(path, format!("line {}: bad messages: {e}", i + 1)))?;
                out.push(msgs);
            } else {
                return Err(Error::file(
                    path,
                    format!(
                        "line {}: a JSON line needs \"prompt\" or \"messages\"",
                        i + 1
                    ),
                ));
            }
        } else {
            out.push(vec![ChatMessage::new("user", line)]);
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no prompts (expected one per line)"));
    }
    Ok(out)
}

/// A prompt's ids as a server would see them: with `chat` (and a tokenizer that has a chat
/// template) the template with the generation prompt; otherwise the turns' text joined by
/// newlines, with the tokenizer's special tokens (as `/v1/completions` encodes a prompt).
pub fn encode_prompt(
    tokenizer: &crate::Tokenizer,
    messages: &[ChatMessage],
    chat: bool,
) -> Result<Vec<u32>> {
    if chat && tokenizer.chat_template.is_some() {
        let text = tokenizer.apply_chat_template(messages, true)?;
        return tokenizer.encode(&text, false);
    }
    let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    tokenizer.encode(&text.join("\n"), true)
}
