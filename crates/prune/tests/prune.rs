//! Pruning on tiny random models: the identity cut changes nothing, cutting components a test
//! made inert changes nothing, GQA groups stay whole, the written dir round-trips, and the
//! measured search writes a loadable dir with its report.

use candle_core::{Device, Tensor};
use distill_core::testing::{
    max_abs_diff, named_tensors, random_model, tiny_config, write_tiny_model_dir, write_tiny_tokens,
};
use distill_core::{CausalLm, Config};
use distill_prune::importance::{calibration_batches, measure};
use distill_prune::search::{plan_for, proposals, top_k, LayerRanking, Target};
use distill_prune::{
    model_from_tensors, prune, Plan, PruneOptions, PruneReport, Shape, TargetSpec,
};
use std::collections::HashMap;

fn ids(cfg: &Config) -> Tensor {
    let v: Vec<u32> = (0..2 * 24)
        .map(|i| (i * 7 + 3) as u32 % cfg.vocab_size as u32)
        .collect();
    Tensor::from_vec(v, (2, 24), &Device::Cpu).unwrap()
}

/// A 4-layer, 4-head / 2-KV-head tiny model with its tensors.
fn source() -> (Config, CausalLm, HashMap<String, Tensor>) {
    source_of(tiny_config())
}

/// `base` with 4 layers (Gemma 3: sliding, full, sliding, full), random weights.
fn source_of(base: Config) -> (Config, CausalLm, HashMap<String, Tensor>) {
    let mut cfg = Config {
        num_hidden_layers: 4,
        vocab_size: tiny_config().vocab_size,
        ..base
    };
    if let Some(g) = cfg.gemma3.as_mut() {
        g.sliding_layers = vec![true, false, true, false];
    }
    let (model, varmap) = random_model(&cfg, 3).unwrap();
    (cfg.clone(), model, named_tensors(&varmap))
}

fn logits_of(cfg: &Config, tensors: HashMap<String, Tensor>) -> Tensor {
    model_from_tensors(cfg, tensors, &Device::Cpu)
        .unwrap()
        .forward(&ids(cfg))
        .unwrap()
}

