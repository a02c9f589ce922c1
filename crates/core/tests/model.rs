//! The model on tiny random weights: gradients reach every parameter, weights survive a save/load
//! round trip (single and sharded files), Qwen2 biases and untied embeddings are used, and the KV
//! cache path agrees with the full forward.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use distill_core::testing::{
    max_abs_diff, named_tensors, random_model, tiny_config, tiny_tokenizer, write_tiny_model_dir,
};
use distill_core::weights::{mmap_var_builder, save_sharded_safetensors};
use distill_core::{load_model, CausalLm, Config, KvCache};

fn ids(b: usize, t: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn every_var_gets_a_gradient(cfg: &Config) {
    let (model, varmap) = random_model(cfg, 1).unwrap();
    let x = ids(2, 9, cfg.vocab_size);
    let logits = model.forward(&x).unwrap(); // (B, T, V)
    assert_eq!(logits.dims(), &[2, 9, cfg.vocab_size]);
    // Next-token cross-entropy, as a training step would use.
    let lp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, 8).unwrap(), 2).unwrap();
    let target = x
        .narrow(1, 1, 8)
        .unwrap()
        .contiguous()
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let loss = lp
        .gather(&target, 2)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert!(!vars.is_empty());
    for (name, var) in vars.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn every_var_gets_a_gradient_llama_tied() {
    every_var_gets_a_gradient(&tiny_config());
}

#[test]
fn every_var_gets_a_gradient_qwen2_untied_with_biases() {
    let cfg = Config {
        vocab_size: tiny_config().vocab_size,
        ..Config::tiny_qwen2()
    };
    every_var_gets_a_gradient(&cfg);
}

fn tiny_gemma3() -> Config {
    Config {
        vocab_size: tiny_config().vocab_size,
        ..Config::tiny_gemma3()
    }
}

#[test]
fn every_var_gets_a_gradient_gemma3_norms_and_geglu() {
    every_var_gets_a_gradient(&tiny_gemma3());
}

