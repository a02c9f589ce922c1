//! `distill serve` and `distill collect` as a user runs them: a collection killed with SIGKILL
//! mid-run resumes with `--resume` and ends with every prompt answered exactly once; bad input
//! gets one-line errors.

use distill_core::testing::{tiny_config, write_tiny_model_dir};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_distill");

/// A running `distill serve`, killed on drop.
struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    // "distill serve: 'teacher' on http://127.0.0.1:PORT/v1 (...)"
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .trim_end_matches("/v1")
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    Served { child, base: url }
}

fn indices(path: &Path) -> Vec<usize> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap() as usize
        })
        .collect()
}

#[test]
fn collect_killed_mid_run_resumes_without_duplicates_or_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("teacher");
    write_tiny_model_dir(&model, &tiny_config(), 5).unwrap();
    let served = serve(&model, &[]);
    let prompts = dir.path().join("prompts.txt");
    let n = 200;
    let text: Vec<String> = (0..n).map(|i| format!("prompt number {i}")).collect();
    std::fs::write(&prompts, text.join("\n")).unwrap();
    let out = dir.path().join("collected");
    let args = |resume: bool| {
        let mut a = vec![
            "collect".to_string(),
            "--endpoint".into(),
            served.base.clone(),
            "--prompts".into(),
            prompts.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--concurrency".into(),
            "2".into(),
            "--max-tokens".into(),
            "24".into(),
            "--top-logprobs".into(),
            "2".into(),
        ];
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let mut child = Command::new(BIN)
        .args(args(false))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let responses = out.join("responses.jsonl");
    let t0 = Instant::now();
    while indices(&responses).len() < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "collect made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = indices(&responses).len();
    assert!(
        before < n,
        "killed too late to test anything ({before} of {n})"
    );

    // Without --resume the used dir is refused, one line, nothing lost.
    let o = Command::new(BIN).args(args(false)).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("--resume"),
        "{err}"
    );
    assert!(indices(&responses).len() >= before);

    let o = Command::new(BIN).args(args(true)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut idx = indices(&responses);
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for &i in &idx {
        *counts.entry(i).or_default() += 1;
    }
    assert!(counts.values().all(|&c| c == 1), "duplicates after resume");
    idx.sort();
    assert_eq!(idx, (0..n).collect::<Vec<_>>());
}

#[test]
fn serve_and_collect_refuse_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let one_line_error = |args: &[&str], needle: &str| {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        // Progress lines may come first; the error itself is one line, the last.
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(last.contains(needle), "{args:?}: {err}");
    };
    let missing = dir.path().join("nope");
    one_line_error(&["serve", "--model", missing.to_str().unwrap()], "nope");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[[keys]]\nkey = \"short\"\nname = \"a\"\n").unwrap();
    let model = dir.path().join("teacher");
    write_tiny_model_dir(&model, &tiny_config(), 5).unwrap();
    one_line_error(
        &[
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
        ],
        "keys.toml",
    );
    std::fs::write(
        &keys,
        "[[keys]]\nkey = \"sk-abcdefgh\"\nname = \"a\"\nquota = 3\n",
    )
    .unwrap();
    one_line_error(
        &[
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
        ],
        "quota",
    );
    let audit = dir.path().join("audit.jsonl");
    std::fs::write(&audit, "{\"not\": \"a record\"}\n{}\n").unwrap();
    one_line_error(
        &["serve", "--report", audit.to_str().unwrap()],
        "audit.jsonl",
    );
    let prompts = dir.path().join("prompts.txt");
    // Nothing listens on port 9.
    let collect = |out: &str, extra: &[&str], needle: &str| {
        let out = dir.path().join(out);
        let mut args = vec![
            "collect",
            "--endpoint",
            "http://127.0.0.1:9",
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--model",
            "m",
        ];
        args.extend_from_slice(extra);
        one_line_error(&args, needle);
    };
    std::fs::write(&prompts, "\n").unwrap();
    collect("o", &[], "prompts.txt");
    std::fs::write(&prompts, "hello\n").unwrap();
    // Retried, then reported.
    collect("o2", &["--max-retries", "1"], "prompts failed");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("p");
    let prepare = [
        "prepare-collected",
        "--collected",
        empty.to_str().unwrap(),
        "--tokenizer",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    one_line_error(&prepare, "not a collection");
    std::fs::write(empty.join("collect.json"), "{}").unwrap();
    one_line_error(&prepare, "collect.json");
}