/// Zeroes the given columns (dim 1) of a 2-D tensor.
fn zero_cols(t: &Tensor, cols: &[usize]) -> Tensor {
    let (r, c) = t.dims2().unwrap();
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..r {
        for &j in cols {
            v[i * c + j] = 0.0;
        }
    }
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

fn zero_rows(t: &Tensor, rows: &[usize]) -> Tensor {
    zero_cols(&t.t().unwrap().contiguous().unwrap(), rows)
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
}

#[test]
fn pruning_nothing_gives_identical_logits() {
    for base in [tiny_config(), Config::tiny_gemma3()] {
        pruning_nothing_gives_identical_logits_for(base);
    }
}

fn pruning_nothing_gives_identical_logits_for(base: Config) {
    let (cfg, model, tensors) = source_of(base);
    let plan = Plan::identity(&cfg);
    let cut = plan.apply(&cfg, &tensors).unwrap();
    assert_eq!(plan.config(&cfg), cfg);
    let d = max_abs_diff(&model.forward(&ids(&cfg)).unwrap(), &logits_of(&cfg, cut));
    assert_eq!(d, 0.0, "identity cut changed the logits by {d}");
}

#[test]
fn removing_inert_heads_and_mlp_channels_gives_identical_logits() {
    // Gemma 3 too: its norm after the attention and after the MLP see the same sums without them.
    for base in [tiny_config(), Config::tiny_gemma3()] {
        removing_inert_heads_and_mlp_channels_gives_identical_logits_for(base);
    }
}

/// A Gemma 3 cut keeps each kept layer's attention type (sliding or full) and its hidden width
/// (its embeddings are scaled by √hidden): dropping layers 1 and 2 of (sliding, full, sliding,
/// full) leaves (sliding, full), and a narrower hidden size is refused by name.
#[test]
fn gemma3_cut_keeps_layer_types_and_hidden_width() {
    let (cfg, _, tensors) = source_of(Config::tiny_gemma3());
    let mut plan = Plan::identity(&cfg);
    for list in [&mut plan.kv_heads, &mut plan.heads, &mut plan.mlp] {
        list.truncate(2);
    }
    plan.layers = vec![0, 3];
    let pcfg = plan.config(&cfg);
    assert_eq!(
        pcfg.gemma3.as_ref().unwrap().sliding_layers,
        vec![true, false]
    );
    let cut = plan.apply(&cfg, &tensors).unwrap();
    assert!(cut.contains_key("model.layers.1.post_feedforward_layernorm.weight"));
    assert!(cut.contains_key("model.layers.1.self_attn.q_norm.weight"));
    let logits = logits_of(&pcfg, cut);
    assert_eq!(logits.dims(), &[2, 24, cfg.vocab_size]);
    let narrow = Shape {
        hidden: cfg.hidden_size - 8,
        ..Shape::of(&cfg)
    };
    let err = narrow.check(&cfg).unwrap_err().to_string();
    assert!(err.contains("Gemma 3"), "{err}");
}

fn removing_inert_heads_and_mlp_channels_gives_identical_logits_for(base: Config) {
    let (cfg, _, mut tensors) = source_of(base);
    let d = cfg.head_dim;
    // Query heads 1 and 3 (one in each KV group of two) write nothing: their o_proj columns are
    // zero. MLP channels 5 and 40 write nothing: their down_proj columns are zero.
    let dead_heads = [1usize, 3];
    let dead_cols: Vec<usize> = dead_heads
        .iter()
        .flat_map(|&h| h * d..(h + 1) * d)
        .collect();
    let dead_mlp = [5usize, 40];
    for l in 0..cfg.num_hidden_layers {
        let o = format!("model.layers.{l}.self_attn.o_proj.weight");
        tensors.insert(o.clone(), zero_cols(&tensors[&o], &dead_cols));
        let down = format!("model.layers.{l}.mlp.down_proj.weight");
        tensors.insert(down.clone(), zero_cols(&tensors[&down], &dead_mlp));
    }
    let full = logits_of(&cfg, tensors.clone());

    // The importance the probe measures sees exactly these as worthless...
    let model = model_from_tensors(&cfg, tensors.clone(), &Device::Cpu).unwrap();
    let (imp, _) = measure(&model, &[ids(&cfg)], 1, &mut |_| {}).unwrap();
    for l in 0..cfg.num_hidden_layers {
        for &h in &dead_heads {
            assert_eq!(imp.heads[l][h], 0.0, "layer {l} head {h}");
        }
        for &c in &dead_mlp {
            assert_eq!(imp.mlp[l][c], 0.0, "layer {l} channel {c}");
        }
    }
    // ...so the importance-driven plan drops them, and the logits do not move.
    let shape = Shape {
        heads: 2,
        intermediate: cfg.intermediate_size - 2,
        ..Shape::of(&cfg)
    };
    let plan = plan_for(&cfg, shape, LayerRanking::DropOneKl, &imp).unwrap();
    for l in 0..cfg.num_hidden_layers {
        assert_eq!(plan.heads[l], vec![0, 2]);
        assert!(!plan.mlp[l].contains(&5) && !plan.mlp[l].contains(&40));
    }
    let pcfg = plan.config(&cfg);
    assert_eq!((pcfg.num_attention_heads, pcfg.num_key_value_heads), (2, 2));
    let cut = logits_of(&pcfg, plan.apply(&cfg, &tensors).unwrap());
    let diff = max_abs_diff(&full, &cut);
    assert!(
        diff < 1e-4,
        "inert heads/channels removed, logits moved by {diff}"
    );
}

#[test]
fn removing_an_inert_hidden_channel_gives_identical_logits() {
    let (cfg, _, mut tensors) = source();
    // Hidden channel 7 is never written (embedding column, o_proj and down_proj rows zero), so it
    // is zero everywhere in the residual stream.
    let dead = [7usize];
    let emb = "model.embed_tokens.weight".to_string();
    tensors.insert(emb.clone(), zero_cols(&tensors[&emb], &dead));
    for l in 0..cfg.num_hidden_layers {
        for part in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
            let n = format!("model.layers.{l}.{part}");
            tensors.insert(n.clone(), zero_rows(&tensors[&n], &dead));
        }
    }
    let full = logits_of(&cfg, tensors.clone());
    let model = model_from_tensors(&cfg, tensors.clone(), &Device::Cpu).unwrap();
    let (imp, _) = measure(&model, &[ids(&cfg)], 1, &mut |_| {}).unwrap();
    assert_eq!(imp.hidden[7], 0.0);
    let shape = Shape {
        hidden: cfg.hidden_size - 1,
        ..Shape::of(&cfg)
    };
    let plan = plan_for(&cfg, shape, LayerRanking::DropOneKl, &imp).unwrap();
    assert!(!plan.hidden.contains(&7));
    let pcfg = plan.config(&cfg);
    let cut = logits_of(&pcfg, plan.apply(&cfg, &tensors).unwrap());
    let diff = max_abs_diff(&full, &cut);
    assert!(
        diff < 1e-3,
        "inert hidden channel removed, logits moved by {diff}"
    );
}

