//! Bad inputs to the `distill` binary: each gives one line on stderr that names the file and the
//! problem, a non-zero exit, no panic, and leaves nothing half-written.

use distill_core::testing::{tiny_config, write_tiny_model_dir};
use std::path::Path;
mod common;
use common::{check_failure, distill};

/// Runs `distill generate` on `dir` and checks the failure shape; returns the message.
fn generate_fails(dir: &Path, expect: &[&str]) -> String {
    let (code, _, err) = distill(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]);
    check_failure(code, &err, expect)
}

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model_dir(&dir.path().join("m"), &tiny_config(), 1).unwrap();
    dir
}

#[test]
fn generate_works_on_a_tiny_model_dir() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let (code, out, err) = distill(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "the",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("the"), "{out}");
    assert!(err.contains("prompt tokens"), "{err}");
    // Same seed, same text.
    let (_, out2, _) = distill(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "the",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert_eq!(out, out2);
}

#[test]
fn missing_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    generate_fails(&missing, &["nope", "model dir does not exist"]);
}

#[test]
fn missing_config_json() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    std::fs::remove_file(m.join("config.json")).unwrap();
    generate_fails(&m, &["config.json", "No such file"]);
}

#[test]
fn invalid_config_json() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    std::fs::write(
        m.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"], ",
    )
    .unwrap();
    generate_fails(&m, &["config.json", "EOF"]);
    std::fs::write(
        m.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"]}",
    )
    .unwrap();
    generate_fails(&m, &["config.json", "missing field"]);
}

#[test]
fn unsupported_architecture() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let text = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        text.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    generate_fails(
        &m,
        &[
            "config.json",
            "unsupported architecture GPT2LMHeadModel",
            "LlamaForCausalLM",
        ],
    );
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let p = m.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    generate_fails(&m, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_with_wrong_shape() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(48);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    generate_fails(
        &m,
        &[
            "model.safetensors",
            "weights do not match config.json",
            "shape",
        ],
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    generate_fails(&m, &["tokenizer.json", "missing"]);
}

#[test]
fn gguf_that_is_not_a_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("model.gguf");
    std::fs::write(&fake, b"this is not a gguf file at all").unwrap();
    let out = dir.path().join("out");
    let (code, _, err) = distill(&[
        "convert",
        "--gguf",
        fake.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["model.gguf", "not a readable GGUF file"]);
    assert!(!out.exists(), "nothing is written for a failed conversion");
    let (code, _, err) = distill(&[
        "convert",
        "--gguf",
        dir.path().join("absent.gguf").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["absent.gguf", "No such file"]);
}

#[test]
fn cuda_device_without_the_feature() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let (code, _, err) = distill(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "cuda:0",
    ]);
    check_failure(code, &err, &["cuda:0", "--features cuda"]);
}

#[test]
fn empty_prompts_file() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "\n\n").unwrap();
    let (code, _, err) = distill(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["prompts.txt", "no prompts"]);
}

