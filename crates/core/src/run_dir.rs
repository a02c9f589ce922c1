//! The run dir: what a training run writes and what resume, eval and the report read back. This
//! module is its only owner: no other code names its files or its records' JSON keys.
//!
//! ```text
//! config.toml          the resolved run config
//! metrics.jsonl        one Record per line: {"type":"train",...} per logged step, {"type":"eval",...}
//! step-N/              checkpoint: HF model dir + optimizer.safetensors + trainer_state.json
//! final/               the final student (same layout)
//! ```

use crate::error::{Error, FileContext, Result};
use crate::fsio::{read_jsonl, read_text, write_atomic};
use crate::shards::Cursor;
use serde::{Deserialize, Deserializer, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A checkpoint's hidden-state projections (trained with the student, not part of the model).
pub const PROJECTION_FILE: &str = "hidden_projection.safetensors";
pub const FINAL_DIR: &str = "final";
const STEP_PREFIX: &str = "step-";

/// Where a run stands at a checkpoint: with the checkpoint's weights and optimizer state, all that
/// an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens: u64,
    /// The data order's state: the seed and the cursor fully determine the next batches.
    pub cursor: Cursor,
    pub data_seed: u64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub elapsed_seconds: f64,
    /// The resolved run config, as TOML.
    pub config: String,
}

/// A logged training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f32,
    pub kd: f32,
    pub ce: f32,
    pub lr: f64,
    pub grad_norm: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_second: f64,
    pub elapsed: f64,
    /// The hidden-state term (unweighted), when the run has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<f32>,
    /// The KD term of the step's on-policy micro-batches alone, when it had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_policy_kd: Option<f32>,
    /// Where the step's time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<StepSeconds>,
}

/// The wall-clock split of one optimizer step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepSeconds {
    /// The student sampling its own continuations (on-policy micro-batches).
    pub sample: f64,
    /// Teacher targets: the live teacher's forward, or reading the cache.
    pub teacher: f64,
    /// The student's forward and backward, and the optimizer update.
    pub update: f64,
}

/// A validation pass during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub tokens: u64,
    /// Mean next-token cross-entropy (nats) on the validation sequences.
    #[serde(deserialize_with = "nan_if_null")]
    pub ce: f64,
    /// exp(ce): infinite (written as null, read back as NaN) for a diverged student.
    #[serde(deserialize_with = "nan_if_null")]
    pub perplexity: f64,
    /// Mean KL(teacher‖student) at temperature 1 (nats per token); NaN (written as null) when the
    /// run has no teacher.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_to_teacher: f64,
    pub eval_tokens: usize,
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record {
    Train(StepMetrics),
    Eval(EvalMetrics),
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Train(m) => m.step,
            Record::Eval(m) => m.step,
        }
    }
}

/// A run dir (which need not exist yet).
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.root.join(format!("{STEP_PREFIX}{step}"))
    }

    pub fn final_dir(&self) -> PathBuf {
        self.root.join(FINAL_DIR)
    }

    /// The path of the run's config, refusing a dir that is not a run.
    pub fn existing_config(&self) -> Result<PathBuf> {
        let path = self.config_path();
        if !path.exists() {
            return Err(Error::file(
                &self.root,
                format!("not a run dir (no {CONFIG_FILE})"),
            ));
        }
        Ok(path)
    }

    /// The run's config as TOML text, refusing a dir that is not a run.
    pub fn config_text(&self) -> Result<String> {
        read_text(self.existing_config()?)
    }

    pub fn write_config(&self, toml: &str) -> Result<()> {
        write_atomic(self.config_path(), toml.as_bytes())
    }

    /// Complete step checkpoints (those with a trainer state), by step.
    pub fn checkpoints(&self) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let step = name.strip_prefix(STEP_PREFIX)?.parse().ok()?;
                e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        self.checkpoints().pop().map(|(_, p)| p)
    }

    /// Whether a run already wrote checkpoints here (a new run must not mix with them).
    pub fn has_checkpoints(&self) -> bool {
        self.root.join(STATE_FILE).exists() || !self.checkpoints().is_empty()
    }

    /// Keeps the last `keep` step checkpoints and the best one.
    pub fn remove_old_checkpoints(&self, keep: usize, best: Option<u64>) -> Result<()> {
        let all = self.checkpoints();
        let n = all.len();
        for (i, (step, dir)) in all.into_iter().enumerate() {
            if i + keep.max(1) < n && Some(step) != best {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
        Ok(())
    }

    /// Every record of metrics.jsonl (none when the file does not exist).
    pub fn records(&self) -> Result<Vec<Record>> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(Vec::new());
        }
        Ok(read_jsonl(&path, "a metrics record")?.0)
    }

    /// Drops the records after `step` (written by a run killed after its last checkpoint: the
    /// resumed run writes them again, identically). The kept lines stay byte for byte as written
    /// (a float read back and written again need not be the same text); a torn last line goes.
    pub fn truncate_records_after(&self, step: u64) -> Result<()> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(());
        }
        let text = read_text(&path)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let mut kept = String::new();
        for (i, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            #[derive(Deserialize)]
            struct Step {
                step: u64,
            }
            let r: Step = serde_json::from_str(line).map_err(|e| {
                Error::file(&path, format!("line {}: not a metrics record: {e}", i + 1))
            })?;
            if r.step <= step {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        write_atomic(&path, kept.as_bytes())
    }

    /// Appends records to metrics.jsonl, a line each.
    pub fn record_writer(&self) -> Result<RecordWriter> {
        let path = self.metrics_path();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(RecordWriter { file, path })
    }
}

