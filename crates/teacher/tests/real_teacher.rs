//! Tests on the real SmolLM2-135M-Instruct teacher (fetched by scripts/fetch-teacher.sh).

mod common;

use candle_core::{Device, Tensor, D};
use distill_core::gguf::Gguf;
use distill_core::ModelDir;
use distill_core::{ChatMessage, Tokenizer};
use distill_teacher::generate::{generate, SamplingParams};

#[test]
fn chat_answer_to_capital_of_france_contains_paris() {
    let Some(dir) = common::teacher_dir() else {
        return;
    };
    let t = ModelDir::load(&dir, &Device::Cpu).unwrap();
    let prompt = t
        .tokenizer
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let ids = t.tokenizer.encode(&prompt, true).unwrap();
    let params = SamplingParams {
        max_new_tokens: 32,
        ..Default::default()
    };
    let out = generate(&t.model, &ids, &t.tokenizer.stop_ids(), &params, |_| Ok(())).unwrap();
    let answer = t.tokenizer.decode(&out.tokens, true).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

/// Perplexity of the teacher on a paragraph written for this project (data/sample/paragraph.txt).
#[test]
fn perplexity_on_committed_paragraph_is_below_40() {
    let Some(dir) = common::teacher_dir() else {
        return;
    };
    let t = ModelDir::load(&dir, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(common::workspace_root().join("data/sample/paragraph.txt"))
        .unwrap();
    let ids = t.tokenizer.encode(text.trim(), false).unwrap();
    let n = ids.len();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = t.model.forward(&x).unwrap().squeeze(0).unwrap(); // (T, V)
    let lp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n - 1).unwrap(), D::Minus1).unwrap();
    let next = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let nll: f32 = lp
        .gather(&next, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap()
        .to_scalar()
        .unwrap();
    let ppl = nll.exp();
    eprintln!(
        "teacher perplexity on the paragraph: {ppl:.3} over {} tokens",
        n - 1
    );
    assert!(ppl.is_finite() && ppl < 40.0, "perplexity {ppl}");
}

#[test]
fn tokenizer_round_trips_and_adds_no_prefix_space() {
    let Some(dir) = common::teacher_dir() else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for text in [
        "Hello, world!",
        "digits 0123456789 and 3.14159",
        "Unicode: naïve café, Ελληνικά, 日本語, Ærøskøbing",
        "emoji: 🦀🚀👩‍👩‍👧",
        "lines\nand\ttabs\r\n  indented\n\n",
        "<|im_start|>user\nHi<|im_end|>\n",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    // Special tokens are single ids.
    let ids = tok.encode("<|im_start|>user<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    // Digits are split one by one.
    assert_eq!(tok.encode("2024", false).unwrap().len(), 4);
    // No prefix space: the first token of "The capital…" is "The", not "ĠThe".
    let ids = tok.encode("The capital of France is", false).unwrap();
    let first = tok.id_to_token(ids[0]).unwrap();
    assert_eq!(first, "The");
    assert_eq!(tok.decode(&ids, false).unwrap(), "The capital of France is");
    assert_eq!(tok.stop_ids(), vec![2]);
}

/// The tokenizer built from GGUF metadata gives the same ids as the converted dir's.
#[test]
fn gguf_tokenizer_equals_converted_tokenizer() {
    let (Some(dir), Some(gguf)) = (common::teacher_dir(), common::teacher_gguf()) else {
        return;
    };
    let a = Tokenizer::from_dir(&dir).unwrap();
    let b = Gguf::open(&gguf).unwrap().tokenizer().unwrap();
    let text = std::fs::read_to_string(common::workspace_root().join("data/sample/paragraph.txt"))
        .unwrap();
    assert_eq!(
        a.encode(&text, false).unwrap(),
        b.encode(&text, false).unwrap()
    );
    assert_eq!(a.hash(), b.hash());
    assert_eq!(a.chat_template, b.chat_template);
}

/// The cache on the real teacher: a slice of the committed sample, tokenized with the teacher's
/// tokenizer; the cached top-1 is the forward's argmax, the logsumexp and log-probs match the
/// full log-softmax, and a 64-token cache costs ≤ 400 bytes per token at k = 64.
#[test]
fn cache_on_the_real_teacher_matches_its_forward() {
    use distill_core::cache::{CacheExpect, TeacherCache, TeacherTargets};
    use distill_core::prepare::{prepare, PrepareOptions};
    let Some(dir) = common::teacher_dir() else {
        return;
    };
    let teacher = ModelDir::load(&dir, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    let sample = common::workspace_root().join("data/sample/paragraph.txt");
    let opts = PrepareOptions {
        seq_len: 64,
        ..Default::default()
    };
    let meta = prepare(&teacher.tokenizer, &[sample], &tokens, &opts, |_| {}).unwrap();
    let hash = distill_core::weights::model_hash(&dir).unwrap();
    let out = tmp.path().join("cache");
    let copts = distill_teacher::cache::CacheOptions {
        max_sequences: Some(1),
        splits: vec!["train".into()],
        ..Default::default()
    };
    let s = distill_teacher::cache::build_cache(&teacher, &hash, &tokens, &out, &copts, |_, _| {})
        .unwrap();
    assert!(s.bytes_per_token <= 400.0, "{}", s.bytes_per_token);
    let expect = CacheExpect {
        teacher_hash: Some(hash),
        ..Default::default()
    };
    let cache = TeacherCache::open(&out, &meta, &expect).unwrap();
    let TeacherTargets::Sparse {
        ids,
        logprobs,
        logsumexp,
    } = cache.targets("train", &[0], &Device::Cpu).unwrap()
    else {
        panic!("sparse targets expected");
    };
    let seq = distill_core::shards::TokenShards::open(&tokens, "train")
        .unwrap()
        .sequence(0);
    let input = candle_core::Tensor::new(seq.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = teacher.model.forward(&input).unwrap();
    let argmax: Vec<u32> = logits
        .argmax(2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ids: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let top1: Vec<u32> = ids.chunks(64).map(|c| c[0]).collect();
    assert_eq!(top1, argmax);
    let logp = distill_core::model::log_softmax(&logits).unwrap();
    let lps: Vec<f32> = logprobs.flatten_all().unwrap().to_vec1().unwrap();
    let full: Vec<f32> = logp.flatten_all().unwrap().to_vec1().unwrap();
    for (pos, chunk) in ids.chunks(64).enumerate() {
        for (j, &id) in chunk.iter().enumerate() {
            let exact = full[pos * 49152 + id as usize];
            assert!(
                (lps[pos * 64 + j] - exact).abs() <= 2e-3 * exact.abs().max(1.0),
                "{pos}/{j}"
            );
        }
    }
    let lse: Vec<f32> = logsumexp.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(lse.len(), 64);
    assert!(lse.iter().all(|x| x.is_finite()));
}
