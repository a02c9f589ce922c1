//! The generation engine behind the server: one thread owns the model and serves jobs in batches.
//!
//! Per-tick batching: when the thread becomes free it takes the next job and every job that
//! arrives within a short tick (up to `max_batch` rows, one row per requested choice), left-pads their prompts into one batch
//! (padding hidden by the attention mask, see [`CausalLm::forward_cached_padded`]), and decodes all
//! rows together until the last one finishes; jobs that arrive meanwhile form the next batch.
//! Each job gets its events (tokens with log-probabilities, finish reasons) on its own channel as
//! they are produced, which is what streaming responses are made of.

use candle_core::{DType, Tensor};
use distill_core::{CausalLm, KvCache, Result};
use distill_teacher::generate::{Sampler, SamplingParams};
use std::sync::mpsc as std_mpsc;
use tokio::sync::mpsc;

/// A token with its log-probability under the model (log-softmax of the raw logits, T = 1, as
/// OpenAI reports them whatever the sampling temperature) and the most likely alternatives.
/// For a job that did not ask for logprobs only `id` is meaningful (`logprob` is NaN).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// Most likely first; ties: lower id first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's own tokens scored (`echo` + logprobs): the first has no logprob.
    Prompt(Vec<Option<TokenLogprob>>),
    /// A generated token of choice `choice`; `text` is the new text it completes (UTF-8 held back
    /// across split characters and possible stop-string prefixes).
    Token {
        choice: usize,
        token: TokenLogprob,
        text: String,
    },
    /// Choice `choice` ended; `text` is the rest of its text (up to a stop string).
    Finished {
        choice: usize,
        reason: Finish,
        text: String,
    },
    Error(String),
}

/// One request: a tokenized prompt and how to continue it.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Alternatives per token; None = no logprobs.
    pub top_logprobs: Option<usize>,
    /// Score the prompt's own tokens (completions `echo` with logprobs).
    pub score_prompt: bool,
    pub events: mpsc::UnboundedSender<Event>,
}

/// How long a new batch waits for more requests after its first one.
const TICK: std::time::Duration = std::time::Duration::from_millis(15);

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    jobs: std_mpsc::Sender<Job>,
}

impl Engine {
    /// Starts the engine thread over `model`. `token_bytes[id]` are the raw bytes of each token;
    /// `stop_ids` end a choice.
    pub fn start(
        model: CausalLm,
        token_bytes: Vec<Vec<u8>>,
        stop_ids: Vec<u32>,
        max_batch: usize,
    ) -> Self {
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("distill-engine".into())
            .spawn(move || {
                let worker = Worker {
                    model,
                    token_bytes,
                    stop_ids,
                    max_batch: max_batch.max(1),
                };
                let mut pending: Option<Job> = None;
                loop {
                    let first = match pending.take() {
                        Some(j) => j,
                        None => match rx.recv() {
                            Ok(j) => j,
                            Err(_) => return, // server gone
                        },
                    };
                    let mut rows = first.n;
                    let (mut longest, mut most_new) = (first.prompt.len(), first.max_tokens);
                    let mut batch = vec![first];
                    // Left padding puts every row at the longest prompt's positions: a job joins
                    // only if the batch still fits the context with it.
                    let context = worker.model.config().max_position_embeddings;
                    // The tick: requests that arrive within TICK of the first join its batch
                    // (clients answered by the last batch send their next requests together).
                    let deadline = std::time::Instant::now() + TICK;
                    while rows < worker.max_batch {
                        let wait = deadline.saturating_duration_since(std::time::Instant::now());
                        let Ok(job) = rx.recv_timeout(wait) else {
                            break;
                        };
                        let fits =
                            longest.max(job.prompt.len()) + most_new.max(job.max_tokens) <= context;
                        if rows + job.n > worker.max_batch || !fits {
                            pending = Some(job);
                            break;
                        }
                        rows += job.n;
                        longest = longest.max(job.prompt.len());
                        most_new = most_new.max(job.max_tokens);
                        batch.push(job);
                    }
                    if let Err(e) = worker.run(&mut batch) {
                        for job in &batch {
                            let _ = job.events.send(Event::Error(e.to_string()));
                        }
                    }
                }
            })
            .expect("spawning the engine thread");
        Self { jobs: tx }
    }

