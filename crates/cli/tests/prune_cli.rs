//! `distill prune` → `distill train` from the pruned dir, as a user runs them, and the bad inputs
//! of both: each a one-line error naming the problem, a non-zero exit, no panic.

use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use distill_core::Config;
use std::path::Path;
mod common;
use common::{check_failure_after_progress as check_failure, distill};

fn train(
    teacher: &Path,
    tokens: &Path,
    student: &Path,
    out: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let config = out.with_extension("toml");
    let text = format!(
        "name = \"heal\"\n[data]\ntokens = {:?}\n[teacher]\nmodel = {:?}\n\
         [student]\ninit = \"model\"\nmodel = {:?}\n\
         [train]\nbatch_size = 2\nmax_steps = 3\nlr = 1e-3\nmin_lr = 1e-4\nwarmup_steps = 1\n\
         log_every = 1\neval_every = 0\ncheckpoint_every = 0\n",
        tokens.display().to_string(),
        teacher.display().to_string(),
        student.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let mut args: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        config.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    distill(&refs)
}

#[test]
fn prune_then_heal_and_refuse_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = Config {
        num_hidden_layers: 4,
        ..tiny_config()
    };
    let teacher = root.join("teacher");
    write_tiny_model_dir(&teacher, &cfg, 2).unwrap();
    let tokens = root.join("tokens");
    write_tiny_tokens(&tokens, 10, 32, 8, 3).unwrap();
    let pruned = root.join("pruned");
    let (t, k, p) = (
        teacher.to_str().unwrap(),
        tokens.to_str().unwrap(),
        pruned.to_str().unwrap(),
    );
    let base = ["prune", "--teacher", t, "--tokens", k, "--out", p];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        distill(&refs)
    };

    let (code, out, err) = run(with(&["--target-params", "0.8", "--calib-sequences", "4"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("parameters"), "{out}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "prune-report.json",
        "prune-report.md",
        "layer-importance.png",
    ] {
        assert!(pruned.join(f).exists(), "{f} missing");
    }
    let pcfg = Config::from_file(pruned.join("config.json")).unwrap();
    assert!(pcfg.num_params() <= cfg.num_params() * 8 / 10);

    // The pruned dir heals: distill train starts from it, with frozen embeddings too.
    let healed = root.join("healed");
    let (code, _, err) = train(&teacher, &tokens, &pruned, &healed, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        Config::from_file(healed.join("final/config.json"))
            .unwrap()
            .num_hidden_layers,
        pcfg.num_hidden_layers
    );
    let frozen = root.join("frozen");
    let (code, _, err) = train(
        &teacher,
        &tokens,
        &pruned,
        &frozen,
        &["--set", "student.freeze_embeddings=true"],
    );
    assert_eq!(code, 0, "{err}");
    let emb = |d: &Path| distill_core::testing::saved_tensor(d, "model.embed_tokens.weight");
    assert_eq!(
        emb(&frozen.join("final")),
        emb(&pruned),
        "frozen embeddings moved"
    );
    assert_ne!(
        emb(&healed.join("final")),
        emb(&pruned),
        "trained embeddings did not move"
    );

    // A target at or above the teacher's size.
    let (code, _, err) = run(with(&["--target-params", "1.5"]));
    check_failure(code, &err, &["at or above the teacher's"]);
    // Heads that do not divide into the KV heads.
    let (code, _, err) = run(with(&["--heads", "3"]));
    check_failure(code, &err, &["heads = 3", "not a multiple of kv_heads"]);
    // Neither a target nor a shape.
    let (code, _, err) = run(with(&[]));
    check_failure(code, &err, &["--target-params"]);
    // Calibration tokens made with another tokenizer.
    let meta_path = tokens.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["tokenizer_hash"] = serde_json::json!("f".repeat(64));
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let (code, _, err) = run(with(&["--target-params", "0.8"]));
    check_failure(code, &err, &["meta.json", "another tokenizer"]);
    std::fs::write(&meta_path, text).unwrap();
    // The failed runs left the pruned dir as it was.
    assert!(Config::from_file(pruned.join("config.json")).is_ok());

    // A student dir with another tokenizer than the teacher's.
    let other = root.join("other");
    write_tiny_model_dir(&other, &cfg, 4).unwrap();
    let tok_path = other.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let (code, _, err) = train(&teacher, &tokens, &other, &root.join("bad"), &[]);
    check_failure(
        code,
        &err,
        &["tokenizer.json", "differs from the teacher's"],
    );
    // init = "model" with a shape, or without a dir.
    let (code, _, err) = train(
        &teacher,
        &tokens,
        &pruned,
        &root.join("bad2"),
        &["--set", "student.layers=2"],
    );
    check_failure(code, &err, &["takes its shape from student.model"]);
}