fn record_line(r: &Record) -> String {
    serde_json::to_string(r).expect("metrics serialise")
}

pub struct RecordWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl RecordWriter {
    pub fn write(&mut self, r: &Record) -> Result<()> {
        writeln!(self.file, "{}", record_line(r)).map_err(|e| Error::io(&self.path, e))
    }
}

/// A checkpoint's trainer state.
pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let path = checkpoint.join(STATE_FILE);
    serde_json::from_str(&read_text(&path)?).with_file(&path)
}

pub fn write_state(checkpoint: &Path, state: &TrainerState) -> Result<()> {
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(checkpoint.join(STATE_FILE), json.as_bytes())
}

/// Whether `dir` is named as a checkpoint of a run (`step-N` or `final`).
pub fn is_checkpoint_name(dir: &Path) -> bool {
    dir.file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| n == FINAL_DIR || n.starts_with(STEP_PREFIX))
}

/// The step of a checkpoint dir: from its `step-N` name, or (for `final`) its trainer state.
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    if let Some(n) = name.strip_prefix(STEP_PREFIX) {
        return n.parse().ok();
    }
    read_state(dir).ok().map(|s| s.step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_type_tag_and_a_missing_kl() {
        let t = Record::Train(StepMetrics {
            step: 3,
            tokens: 96,
            loss: 1.5,
            kd: 1.5,
            ce: 4.0,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_second: 10.0,
            elapsed: 1.0,
            hidden: None,
            on_policy_kd: None,
            seconds: None,
        });
        let line = record_line(&t);
        assert!(
            line.starts_with("{\"type\":\"train\",\"step\":3,"),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), t);
        let e = Record::Eval(EvalMetrics {
            step: 3,
            tokens: 96,
            ce: 4.0,
            perplexity: 4f64.exp(),
            kl_to_teacher: f64::NAN,
            eval_tokens: 10,
        });
        let line = record_line(&e);
        assert!(line.contains("\"kl_to_teacher\":null"), "{line}");
        match serde_json::from_str::<Record>(&line).unwrap() {
            Record::Eval(m) => assert!(m.kl_to_teacher.is_nan()),
            r => panic!("{r:?}"),
        }
        // A diverged student: exp(ce) overflows, is written as null and still reads back.
        let diverged = Record::Eval(EvalMetrics {
            step: 4,
            tokens: 128,
            ce: 800.0,
            perplexity: f64::INFINITY,
            kl_to_teacher: 700.0,
            eval_tokens: 10,
        });
        let line = record_line(&diverged);
        assert!(line.contains("\"perplexity\":null"), "{line}");
        match serde_json::from_str::<Record>(&line).unwrap() {
            Record::Eval(m) => assert!(m.perplexity.is_nan() && m.ce == 800.0),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn checkpoint_listing_truncation_and_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        assert!(!run.has_checkpoints());
        let state = |step| TrainerState {
            step,
            tokens: 0,
            cursor: Cursor::default(),
            data_seed: 0,
            best_eval_loss: None,
            best_step: None,
            elapsed_seconds: 0.0,
            config: String::new(),
        };
        for step in [10, 2, 30] {
            std::fs::create_dir_all(run.step_dir(step)).unwrap();
            write_state(&run.step_dir(step), &state(step)).unwrap();
        }
        std::fs::create_dir_all(run.step_dir(40)).unwrap(); // no state: incomplete
        std::fs::create_dir_all(run.final_dir()).unwrap();
        write_state(&run.final_dir(), &state(30)).unwrap();
        let steps: Vec<u64> = run.checkpoints().iter().map(|c| c.0).collect();
        assert_eq!(steps, [2, 10, 30]);
        assert!(run.has_checkpoints());
        assert_eq!(checkpoint_step(&run.final_dir()), Some(30));
        assert_eq!(checkpoint_step(&run.step_dir(40)), Some(40));
        assert!(is_checkpoint_name(&run.final_dir()) && !is_checkpoint_name(tmp.path()));
        run.remove_old_checkpoints(1, Some(2)).unwrap();
        let steps: Vec<u64> = run.checkpoints().iter().map(|c| c.0).collect();
        assert_eq!(steps, [2, 30]);

        let mut w = run.record_writer().unwrap();
        for step in 1..=4 {
            let m = StepMetrics {
                step,
                tokens: step * 8,
                loss: 1.0,
                kd: 1.0,
                ce: 1.0,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens_per_second: 1.0,
                elapsed: 1.0,
                hidden: None,
                on_policy_kd: None,
                seconds: None,
            };
            w.write(&Record::Train(m)).unwrap();
        }
        drop(w);
        // A line as another writer may have put it (a float text serde_json parses to a
        // neighbouring value), and a torn last line from a killed writer.
        let mut text = std::fs::read_to_string(run.metrics_path()).unwrap();
        let odd = "{\"type\":\"train\",\"step\":2,\"tokens\":16,\"loss\":1.0,\"kd\":1.0,\"ce\":1.0,\"lr\":0.001,\"grad_norm\":0.14219102849944915,\"tokens_per_second\":1.0,\"elapsed\":1.0}";
        text = text.replacen(text.lines().nth(1).unwrap(), odd, 1);
        text.push_str("{\"type\":\"train\",\"st");
        std::fs::write(run.metrics_path(), &text).unwrap();
        run.truncate_records_after(2).unwrap();
        let kept = std::fs::read_to_string(run.metrics_path()).unwrap();
        assert_eq!(kept.lines().nth(1), Some(odd), "kept lines stay as written");
        let left: Vec<u64> = run.records().unwrap().iter().map(Record::step).collect();
        assert_eq!(left, [1, 2]);
    }
}