#[test]
fn save_load_round_trip() {
    for cfg in [
        tiny_config(),
        Config {
            vocab_size: tiny_config().vocab_size,
            ..Config::tiny_qwen2()
        },
        tiny_gemma3(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = write_tiny_model_dir(dir.path(), &cfg, 3).unwrap();
        let (loaded, loaded_cfg) = load_model(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded_cfg, cfg);
        let x = ids(2, 7, cfg.vocab_size);
        // The VarMap model runs the differentiable ops, the loaded one candle's fused kernels:
        // equal up to f32 rounding.
        let d = max_abs_diff(&model.forward(&x).unwrap(), &loaded.forward(&x).unwrap());
        assert!(d < 1e-5, "logits differ after save/load: {d}");
        // The tokenizer written with it reads back the same.
        let tok = distill_core::Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.hash(), tiny_tokenizer().hash());
        assert_eq!(tok.stop_ids(), vec![2]);
    }
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let cfg = tiny_config();
    let (model, varmap) = random_model(&cfg, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_sharded_safetensors(&named_tensors(&varmap), DType::F32, dir.path(), 3).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    let files = distill_core::weights::safetensors_files(dir.path()).unwrap();
    assert_eq!(files.len(), 3);
    let (loaded, _) = load_model(dir.path(), &Device::Cpu).unwrap();
    let x = ids(1, 6, cfg.vocab_size);
    assert!(max_abs_diff(&model.forward(&x).unwrap(), &loaded.forward(&x).unwrap()) < 1e-5);
}

#[test]
fn bf16_weights_load_and_compute_in_f32() {
    let cfg = tiny_config();
    let (model, varmap) = random_model(&cfg, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    distill_core::save_model_dir(
        dir.path(),
        &cfg,
        &named_tensors(&varmap),
        &tiny_tokenizer(),
        DType::BF16,
        &distill_core::ModelCard::new("bf16"),
    )
    .unwrap();
    let (loaded, loaded_cfg) = load_model(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded_cfg.torch_dtype, "bfloat16");
    let x = ids(1, 6, cfg.vocab_size);
    let out = loaded.forward(&x).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let want = model.forward(&x).unwrap();
    let scale: f32 = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let d = max_abs_diff(&want, &out) / scale;
    assert!(
        d > 0.0 && d < 0.02,
        "bf16 rounding should be small but visible: {d}"
    );
}

/// Qwen2's q/k/v biases and the untied lm_head are really used: changing them changes the logits.
#[test]
fn qwen2_biases_and_untied_head_are_used() {
    let cfg = Config {
        vocab_size: tiny_config().vocab_size,
        ..Config::tiny_qwen2()
    };
    let (model, varmap) = random_model(&cfg, 6).unwrap();
    let x = ids(1, 5, cfg.vocab_size);
    let before = model.forward(&x).unwrap();
    let data = varmap.data().lock().unwrap();
    for name in ["model.layers.0.self_attn.k_proj.bias", "lm_head.weight"] {
        let var: &Var = data.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let old = var.as_tensor().copy().unwrap();
        var.set(&(var.as_tensor() + 0.5).unwrap()).unwrap();
        let after = model.forward(&x).unwrap();
        assert!(max_abs_diff(&before, &after) > 1e-4, "{name} has no effect");
        var.set(&old).unwrap();
    }
    assert!(!data.contains_key("model.layers.0.self_attn.o_proj.bias"));
}

/// Prefill + one-token steps with the KV cache give the full forward's logits; for Gemma 3 (window
/// 4) the steps run past the sliding layers' window.
#[test]
fn kv_cache_matches_full_forward() {
    for cfg in [tiny_config(), tiny_gemma3()] {
        kv_cache_matches_full_forward_for(&cfg);
    }
}

/// Gemma 3's sliding layers hide keys beyond the window and its full layers do not: through one
/// sliding layer (window 4) the last position's logits ignore a token 5 back; through one full
/// layer they don't. (Stacked windows reach further, so one layer.)
#[test]
fn gemma3_windows_per_layer() {
    let (a, b) = (
        [[5u32, 6, 7, 8, 9, 10]],
        [[11u32, 6, 7, 8, 9, 10]], // differs 5 positions before the last
    );
    for (sliding, sees_it) in [(true, false), (false, true)] {
        let mut cfg = tiny_gemma3();
        cfg.num_hidden_layers = 1;
        cfg.gemma3.as_mut().unwrap().sliding_layers = vec![sliding];
        let (model, _) = random_model(&cfg, 5).unwrap();
        let last = |x| {
            let x = Tensor::new(x, &Device::Cpu).unwrap();
            model.forward(&x).unwrap().get(0).unwrap().get(5).unwrap()
        };
        let d = max_abs_diff(&last(&a), &last(&b));
        assert_eq!(d > 1e-4, sees_it, "difference {d}");
    }
}

fn kv_cache_matches_full_forward_for(cfg: &Config) {
    let cfg = cfg.clone();
    let (model, _) = random_model(&cfg, 7).unwrap();
    let x = ids(1, 10, cfg.vocab_size);
    let full = model.forward(&x).unwrap(); // (1, 10, V)
    let mut cache = KvCache::new(&cfg);
    let first = model
        .forward_cached(&x.narrow(1, 0, 6).unwrap(), &mut cache)
        .unwrap();
    assert!(
        max_abs_diff(
            &first,
            &full.get(0).unwrap().get(5).unwrap().unsqueeze(0).unwrap()
        ) < 1e-5
    );
    for t in 6..10 {
        let step = model
            .forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        let want = full.get(0).unwrap().get(t).unwrap().unsqueeze(0).unwrap();
        assert!(max_abs_diff(&step, &want) < 1e-5, "position {t}");
    }
    assert_eq!(cache.len(), 10);
}

/// A sliding window hides keys beyond it: with window 1 every position only sees itself, so the
/// output at a position does not depend on earlier tokens.
#[test]
fn sliding_window_limits_attention() {
    let cfg = Config {
        sliding_window: Some(1),
        arch: distill_core::Arch::Mistral,
        ..tiny_config()
    };
    let device = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let model =
        CausalLm::load(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg).unwrap();
    let a = Tensor::new(&[[5u32, 6, 7]], &device).unwrap();
    let b = Tensor::new(&[[9u32, 6, 7]], &device).unwrap();
    let la = model.forward(&a).unwrap().get(0).unwrap().get(2).unwrap();
    let lb = model.forward(&b).unwrap().get(0).unwrap().get(2).unwrap();
    assert!(max_abs_diff(&la, &lb) < 1e-6);
}

#[test]
fn mmap_builder_names_truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    write_tiny_model_dir(dir.path(), &cfg, 8).unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = mmap_var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

/// bf16 products (AMX) for a frozen model, Llama, Qwen2 (biases, untied head) and Gemma 3: the
/// full forward and the KV-cache steps stay within bf16 rounding of f32, `F32` restores f32
/// exactly, and a trained model refuses bf16.
#[test]
fn bf16_products_track_f32_and_refuse_trained_weights() {
    let qwen2 = Config {
        vocab_size: tiny_config().vocab_size,
        ..Config::tiny_qwen2()
    };
    let (trained, _) = random_model(&tiny_config(), 1).unwrap();
    let err = trained
        .clone()
        .set_precision(distill_core::Precision::Bf16)
        .unwrap_err()
        .to_string();
    if !distill_core::ops::bf16::available() {
        assert!(err.contains("need AMX-BF16"), "{err}");
        return;
    }
    assert!(err.contains("frozen weights"), "{err}");
    for cfg in [tiny_config(), qwen2, tiny_gemma3()] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model_dir(dir.path(), &cfg, 5).unwrap();
        let (f32_model, _) = load_model(dir.path(), &Device::Cpu).unwrap();
        let mut model = f32_model.clone();
        model.set_precision(distill_core::Precision::Bf16).unwrap();
        assert_eq!(model.precision(), distill_core::Precision::Bf16);
        let x = ids(2, 9, cfg.vocab_size);
        let want = f32_model.forward(&x).unwrap();
        let got = model.forward(&x).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_abs_diff(&want, &got);
        assert!(
            d > 0.0 && d < 0.02 * scale,
            "bf16 forward off by {d} (scale {scale})"
        );
        // Decoding one token at a time takes the same products.
        let mut cache = KvCache::new(model.config());
        let mut last = None;
        for t in 0..9 {
            last = Some(
                model
                    .forward_cached(
                        &x.narrow(1, t, 1).unwrap().narrow(0, 0, 1).unwrap(),
                        &mut cache,
                    )
                    .unwrap(),
            );
        }
        let step = last.unwrap().flatten_all().unwrap();
        let full = got.get(0).unwrap().get(8).unwrap();
        assert!(max_abs_diff(&step, &full) < 0.02 * scale);
        model.set_precision(distill_core::Precision::F32).unwrap();
        assert_eq!(max_abs_diff(&want, &model.forward(&x).unwrap()), 0.0);
    }
}
