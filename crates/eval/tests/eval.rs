//! `distill eval` on tiny models: known answers (a model against itself), bits per byte on a
//! fixture, the report files, checkpoint plots, and bad inputs.

use candle_core::Device;
use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use distill_eval::{evaluate, report, EvalOptions};
use std::path::{Path, PathBuf};

fn opts() -> EvalOptions {
    EvalOptions {
        max_tokens: 0,
        batch_size: 3,
        prompts: vec!["the cat".into()],
        max_new_tokens: 4,
        speed: false,
        own_text: distill_eval::OwnTextOptions {
            sequences: 4,
            prompt_tokens: 4,
            new_tokens: 6,
        },
        ..Default::default()
    }
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    write_tiny_model_dir(&teacher, &tiny_config(), 21).unwrap();
    let tokens = dir.path().join("tokens");
    write_tiny_tokens(&tokens, 8, 24, 4, 2).unwrap();
    (dir, teacher, tokens)
}

#[test]
fn a_model_against_itself_has_zero_kl_and_full_agreement() {
    let (_d, teacher, tokens) = setup();
    let r = evaluate(
        &teacher,
        std::slice::from_ref(&teacher),
        &tokens,
        &opts(),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(r.models.len(), 2);
    let (t, s) = (&r.models[0], &r.models[1]);
    assert!(t.is_teacher && !s.is_teacher);
    assert!(
        s.kl_to_teacher.unwrap().abs() < 1e-6,
        "{:?}",
        s.kl_to_teacher
    );
    assert_eq!(s.top1_agreement, Some(1.0));
    assert_eq!(s.top5_agreement, Some(1.0));
    // Exposure bias: on its own continuations too, a copy of the teacher is the teacher.
    assert!(
        s.kl_on_own_text.unwrap().abs() < 1e-6,
        "{:?}",
        s.kl_on_own_text
    );
    assert_eq!(t.kl_on_own_text, None);
    assert!((s.perplexity - t.perplexity).abs() < 1e-9);
    assert_eq!(s.ece, t.ece);
    assert!(t.perplexity > 1.0 && t.ece >= 0.0 && t.ece <= 1.0);
    assert_eq!(r.generations.len(), 1);
    assert_eq!(
        r.generations[0].completions[0].1,
        r.generations[0].completions[1].1
    );
}

#[test]
fn bits_per_byte_counts_the_text_of_the_predicted_tokens() {
    let (_d, teacher, tokens) = setup();
    let r = evaluate(&teacher, &[], &tokens, &opts(), &Device::Cpu, |_, _| {}).unwrap();
    // The fixture text is ASCII and the tiny tokenizer byte-level, so each predicted token's
    // bytes can be counted one by one (EOS, a special token, has none).
    let tok = distill_core::testing::tiny_tokenizer();
    let shards = distill_core::shards::TokenShards::open(&tokens, "valid").unwrap();
    let (mut n, mut bytes) = (0u64, 0u64);
    for i in 0..shards.len() {
        let seq = shards.sequence(i);
        n += (seq.len() - 1) as u64;
        for &t in &seq[1..] {
            bytes += tok.decode(&[t], true).unwrap().len() as u64;
        }
    }
    assert!(bytes > n / 2);
    assert_eq!(r.tokens, n);
    assert_eq!(r.bytes, bytes);
    let m = &r.models[0];
    let want = m.cross_entropy * n as f64 / std::f64::consts::LN_2 / bytes as f64;
    assert!(
        (m.bits_per_byte - want).abs() < 1e-9,
        "{} vs {want}",
        m.bits_per_byte
    );
}

#[test]
fn report_files_exist_and_parse_and_checkpoints_are_plotted() {
    let (d, teacher, tokens) = setup();
    // A fake run: two checkpoints (copies of a random student) and its metrics.jsonl.
    let run = d.path().join("runs/demo");
    let student = d.path().join("student");
    write_tiny_model_dir(
        &student,
        &distill_core::Config {
            num_hidden_layers: 1,
            ..tiny_config()
        },
        5,
    )
    .unwrap();
    for step in ["step-10", "step-20"] {
        let dst = run.join(step);
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(&student).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    // The run's metrics, written by their owner as the trainer writes them.
    use distill_core::run_dir::{EvalMetrics, Record, RunDir, StepMetrics};
    let mut w = RunDir::new(&run).record_writer().unwrap();
    for s in 1..=20u64 {
        let loss = 5.0 - s as f32 * 0.1;
        w.write(&Record::Train(StepMetrics {
            step: s,
            tokens: s * 64,
            loss,
            kd: loss,
            ce: loss,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_second: 100.0,
            elapsed: s as f64,
            hidden: None,
            on_policy_kd: None,
            seconds: None,
        }))
        .unwrap();
    }
    for (step, ce, kl) in [(10, 4.2, 1.5), (20, 3.9, 1.2)] {
        w.write(&Record::Eval(EvalMetrics {
            step,
            tokens: step * 64,
            ce,
            perplexity: f64::exp(ce),
            kl_to_teacher: kl,
            eval_tokens: 64,
        }))
        .unwrap();
    }
    drop(w);

    let students = vec![run.join("step-10"), run.join("step-20")];
    let r = evaluate(
        &teacher,
        &students,
        &tokens,
        &opts(),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(r.models[1].name, "demo/step-10");
    assert_eq!(r.models[2].step, Some(20));
    let out = d.path().join("report");
    let files = report::write_report(&r, &out).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), 3);
    for key in [
        "name",
        "path",
        "perplexity",
        "bits_per_byte",
        "kl_to_teacher",
        "top1_agreement",
        "top5_agreement",
        "ece",
        "params",
        "non_embedding_params",
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
    ] {
        assert!(models[1].get(key).is_some(), "report.json lacks {key}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("(teacher)")
            && md.contains("demo/step-20")
            && md.contains("Greedy generations")
    );
    for name in [
        "perplexity_vs_params.png",
        "training_demo.png",
        "checkpoints_demo.png",
        "checkpoints_kl_demo.png",
    ] {
        let p = out.join(name);
        assert!(files.contains(&p), "{name} not written");
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}");
        assert!(bytes.len() > 5000, "{name} looks empty");
    }
}

fn err(teacher: &Path, students: &[PathBuf], tokens: &Path) -> String {
    evaluate(teacher, students, tokens, &opts(), &Device::Cpu, |_, _| {})
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn bad_inputs_are_handled_as_specified() {
    let (d, teacher, tokens) = setup();
    // A student with another tokenizer: perplexity, but no teacher-relative metrics, and a note.
    let other = d.path().join("other-tok");
    write_tiny_model_dir(&other, &tiny_config(), 8).unwrap();
    let tj = other.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    v["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&tj, v.to_string()).unwrap();
    let r = evaluate(
        &teacher,
        std::slice::from_ref(&other),
        &tokens,
        &opts(),
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    let m = &r.models[1];
    assert!(m.perplexity.is_finite() && m.perplexity > 1.0 && m.tokens > 0);
    assert!(m.kl_to_teacher.is_none() && m.top1_agreement.is_none());
    assert!(m.note.as_deref().unwrap().contains("another tokenizer"));

    // A missing model.
    let e = err(&teacher, &[d.path().join("nope")], &tokens);
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
    // An empty token dir.
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err(&teacher, &[], &empty);
    assert!(e.contains("not a token shards dir"), "{e}");
    // A split with no sequences.
    let mut o = opts();
    o.split = "test".into();
    let e = evaluate(&teacher, &[], &tokens, &o, &Device::Cpu, |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no split 'test'"), "{e}");
}

#[test]
fn masked_splits_are_scored_on_their_targets_only() {
    use distill_core::shards::{SplitWriter, TokenShardsMeta, FORMAT_VERSION};
    let (d, teacher, _) = setup();
    let tok = distill_core::Tokenizer::from_dir(&teacher).unwrap();
    let dir = d.path().join("masked");
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = SplitWriter::new(&dir, "valid", 8, 4);
    let masks: [[u8; 8]; 3] = [
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0, 1],
    ];
    for (i, m) in masks.iter().enumerate() {
        let ids: Vec<u32> = (0..8).map(|j| 10 + ((i * 8 + j) % 50) as u32).collect();
        w.push_sequence(&ids, m, 8).unwrap();
    }
    TokenShardsMeta {
        format_version: FORMAT_VERSION,
        tokenizer_hash: tok.hash(),
        seq_len: 8,
        eos_id: 0,
        vocab_size: tok.vocab_size(),
        splits: [("valid".to_string(), w.finish().unwrap())].into(),
        sources: vec![],
    }
    .write(&dir)
    .unwrap();
    let r = evaluate(&teacher, &[], &dir, &opts(), &Device::Cpu, |_, _| {}).unwrap();
    // Targets are the masked-in tokens after position 0: 3 + 7 + 1.
    assert_eq!(r.tokens, 11);
    assert_eq!(r.models[0].tokens, 11);
    // Students with another tokenizer cannot be scored on a masked split.
    let other = d.path().join("other");
    write_tiny_model_dir(&other, &tiny_config(), 3).unwrap();
    let tj = other.join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    v["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&tj, v.to_string()).unwrap();
    let e = evaluate(&teacher, &[other], &dir, &opts(), &Device::Cpu, |_, _| {})
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("another tokenizer") && e.contains("other"),
        "{e}"
    );
}

#[test]
fn the_kl_on_a_students_own_text_is_positive_for_another_model_and_can_be_switched_off() {
    let (d, teacher, tokens) = setup();
    let other = d.path().join("other");
    write_tiny_model_dir(&other, &tiny_config(), 22).unwrap();
    let mut o = opts();
    let r = evaluate(
        &teacher,
        std::slice::from_ref(&other),
        &tokens,
        &o,
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    let kl = r.models[1].kl_on_own_text.unwrap();
    assert!(kl > 1e-3 && kl.is_finite(), "{kl}");
    assert!(report::markdown(&r).contains("KL own text"));
    // Seeded: the same students sample the same text.
    let again = evaluate(
        &teacher,
        std::slice::from_ref(&other),
        &tokens,
        &o,
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(again.models[1].kl_on_own_text, Some(kl));
    o.own_text.sequences = 0;
    let off = evaluate(
        &teacher,
        std::slice::from_ref(&other),
        &tokens,
        &o,
        &Device::Cpu,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(off.models[1].kl_on_own_text, None);
}