#[test]
fn gqa_groups_stay_whole() {
    let (cfg, model, tensors) = source();
    let (imp, _) = measure(&model, &[ids(&cfg)], 1, &mut |_| {}).unwrap();
    let rep = cfg.kv_groups();
    // One KV group of two heads; and both groups with one head each.
    for (heads, kv) in [(2usize, 1usize), (2, 2)] {
        let shape = Shape {
            heads,
            kv_heads: kv,
            ..Shape::of(&cfg)
        };
        let plan = plan_for(&cfg, shape, LayerRanking::BlockInfluence, &imp).unwrap();
        for l in 0..cfg.num_hidden_layers {
            assert_eq!(plan.kv_heads[l].len(), kv);
            for &h in &plan.heads[l] {
                assert!(
                    plan.kv_heads[l].contains(&(h / rep)),
                    "head {h} outside kept groups"
                );
            }
        }
        let cut = plan.apply(&cfg, &tensors).unwrap();
        model_from_tensors(&plan.config(&cfg), cut, &Device::Cpu)
            .unwrap()
            .forward(&ids(&cfg))
            .unwrap();
    }
    // A plan whose query heads straddle groups unevenly is refused.
    let mut bad = Plan::identity(&cfg);
    bad.heads = vec![vec![0, 1]; cfg.num_hidden_layers];
    bad.kv_heads = vec![vec![0, 1]; cfg.num_hidden_layers];
    let err = bad.check(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("KV head 0 keeps 2 query heads, not 1"),
        "{err}"
    );
    // Shapes that break grouped-query attention are refused, saying why.
    let three = Shape {
        heads: 3,
        ..Shape::of(&cfg)
    };
    let err = three.check(&cfg).unwrap_err().to_string();
    assert!(err.contains("not a multiple of kv_heads"), "{err}");
}