    /// Queues a job; false when the engine thread has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// `id`'s log-softmax in one logits row and the row's `k` most likely tokens, through the teacher
/// cache's top-k (one rule for the cache and the API: most likely first, ties to the lower id).
fn row_logprobs(row: &[f32], id: u32, k: usize) -> TokenLogprob {
    let k = k.min(row.len());
    let (mut ids, mut lps) = (vec![0u32; k], vec![0f32; k]);
    let lse = distill_core::logits::row_topk(row, &mut ids, &mut lps);
    TokenLogprob {
        id,
        logprob: row[id as usize] - lse,
        top: ids.into_iter().zip(lps).collect(),
    }
}

/// Per-row text state: the bytes generated so far and how many were already sent.
struct RowText {
    bytes: Vec<u8>,
    sent: usize,
}

impl RowText {
    /// Position of the first stop string in the generated bytes.
    fn stop_at(&self, stop: &[String]) -> Option<usize> {
        stop.iter()
            .filter_map(|s| {
                let s = s.as_bytes();
                self.bytes.windows(s.len()).position(|w| w == s)
            })
            .min()
    }

    /// New text safe to send: whole UTF-8 characters, holding back a tail that could still grow
    /// into a stop string.
    fn take_ready(&mut self, stop: &[String]) -> String {
        let hold = stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut end = self.bytes.len().saturating_sub(hold).max(self.sent);
        while end > self.sent && std::str::from_utf8(&self.bytes[self.sent..end]).is_err() {
            end -= 1;
        }
        let text = String::from_utf8_lossy(&self.bytes[self.sent..end]).into_owned();
        self.sent = end;
        text
    }

    /// The rest of the text, up to `end`.
    fn take_rest(&mut self, end: usize) -> String {
        let end = end.max(self.sent);
        let text = String::from_utf8_lossy(&self.bytes[self.sent..end]).into_owned();
        self.sent = end;
        text
    }
}

struct Worker {
    model: CausalLm,
    token_bytes: Vec<Vec<u8>>,
    stop_ids: Vec<u32>,
    max_batch: usize,
}

struct Row {
    job: usize,
    choice: usize,
    sampler: Sampler,
    generated: usize,
    text: RowText,
    done: bool,
}

impl Worker {
    fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }

    fn run(&self, jobs: &mut [Job]) -> Result<()> {
        let device = self.model.device().clone();
        // Prompt scoring (echo + logprobs): one full forward per job that asks.
        for job in jobs.iter() {
            if job.score_prompt {
                let k = job.top_logprobs.unwrap_or(0);
                let ids = Tensor::new(job.prompt.as_slice(), &device)?.unsqueeze(0)?;
                let logits = self.model.forward(&ids)?.squeeze(0)?;
                let rows = Self::logits_rows(&logits)?;
                let mut scored = vec![None];
                for (t, &id) in job.prompt.iter().enumerate().skip(1) {
                    scored.push(Some(row_logprobs(&rows[t - 1], id, k)));
                }
                let _ = job.events.send(Event::Prompt(scored));
            }
        }
        let mut rows = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            for c in 0..job.n {
                rows.push(Row {
                    job: j,
                    choice: c,
                    sampler: Sampler::new(&SamplingParams {
                        temperature: job.temperature,
                        top_p: job.top_p,
                        seed: job.seed.wrapping_add(c as u64),
                        max_new_tokens: job.max_tokens,
                    }),
                    generated: 0,
                    text: RowText {
                        bytes: vec![],
                        sent: 0,
                    },
                    done: false,
                });
            }
        }
        for row in rows.iter_mut() {
            let job = &jobs[row.job];
            if job.max_tokens == 0 || job.prompt.is_empty() {
                row.done = true;
                let _ = job.events.send(Event::Finished {
                    choice: row.choice,
                    reason: Finish::Length,
                    text: String::new(),
                });
            }
        }
        if rows.iter().all(|r| r.done) {
            return Ok(());
        }
        let longest = rows
            .iter()
            .map(|r| jobs[r.job].prompt.len())
            .max()
            .unwrap_or(0);
        let left_pad: Vec<usize> = rows
            .iter()
            .map(|r| longest - jobs[r.job].prompt.len())
            .collect();
        let mut input = Vec::with_capacity(rows.len() * longest);
        for (r, &pad) in rows.iter().zip(&left_pad) {
            input.extend(std::iter::repeat_n(0u32, pad));
            input.extend_from_slice(&jobs[r.job].prompt);
        }
        let mut cache = KvCache::new(self.model.config());
        let ids = Tensor::from_vec(input, (rows.len(), longest), &device)?;
        let mut logits = self
            .model
            .forward_cached_padded(&ids, &mut cache, &left_pad)?;
        loop {
            let table = Self::logits_rows(&logits)?;
            let mut next = Vec::with_capacity(rows.len());
            for (row, logits_row) in rows.iter_mut().zip(&table) {
                if row.done {
                    next.push(0);
                    continue;
                }
                let job = &jobs[row.job];
                if job.events.is_closed() {
                    row.done = true; // the client went away
                    next.push(0);
                    continue;
                }
                let id = row.sampler.sample_slice(logits_row);
                next.push(id);
                if self.stop_ids.contains(&id) {
                    row.done = true;
                    let text = row.text.take_rest(row.text.bytes.len());
                    let _ = job.events.send(Event::Finished {
                        choice: row.choice,
                        reason: Finish::Stop,
                        text,
                    });
                    continue;
                }
                row.generated += 1;
                row.text
                    .bytes
                    .extend_from_slice(self.token_bytes.get(id as usize).map_or(&[][..], |b| b));
                // The log-softmax costs a pass over the vocabulary: only for jobs that ask.
                let token = match job.top_logprobs {
                    Some(k) => row_logprobs(logits_row, id, k),
                    None => TokenLogprob {
                        id,
                        logprob: f32::NAN,
                        top: vec![],
                    },
                };
                let stop_at = row.text.stop_at(&job.stop);
                let text = match stop_at {
                    Some(_) => String::new(),
                    None => row.text.take_ready(&job.stop),
                };
                let _ = job.events.send(Event::Token {
                    choice: row.choice,
                    token,
                    text,
                });
                let context_full =
                    longest + row.generated >= self.model.config().max_position_embeddings;
                let reason = if stop_at.is_some() {
                    Some(Finish::Stop)
                } else if row.generated >= job.max_tokens || context_full {
                    Some(Finish::Length)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    row.done = true;
                    let end = stop_at.unwrap_or(row.text.bytes.len());
                    let text = row.text.take_rest(end);
                    let _ = job.events.send(Event::Finished {
                        choice: row.choice,
                        reason,
                        text,
                    });
                }
            }
            if rows.iter().all(|r| r.done) {
                return Ok(());
            }
            let ids = Tensor::from_vec(next, (rows.len(), 1), &device)?;
            logits = self
                .model
                .forward_cached_padded(&ids, &mut cache, &left_pad)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_logprobs_is_log_softmax_with_sorted_top() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let lse = (1f32.exp() + 3f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        let t = row_logprobs(&row, 2, 3);
        assert!((t.logprob - (2.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((t.top[0].1 - (3.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn text_is_held_back_for_utf8_and_stop_prefixes() {
        let mut t = RowText {
            bytes: "ab".as_bytes().to_vec(),
            sent: 0,
        };
        let stop = vec!["XYZ".to_string()];
        assert_eq!(t.take_ready(&stop), ""); // the last 2 bytes could start "XYZ"
        t.bytes.extend_from_slice("cdé".as_bytes());
        // 6 bytes, hold 2: "abcd" is safe (é is 2 bytes, held).
        assert_eq!(t.take_ready(&stop), "abcd");
        t.bytes.extend_from_slice(b"XY");
        assert_eq!(t.stop_at(&stop), None);
        t.bytes.push(b'Z');
        let at = t.stop_at(&stop).unwrap();
        assert_eq!(t.take_rest(at), "é");
        // A split UTF-8 character is held back until complete.
        let mut t = RowText {
            bytes: vec![b'a', 0xc3],
            sent: 0,
        };
        assert_eq!(t.take_ready(&[]), "a");
        t.bytes.push(0xa9);
        assert_eq!(t.take_ready(&[]), "é");
    }
}
