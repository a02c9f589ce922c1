//! `distill train` as a user runs it: a run killed with SIGKILL between checkpoints resumes from
//! its last checkpoint and ends with the same weights as a run that was never interrupted.

use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn train_args(root: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    [
        "train",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "300",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.eval_every=50",
        "--set",
        "train.keep_checkpoints=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--set".into(),
        format!("teacher.model=\"{}\"", root.join("teacher").display()),
        "--set".into(),
        format!("data.tokens=\"{}\"", root.join("tokens").display()),
    ])
    .chain(
        extra
            .iter()
            .flat_map(|s| ["--set".to_string(), s.to_string()]),
    )
    .collect()
}

#[test]
fn sigkill_then_resume_ends_with_the_same_weights() {
    sigkill_then_resume(&[]);
}

/// The same with on-policy batches (the student's samples drawn again after the kill must be the
/// ones an uninterrupted run drew) and a hidden-state loss through a learned projection.
#[test]
fn sigkill_then_resume_ends_with_the_same_weights_on_policy_with_a_hidden_state_loss() {
    sigkill_then_resume(&[
        "onpolicy.fraction=0.5",
        "onpolicy.prompt_tokens=8",
        "onpolicy.max_new_tokens=8",
        "hidden.weight=0.5",
        "hidden.layers=[[0, 0], [1, 1]]",
        "student.hidden=16",
    ]);
}

fn sigkill_then_resume(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_tiny_model_dir(&root.join("teacher"), &tiny_config(), 3).unwrap();
    write_tiny_tokens(&root.join("tokens"), 8, 32, 16, 4).unwrap();
    let bin = env!("CARGO_BIN_EXE_distill");

    let straight = root.join("straight");
    let out = Command::new(bin)
        .args(train_args(root, &straight, extra))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let killed = root.join("killed");
    let mut child = Command::new(bin)
        .args(train_args(root, &killed, extra))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !killed.join("step-20/trainer_state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !killed.join("final").exists(),
        "the run finished before it was killed ({status})"
    );

    let out = Command::new(bin)
        .args(["train", "--resume", killed.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming at step"), "{err}");
    assert_eq!(
        std::fs::read(straight.join("final/model.safetensors")).unwrap(),
        std::fs::read(killed.join("final/model.safetensors")).unwrap()
    );
    if !extra.is_empty() {
        assert_eq!(
            std::fs::read(straight.join("final/hidden_projection.safetensors")).unwrap(),
            std::fs::read(killed.join("final/hidden_projection.safetensors")).unwrap()
        );
    }
    assert_eq!(
        std::fs::read_to_string(straight.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"train\""))
            .map(|l| l.split("\"tokens_per_second\"").next().unwrap().to_string())
            .collect::<Vec<_>>(),
        std::fs::read_to_string(killed.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"train\""))
            .map(|l| l.split("\"tokens_per_second\"").next().unwrap().to_string())
            .collect::<Vec<_>>(),
    );
}