#[test]
fn top_k_keeps_order_and_breaks_ties_low() {
    assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 2), vec![1, 3]);
    assert_eq!(top_k(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
}

#[test]
fn targets_parse_and_refuse_the_teachers_size() {
    let n = 1_000_000;
    assert_eq!(
        Target::parse_params("0.6", n).unwrap(),
        Target::Params(600_000)
    );
    assert_eq!(
        Target::parse_params("500K", n).unwrap(),
        Target::Params(500_000)
    );
    assert_eq!(
        Target::parse_params("800000", n).unwrap(),
        Target::Params(800_000)
    );
    for s in ["1", "1.0", "1.5", "2M", "1000000"] {
        let e = Target::parse_params(s, n).unwrap_err().to_string();
        assert!(e.contains("at or above the teacher's"), "{s}: {e}");
    }
    for s in ["abc", "-3", "0"] {
        assert!(Target::parse_params(s, n).is_err(), "{s}");
    }
    let cfg = Config {
        num_hidden_layers: 4,
        ..tiny_config()
    };
    let p = proposals(&cfg, &Target::Params(cfg.num_params() * 3 / 4)).unwrap();
    assert!(p.iter().any(|c| c.name.starts_with("depth")), "{p:?}");
    assert!(p.iter().any(|c| c.name.starts_with("width")), "{p:?}");
    for c in &p {
        assert!(c.shape.params(&cfg) <= cfg.num_params() * 3 / 4, "{c:?}");
    }
}

#[test]
fn prune_writes_a_dir_that_round_trips_with_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config {
        num_hidden_layers: 4,
        ..tiny_config()
    };
    let teacher = tmp.path().join("teacher");
    write_tiny_model_dir(&teacher, &cfg, 5).unwrap();
    let tokens = tmp.path().join("tokens");
    write_tiny_tokens(&tokens, 12, 32, 8, 1).unwrap();
    let out = tmp.path().join("pruned");
    let opts = PruneOptions {
        teacher: teacher.clone(),
        tokens: tokens.clone(),
        out: out.clone(),
        target: TargetSpec::Params("0.8".into()),
        calib_sequences: 4,
        kl_sequences: 2,
        batch_size: 2,
        device: Device::Cpu,
    };
    let mut lines = Vec::new();
    let report = prune(&opts, &mut |l| lines.push(l)).unwrap();
    assert!(report.params <= cfg.num_params() * 8 / 10);
    assert!(report.candidates.len() >= 3, "{:?}", report.candidates);
    let best = report
        .candidates
        .iter()
        .map(|c| c.kl)
        .fold(f64::MAX, f64::min);
    assert_eq!(report.chosen().kl, best);
    assert!(lines.iter().any(|l| l.contains("drop-one KL")));
    // The dir is a complete model dir whose config is the plan's, and the report reads back.
    let (model, back) = distill_core::load_model(&out, &Device::Cpu).unwrap();
    let want = Config {
        torch_dtype: "float32".into(),
        ..report.plan.config(&cfg)
    };
    assert_eq!(back, want);
    assert_eq!(back.num_params(), report.params);
    // The report reads back (floats to within their JSON rounding).
    let back_report = PruneReport::read(&out).unwrap();
    assert_eq!(back_report.plan, report.plan);
    assert_eq!(back_report.chosen, report.chosen);
    assert_eq!(back_report.candidates.len(), report.candidates.len());
    assert!((back_report.chosen().kl - report.chosen().kl).abs() < 1e-12);
    assert!(out.join("prune-report.md").exists());
    assert_eq!(
        distill_core::Tokenizer::from_dir(&out).unwrap().hash(),
        distill_core::Tokenizer::from_dir(&teacher).unwrap().hash()
    );
    // Its logits are the plan applied to the teacher's tensors.
    let (_, tvm) = random_model(&cfg, 5).unwrap();
    let expect = logits_of(
        &back,
        report.plan.apply(&cfg, &named_tensors(&tvm)).unwrap(),
    );
    let d = max_abs_diff(&model.forward(&ids(&cfg)).unwrap(), &expect);
    assert!(d < 1e-4, "written dir's logits differ by {d}");

    // An explicit shape with heads that do not divide is refused before any work.
    let bad = PruneOptions {
        target: TargetSpec::Shape {
            layers: None,
            hidden: None,
            heads: Some(3),
            kv_heads: None,
            intermediate: None,
        },
        ..opts.clone()
    };
    let err = prune(&bad, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("not a multiple of kv_heads"), "{err}");
    // Calibration tokens are read evenly over the split.
    let shards = distill_core::shards::TokenShards::open(&tokens, "train").unwrap();
    let b = calibration_batches(&shards, 3, 2, &Device::Cpu).unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].dims(), &[2, 32]);
}
