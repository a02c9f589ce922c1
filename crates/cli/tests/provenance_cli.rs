//! `distill provenance` as a user runs it, on tiny random models: a model against a copy of
//! itself is derived with p at the test's floor, an unrelated model is not, and bad input (no
//! references, too few prompts, an endpoint that is down, another tokenizer) is one line on
//! stderr with a non-zero exit.

use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use std::path::PathBuf;
use std::process::{Command, Output};

struct Zoo {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn zoo() -> Zoo {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for (name, seed) in [("teacher", 31), ("r1", 32), ("r2", 33), ("unrelated", 34)] {
        write_tiny_model_dir(&root.join(name), &tiny_config(), seed).unwrap();
    }
    // The teacher's weights under another name: what a thief's copy would be.
    let copy = root.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(root.join("teacher")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    write_tiny_tokens(&root.join("tokens"), 160, 16, 64, 9).unwrap();
    let prompts: Vec<String> = (0..30)
        .map(|i| format!("the story of number {i} begins"))
        .collect();
    std::fs::write(root.join("prompts.txt"), prompts.join("\n")).unwrap();
    Zoo { _dir: dir, root }
}

fn provenance(z: &Zoo, suspect: &str, refs: &[&str], extra: &[&str]) -> Output {
    let p = |n: &str| -> String {
        if n.starts_with("http") {
            n.to_string()
        } else {
            z.root.join(n).display().to_string()
        }
    };
    let mut args = vec![
        "provenance".to_string(),
        "--teacher".into(),
        p("teacher"),
        "--suspect".into(),
        p(suspect),
        "--out".into(),
        z.root
            .join(format!("report-{suspect}"))
            .display()
            .to_string(),
        "--permutations".into(),
        "999".into(),
        "--json".into(),
    ];
    if !refs.is_empty() {
        args.push("--reference".into());
        args.extend(refs.iter().map(|r| p(r)));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(&args)
        .output()
        .unwrap()
}

fn verdict(out: &Output) -> (bool, f64) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &r["teachers"][0];
    (
        t["derived"].as_bool().unwrap(),
        t["p_value"].as_f64().unwrap(),
    )
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn tokens(z: &Zoo) -> Vec<String> {
    vec![
        "--tokens".into(),
        z.root.join("tokens").display().to_string(),
        "--max-prompts".into(),
        "40".into(),
    ]
}

#[test]
fn white_box_a_copy_is_derived_with_p_at_the_floor_and_an_unrelated_model_is_not() {
    let z = zoo();
    let t = tokens(&z);
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    let (derived, p) = verdict(&provenance(&z, "copy", &["r1", "r2"], &t));
    assert!(derived && p <= 1e-3, "copy: derived {derived}, p {p}");
    let (derived, p) = verdict(&provenance(&z, "unrelated", &["r1", "r2"], &t));
    assert!(!derived && p > 0.01, "unrelated: derived {derived}, p {p}");
    let report = z.root.join("report-unrelated");
    for f in ["report.md", "report.json", "agreement.png"] {
        assert!(report.join(f).is_file(), "{f}");
    }
}

#[test]
fn black_box_a_copy_answers_like_the_teacher_and_an_unrelated_model_does_not() {
    let z = zoo();
    let prompts = z.root.join("prompts.txt").display().to_string();
    let args = ["--prompts", prompts.as_str(), "--max-new-tokens", "8"];
    let (derived, p) = verdict(&provenance(&z, "copy", &["r1", "r2"], &args));
    assert!(derived && p <= 1e-3, "copy: derived {derived}, p {p}");
    let (derived, _) = verdict(&provenance(&z, "unrelated", &["r1", "r2"], &args));
    assert!(!derived);
}

#[test]
fn bad_input_is_one_line_naming_the_problem() {
    let z = zoo();
    let t = tokens(&z);
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    let e = one_line_error(&provenance(&z, "copy", &[], &t));
    assert!(e.contains("no --reference"), "{e}");
    let tokens_dir = z.root.join("tokens");
    let few = [
        "--tokens",
        tokens_dir.to_str().unwrap(),
        "--max-prompts",
        "5",
    ];
    let e = one_line_error(&provenance(&z, "copy", &["r1"], &few));
    assert!(e.contains("too few prompts"), "{e}");

    // Another tokenizer, white-box.
    let other = z.root.join("other-tok");
    write_tiny_model_dir(&other, &tiny_config(), 40).unwrap();
    let tj = other.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    v["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&tj, v.to_string()).unwrap();
    let e = one_line_error(&provenance(&z, "other-tok", &["r1"], &t));
    assert!(
        e.contains("another tokenizer") && e.contains("other-tok"),
        "{e}"
    );

    // An endpoint that is down (nothing listens on port 9), black-box; and white-box at all.
    let prompts = z.root.join("prompts.txt").display().to_string();
    let down = "http://127.0.0.1:9/v1";
    let e = one_line_error(&provenance(
        &z,
        down,
        &["r1"],
        &["--prompts", prompts.as_str()],
    ));
    assert!(e.contains("127.0.0.1:9"), "{e}");
    let e = one_line_error(&provenance(&z, down, &["r1"], &t));
    assert!(e.contains("endpoint") && e.contains("--prompts"), "{e}");

    // Signal weights out of range.
    let p = ["--prompts", prompts.as_str()];
    let e = one_line_error(&provenance(
        &z,
        "copy",
        &["r1"],
        &[&p[..], &["--top-weight", "1.5"][..]].concat(),
    ));
    assert!(e.contains("top-weight 1.5"), "{e}");
    let e = one_line_error(&provenance(
        &z,
        "copy",
        &["r1"],
        &[&p[..], &["--top-positions", "0"][..]].concat(),
    ));
    assert!(e.contains("top-positions 0"), "{e}");
}
