//! Fixtures for tests across the workspace: a tiny byte-level tokenizer and tiny random model dirs,
//! built in memory so that tests need no download.

use crate::config::Config;
use crate::error::Result;
use crate::model::CausalLm;
use crate::tokenizer::{byte_level_bpe_json, SpecialTokens, Tokenizer};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

pub use crate::tokenizer::byte_chars;

/// A byte-level BPE with three special tokens (ids 0–2: `<|endoftext|>`, `<|im_start|>`,
/// `<|im_end|>`), the 256 byte tokens, and a few merges: 259 + merges tokens, ChatML template.
pub fn tiny_tokenizer() -> Tokenizer {
    let mut vocab: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let chars = byte_chars();
    vocab.extend(chars.iter().map(|c| c.to_string()));
    let g = chars[b' ' as usize];
    let merges: Vec<String> = vec![format!("{g} t"), "h e".into(), format!("{g}t he")];
    vocab.extend([format!("{g}t"), "he".into(), format!("{g}the")]);
    let json = byte_level_bpe_json(&vocab, &merges, &[0, 1, 2]);
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    Tokenizer::from_json(
        &json,
        Path::new("<tiny tokenizer>"),
        SpecialTokens {
            bos: Some("<|im_start|>".into()),
            eos: Some("<|im_end|>".into()),
            pad: Some("<|im_end|>".into()),
            unk: Some("<|endoftext|>".into()),
            chat_template: Some(template.into()),
            add_bos: false,
        },
    )
    .expect("the tiny tokenizer JSON is valid")
}

/// `Config::tiny()` sized to the tiny tokenizer's vocabulary.
pub fn tiny_config() -> Config {
    Config {
        vocab_size: tiny_tokenizer().vocab_size(),
        ..Config::tiny()
    }
}

/// A random model of `cfg` on a VarMap (seeded), with its named tensors.
pub fn random_model(cfg: &Config, seed: u64) -> Result<(CausalLm, VarMap)> {
    let device = Device::Cpu;
    let (model, varmap) = CausalLm::init_seeded(cfg, seed, &device)?;
    // Norm weights start at 1 and biases at 0, and 0.02-scale weights make nearly uniform
    // outputs; scale and perturb so that tests see every parameter's effect.
    // Seeded (candle's CPU RNG cannot be), so every test run sees the same model.
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .clone()
        .into_iter()
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        let t = var.as_tensor();
        let new = if name.ends_with("norm.weight") || name.ends_with(".bias") {
            let noise: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect();
            (t + Tensor::from_vec(noise, t.shape(), &device)?)?
        } else {
            (t * 10.0)?
        };
        var.set(&new)?;
    }
    Ok((model, varmap))
}

/// The VarMap's tensors by name.
pub fn named_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    crate::weights::varmap_tensors(varmap)
}

/// Writes a complete random model dir (config, weights, tiny tokenizer) and returns the model.
pub fn write_tiny_model_dir(dir: &Path, cfg: &Config, seed: u64) -> Result<CausalLm> {
    let (model, varmap) = random_model(cfg, seed)?;
    crate::save_model_dir(
        dir,
        cfg,
        &named_tensors(&varmap),
        &tiny_tokenizer(),
        DType::F32,
        &crate::ModelCard::new("A random test model"),
    )?;
    Ok(model)
}

/// The values of tensor `name` in a model dir's `model.safetensors`, flattened (f32).
pub fn saved_tensor(dir: &Path, name: &str) -> Vec<f32> {
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("a readable model.safetensors");
    t[name]
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("an f32 tensor")
}

/// max |a − b| over all elements (f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("tensors of the same shape and dtype f32")
}

/// Seeded synthetic text with structure a small model can learn (a few sentence templates over a
/// small lexicon): `docs` documents of about `words` words each.
pub fn synthetic_corpus(docs: usize, words: usize, seed: u64) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    const SUBJ: [&str; 6] = [
        "the cat",
        "a dog",
        "the old man",
        "my friend",
        "the bird",
        "a child",
    ];
    const VERB: [&str; 6] = [
        "sat on",
        "looked at",
        "ran past",
        "slept near",
        "sang to",
        "found",
    ];
    const OBJ: [&str; 6] = [
        "the mat",
        "a tree",
        "the river",
        "the house",
        "a red ball",
        "the moon",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..docs)
        .map(|_| {
            let mut doc = String::new();
            while doc.split_whitespace().count() < words {
                let s = SUBJ[rng.random_range(0..SUBJ.len())];
                let v = VERB[rng.random_range(0..VERB.len())];
                let o = OBJ[rng.random_range(0..OBJ.len())];
                doc.push_str(&format!("{s} {v} {o}. "));
            }
            doc.trim_end().to_string()
        })
        .collect()
}

/// Token shards of [`synthetic_corpus`] made with [`tiny_tokenizer`]: `train/` gets `docs`
/// documents, `valid/` a quarter as many (other seed), written to `out` with small shards.
pub fn write_tiny_tokens(
    out: &Path,
    docs: usize,
    seq_len: usize,
    shard_sequences: usize,
    seed: u64,
) -> Result<crate::shards::TokenShardsMeta> {
    let src = out.with_extension("src");
    for (split, n, s) in [
        ("train", docs, seed),
        ("valid", docs.div_ceil(4), seed ^ 0xabc),
    ] {
        let dir = src.join(split);
        std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
        let lines: Vec<String> = synthetic_corpus(n, 40, s)
            .into_iter()
            .map(|d| serde_json::json!({ "text": d }).to_string())
            .collect();
        let path = dir.join("docs.jsonl");
        std::fs::write(&path, lines.join("\n")).map_err(|e| crate::Error::io(&path, e))?;
    }
    let opts = crate::prepare::PrepareOptions {
        seq_len,
        shard_sequences,
        ..Default::default()
    };
    crate::prepare::prepare(&tiny_tokenizer(), &[src], out, &opts, |_| {})
}