#[test]
fn prepare_reports_bad_inputs_and_runs_on_the_committed_sample() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let out = dir.path().join("tokens");
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"abc\xffdef").unwrap();
    let (code, _, err) = distill(&[
        "prepare",
        "--tokenizer",
        m.to_str().unwrap(),
        "--input",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["bad.txt", "invalid UTF-8 at byte offset 3"]);
    assert!(!out.exists());
    let jsonl = dir.path().join("x.jsonl");
    std::fs::write(&jsonl, "{\"text\": 1}\n").unwrap();
    let (code, _, err) = distill(&[
        "prepare",
        "--tokenizer",
        m.to_str().unwrap(),
        "--input",
        jsonl.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["x.jsonl:1", "not a string"]);
    // The committed sample prepares into train and valid shards.
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    let (code, _, err) = distill(&[
        "prepare",
        "--tokenizer",
        m.to_str().unwrap(),
        "--input",
        sample.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--seq-len",
        "32",
        "--valid-fraction",
        "0.5",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prepared"), "{err}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert!(
        meta["splits"]["train"]["sequences"].as_u64().unwrap() > 0,
        "{meta}"
    );
}

#[test]
fn cache_runs_resumes_and_refuses_bad_inputs() {
    use distill_core::testing::write_tiny_tokens;
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let tokens = dir.path().join("tokens");
    write_tiny_tokens(&tokens, 2, 16, 4, 1).unwrap();
    let out = dir.path().join("cache");
    let (m_s, t_s, o_s) = (
        m.to_str().unwrap(),
        tokens.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let base = ["cache", "--teacher", m_s, "--tokens", t_s, "--out", o_s];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| distill(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let (code, _, err) = run(with(&["--top-k", "4"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("bytes/token"), "{err}");
    let manifest = std::fs::read(out.join("manifest.json")).unwrap();
    // The same command again finds everything complete.
    let (code, _, err) = run(with(&["--top-k", "4"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 written now"), "{err}");

    // Other settings into the same dir: refused, nothing lost.
    let (code, _, err) = run(with(&["--top-k", "8"]));
    check_failure(
        code,
        &err,
        &["manifest.json", "other settings", "top-k 4 on disk vs 8"],
    );
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), manifest);

    // The teacher at another precision: refused the same way where the CPU runs bf16; where it
    // cannot, refused before anything is read or written.
    let (code, _, err) = run(with(&["--top-k", "4", "--teacher-precision", "bf16"]));
    if distill_core::ops::bf16::available() {
        check_failure(
            code,
            &err,
            &["manifest.json", "teacher precision f32 on disk vs bf16"],
        );
    } else {
        check_failure(code, &err, &["--teacher-precision bf16", "AMX-BF16"]);
    }
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), manifest);
    let (code, _, err) = run(with(&["--teacher-precision", "fp8"]));
    check_failure(code, &err, &["--teacher-precision", "fp8"]);

    // A bad --shard.
    let (code, _, err) = run(with(&["--shard", "2/2"]));
    check_failure(code, &err, &["--shard 2/2", "I/N"]);

    // Tokens made with another tokenizer than the teacher's.
    let meta_path = tokens.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["tokenizer_hash"] = serde_json::json!("f".repeat(64));
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let (code, _, err) = run(with(&[]));
    check_failure(code, &err, &["meta.json", "another tokenizer"]);
    std::fs::write(&meta_path, text).unwrap();

    // Not a tokens dir.
    let (code, _, err) = distill(&["cache", "--teacher", m_s, "--tokens", m_s, "--out", o_s]);
    check_failure(code, &err, &["not a token shards dir"]);

    // --merge on a dir that holds no parts.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = distill(&[
        "cache",
        "--merge",
        "--tokens",
        t_s,
        "--out",
        empty.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["empty", "not a teacher cache"]);
}

#[test]
fn eval_reports_and_refuses_bad_inputs() {
    use distill_core::testing::write_tiny_tokens;
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let tokens = dir.path().join("tokens");
    write_tiny_tokens(&tokens, 4, 16, 4, 1).unwrap();
    let out = dir.path().join("report");
    let (m_s, t_s, o_s) = (
        m.to_str().unwrap(),
        tokens.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let (code, stdout, err) = distill(&[
        "eval",
        "--teacher",
        m_s,
        "--student",
        m_s,
        "--tokens",
        t_s,
        "--out",
        o_s,
        "--no-speed",
        "--max-new-tokens",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("| model |") && stdout.contains("(teacher)"),
        "{stdout}"
    );
    assert!(out.join("report.json").exists() && out.join("perplexity_vs_params.png").exists());

    let missing = dir.path().join("missing");
    let (code, _, err) = distill(&[
        "eval",
        "--teacher",
        m_s,
        "--student",
        missing.to_str().unwrap(),
        "--tokens",
        t_s,
        "--no-speed",
    ]);
    check_failure(code, &err, &["missing", "model dir does not exist"]);
    let (code, _, err) = distill(&[
        "eval",
        "--teacher",
        m_s,
        "--student",
        m_s,
        "--tokens",
        m_s,
        "--no-speed",
    ]);
    check_failure(code, &err, &["not a token shards dir"]);
    let (code, _, err) = distill(&[
        "eval",
        "--teacher",
        m_s,
        "--student",
        m_s,
        "--tokens",
        t_s,
        "--prompts",
        "/nonexistent/p.txt",
    ]);
    check_failure(code, &err, &["/nonexistent/p.txt", "does not exist"]);
}

/// Overwrites 8 bytes in the middle of a file.
fn corrupt(path: &Path, bytes: &[u8; 8]) {
    let mut data = std::fs::read(path).unwrap();
    let at = data.len() / 2;
    data[at..at + 8].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn a_corrupted_token_shard_is_refused_by_train_cache_and_eval() {
    use distill_core::testing::write_tiny_tokens;
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let tokens = dir.path().join("tokens");
    write_tiny_tokens(&tokens, 8, 16, 4, 1).unwrap();
    let shard = tokens.join("train/shard-00001.bin");
    let pristine = std::fs::read(&shard).unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let (m_s, t_s) = (m.to_str().unwrap(), tokens.to_str().unwrap());
    let train_out = dir.path().join("run");
    let cache_out = dir.path().join("cache");
    let commands = |_: ()| -> Vec<Vec<String>> {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            own(&[
                "train",
                "--config",
                config.to_str().unwrap(),
                "--out",
                train_out.to_str().unwrap(),
                "--max-steps",
                "1",
                "--set",
                &format!("teacher.model=\"{m_s}\""),
                "--set",
                &format!("data.tokens=\"{t_s}\""),
            ]),
            own(&[
                "cache",
                "--teacher",
                m_s,
                "--tokens",
                t_s,
                "--out",
                cache_out.to_str().unwrap(),
            ]),
            own(&[
                "eval",
                "--teacher",
                m_s,
                "--student",
                m_s,
                "--tokens",
                t_s,
                "--split",
                "train",
                "--no-speed",
                "--max-new-tokens",
                "1",
            ]),
        ]
    };
    // Ids that are still in the vocabulary: only the recorded sha256 can tell.
    corrupt(&shard, &[7, 0, 0, 0, 9, 0, 0, 0]);
    for args in commands(()) {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = distill(&refs);
        check_failure(code, &err, &["shard-00001.bin", "does not match meta.json"]);
    }
    // An id past the vocabulary, with meta.json's hash updated to match: refused by name too.
    std::fs::write(&shard, &pristine).unwrap();
    corrupt(&shard, &[0xff, 0xff, 0, 0, 0, 0, 0, 0]);
    let meta_path = tokens.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let digest = { distill_core::digest::sha256_hex(std::fs::read(&shard).unwrap()) };
    meta["splits"]["train"]["shards"][1]["sha256"] = serde_json::json!(digest);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    for args in commands(()) {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = distill(&refs);
        check_failure(code, &err, &["shard-00001.bin", "outside the vocabulary"]);
    }
}

#[test]
fn sampling_options_out_of_range_are_refused() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    for (flag, value, expect) in [
        ("--top-p", "2", "top-p 2 is invalid"),
        ("--top-p", "0", "top-p 0 is invalid"),
        ("--temperature", "-1", "temperature -1 is invalid"),
        ("--temperature", "NaN", "temperature NaN is invalid"),
    ] {
        let (code, _, err) = distill(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the",
            &format!("{flag}={value}"),
        ]);
        check_failure(code, &err, &[expect]);
    }
}

#[test]
fn train_refuses_an_unknown_device() {
    let (code, _, err) = distill(&["train", "--config", "configs/tiny.toml", "--device", "tpu"]);
    check_failure(code, &err, &["tpu"]);
}

/// A product precision that does not exist, in a run's config and in the training bench: one
/// line naming it, before anything is loaded.
#[test]
fn train_refuses_an_unknown_precision() {
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/tiny.toml");
    let set = "train.precision=\"fp8\"";
    let (code, _, err) = distill(&["train", "--config", tiny, "--set", set]);
    check_failure(code, &err, &["fp8", "bf16"]);
    let (code, _, err) = distill(&["bench", "train", "--precision", "fp8", "--steps", "1"]);
    check_failure(code, &err, &["--precision", "fp8"]);
}

/// `distill export`: a GGUF file that distill's reader opens again; bad input is one line and
/// leaves no file behind.
#[test]
fn export_writes_a_gguf_that_converts_back_and_refuses_what_it_cannot_write() {
    let dir = tiny_dir();
    let m = dir.path().join("m");
    let gguf = dir.path().join("m.gguf");
    let (code, _, err) = distill(&[
        "export",
        "--model",
        m.to_str().unwrap(),
        "--gguf",
        gguf.to_str().unwrap(),
        "--dtype",
        "q8_0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("pre-tokenizer smollm"), "{err}");
    let back = dir.path().join("back");
    let (code, _, err) = distill(&[
        "convert",
        "--gguf",
        gguf.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(back.join("README.md").exists());

    let qwen = dir.path().join("qwen");
    let cfg = distill_core::Config {
        vocab_size: tiny_config().vocab_size,
        ..distill_core::Config::tiny_qwen2()
    };
    write_tiny_model_dir(&qwen, &cfg, 2).unwrap();
    let out = dir.path().join("q.gguf");
    let (code, _, err) = distill(&[
        "export",
        "--model",
        qwen.to_str().unwrap(),
        "--gguf",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["llama architecture", "Qwen2"]);
    assert!(!out.exists());
    let (code, _, err) = distill(&[
        "export",
        "--model",
        dir.path().join("absent").to_str().unwrap(),
        "--gguf",
        out.to_str().unwrap(),
    ]);
    check_failure(code, &err, &["absent"]);
}

/// The arena size knob: a value that is not a whole number of GiB is refused in one line before
/// anything runs; 0 (no arena) runs as usual.
#[test]
fn a_bad_arena_size_is_one_line_and_zero_turns_it_off() {
    for bad in ["lots", "-1", "1.5", "99999999999999999999"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(["bench", "gemm", "--help"])
            .env("DISTILL_ARENA_GIB", bad)
            .output()
            .expect("the distill binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        check_failure(
            out.status.code().unwrap_or(-1),
            &err,
            &["DISTILL_ARENA_GIB", bad, "whole number of GiB"],
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["--version"])
        .env("DISTILL_ARENA_GIB", "0")
        .output()
        .expect("the distill binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
