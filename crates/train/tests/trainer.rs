//! The trainer on a tiny random teacher and synthetic tokens: the loss falls, every student Var
//! gets a gradient, resume is bit-identical, and the guards refuse what they should.

use candle_core::{Device, Tensor};
use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use distill_teacher::cache::{build_cache, CacheOptions};
use distill_train::config::RunConfig;
use distill_train::trainer::{train, RunOptions};
use std::path::{Path, PathBuf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn fixture(with_cache: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write_tiny_model_dir(&root.join("teacher"), &tiny_config(), 11).unwrap();
    write_tiny_tokens(&root.join("tokens"), 8, 32, 16, 5).unwrap();
    if with_cache {
        let teacher = distill_core::ModelDir::load(&root.join("teacher"), &Device::Cpu).unwrap();
        let hash = distill_core::weights::model_hash(&root.join("teacher")).unwrap();
        let opts = CacheOptions {
            top_k: 16,
            ..Default::default()
        };
        build_cache(
            &teacher,
            &hash,
            &root.join("tokens"),
            &root.join("cache"),
            &opts,
            |_, _| {},
        )
        .unwrap();
    }
    Fixture { _dir: dir, root }
}

/// configs/tiny.toml pointed at the fixture, with overrides.
fn config(f: &Fixture, cache: bool, sets: &[&str]) -> RunConfig {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let mut all = vec![
        format!("teacher.model=\"{}\"", f.root.join("teacher").display()),
        format!("data.tokens=\"{}\"", f.root.join("tokens").display()),
    ];
    if cache {
        all.push(format!("data.cache=\"{}\"", f.root.join("cache").display()));
    }
    all.extend(sets.iter().map(|s| s.to_string()));
    RunConfig::load(&tiny, &all).unwrap()
}

fn run(
    cfg: RunConfig,
    out: &Path,
    resume: bool,
    stop_after: Option<u64>,
) -> distill_core::Result<()> {
    let opts = RunOptions {
        out: out.to_path_buf(),
        resume,
        ignore_memory_plan: false,
        stop_after,
    };
    train(cfg, &opts, |_| {}).map(|_| ())
}

fn metrics(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run, "train")
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn loss_falls_with_a_cache_and_online() {
    let f = fixture(true);
    for (name, cache, sets) in [
        ("cached", true, vec![]),
        ("online-dense", false, vec![]),
        (
            "online-sparse",
            false,
            vec!["teacher.top_k=16", "loss.kind=\"jsd\"", "loss.beta=0.5"],
        ),
    ] {
        let out = f.root.join(name);
        let mut s = vec!["train.max_steps=40"];
        s.extend(sets);
        run(config(&f, cache, &s), &out, false, None).unwrap();
        let l = losses(&out);
        assert_eq!(l.len(), 40);
        let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
        let last: f64 = l[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
        assert!(last < 0.7 * first, "{name}: loss {first} → {last}");
        let evals = metrics(&out, "eval");
        assert!(!evals.is_empty(), "{name}");
        let e = evals.last().unwrap();
        assert!(
            e["perplexity"].as_f64().unwrap() > 1.0 && e["kl_to_teacher"].as_f64().unwrap() >= 0.0
        );
        // The final student is a complete HF dir that loads.
        let (m, c) = distill_core::load_model(&out.join("final"), &Device::Cpu).unwrap();
        assert_eq!(c.num_hidden_layers, 2);
        assert_eq!(m.config().vocab_size, tiny_config().vocab_size);
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "optimizer.safetensors",
            "trainer_state.json",
        ] {
            assert!(out.join("final").join(file).exists(), "{name}: {file}");
        }
    }
}

#[test]
fn every_student_var_receives_a_gradient() {
    use distill_train::loss::{distill_loss, next_token_labels};
    let f = fixture(false);
    let cfg = config(
        &f,
        false,
        &[
            "student.preset=\"4l-256\"",
            "student.hidden=64",
            "student.intermediate=96",
        ],
    );
    let teacher_cfg = distill_core::Config::from_file(f.root.join("teacher/config.json")).unwrap();
    let (student, varmap, _) = distill_train::student::build_student(
        &cfg.teacher.model,
        &teacher_cfg,
        &cfg.student,
        &Device::Cpu,
    )
    .unwrap();
    let (teacher, _) = distill_core::load_model(&f.root.join("teacher"), &Device::Cpu).unwrap();
    let shards = distill_core::shards::TokenShards::open(&f.root.join("tokens"), "train").unwrap();
    let ids: Vec<u32> = (0..2).flat_map(|i| shards.sequence(i)).collect();
    let input = Tensor::from_vec(ids.clone(), (2, 32), &Device::Cpu).unwrap();
    let targets = distill_core::TeacherTargets::Dense {
        logits: teacher.forward(&input).unwrap(),
    };
    let loss_cfg = cfg.loss.to_config(None).unwrap();
    let parts = distill_loss(
        &student.forward(&input).unwrap(),
        &targets,
        &next_token_labels(&ids, 2, 32),
        &loss_cfg,
    )
    .unwrap();
    let grads = parts.total.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    assert!(data.len() > 10);
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: grad norm² {norm}");
    }
}

#[test]
fn teacher_layers_init_copies_the_chosen_layers() {
    let f = fixture(false);
    let cfg = config(
        &f,
        false,
        &[
            "student.preset=\"tiny\"",
            "student.init=\"teacher-layers\"",
            "student.layers=1",
            "student.teacher_layers=[1]",
        ],
    );
    let tdir = f.root.join("teacher");
    let teacher_cfg = distill_core::Config::from_file(tdir.join("config.json")).unwrap();
    let (_, varmap, scfg) =
        distill_train::student::build_student(&tdir, &teacher_cfg, &cfg.student, &Device::Cpu)
            .unwrap();
    assert_eq!(scfg.num_hidden_layers, 1);
    let st = candle_core::safetensors::load(tdir.join("model.safetensors"), &Device::Cpu).unwrap();
    let data = varmap.data().lock().unwrap();
    for (s_name, t_name) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("model.norm.weight", "model.norm.weight"),
    ] {
        let d = distill_core::testing::max_abs_diff(data[s_name].as_tensor(), &st[t_name]);
        assert_eq!(d, 0.0, "{s_name} ← {t_name}");
    }
    drop(data);
    // A width that differs from the teacher's is refused.
    let bad = config(
        &f,
        false,
        &[
            "student.init=\"teacher-layers\"",
            "student.hidden=64",
            "student.layers=1",
            "student.heads=4",
            "student.intermediate=128",
        ],
    );
    let err =
        distill_train::student::build_student(&tdir, &teacher_cfg, &bad.student, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("teacher's width"), "{err}");
}

#[test]
fn resume_continues_bit_identically() {
    let f = fixture(true);
    let sets = [
        "train.max_steps=12",
        "train.checkpoint_every=100",
        "train.eval_every=5",
        "train.grad_accum=2",
    ];
    let straight = f.root.join("straight");
    run(config(&f, true, &sets), &straight, false, None).unwrap();
    let halves = f.root.join("halves");
    run(config(&f, true, &sets), &halves, false, Some(6)).unwrap();
    assert!(halves.join("step-6").exists() && !halves.join("final").exists());
    run(config(&f, true, &sets), &halves, true, None).unwrap();
    assert_eq!(losses(&straight), losses(&halves));
    assert_eq!(
        std::fs::read(straight.join("final/model.safetensors")).unwrap(),
        std::fs::read(halves.join("final/model.safetensors")).unwrap()
    );
    assert_eq!(
        std::fs::read(straight.join("final/optimizer.safetensors")).unwrap(),
        std::fs::read(halves.join("final/optimizer.safetensors")).unwrap()
    );
}

#[test]
fn checkpoints_keep_the_last_k_and_the_best() {
    let f = fixture(true);
    let out = f.root.join("run");
    run(
        config(
            &f,
            true,
            &[
                "train.max_steps=20",
                "train.checkpoint_every=2",
                "train.keep_checkpoints=2",
                "train.eval_every=2",
            ],
        ),
        &out,
        false,
        None,
    )
    .unwrap();
    let steps: Vec<u64> = distill_core::run_dir::RunDir::new(&out)
        .checkpoints()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert!(steps.ends_with(&[18, 20]), "{steps:?}");
    assert!(steps.len() <= 3, "{steps:?}");
    // A second run into the same dir without --resume is refused.
    let err = run(config(&f, true, &[]), &out, false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn guards_refuse_what_they_should() {
    let f = fixture(true);
    // Non-finite loss: stops naming the step, the last checkpoint untouched.
    let out = f.root.join("nan");
    let sets = [
        "train.max_steps=30",
        "train.lr=1e30",
        "train.min_lr=1e30",
        "train.warmup_steps=0",
        "train.grad_clip=0.0",
        "train.checkpoint_every=1",
        "train.eval_every=0",
    ];
    let err = run(config(&f, true, &sets), &out, false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("step ") && err.contains("non-finite") && err.contains("last good checkpoint"),
        "{err}"
    );
    let last = distill_core::run_dir::RunDir::new(&out)
        .checkpoints()
        .pop()
        .unwrap()
        .1;
    distill_core::load_model(&last, &Device::Cpu).unwrap();

    // Vocabularies: padding is accepted, anything else refused naming both.
    let v = tiny_config().vocab_size;
    run(
        config(
            &f,
            false,
            &[
                &format!("student.vocab_size={}", v + 6),
                "train.max_steps=2",
            ],
        ),
        &f.root.join("padded"),
        false,
        None,
    )
    .unwrap();
    let err = run(
        config(&f, false, &["student.vocab_size=100", "train.max_steps=2"]),
        &f.root.join("v100"),
        false,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("(100)") && err.contains(&format!("({v})")),
        "{err}"
    );

    // A cache built by another teacher.
    write_tiny_model_dir(&f.root.join("teacher2"), &tiny_config(), 12).unwrap();
    let mut cfg = config(&f, true, &[]);
    cfg.teacher.model = f.root.join("teacher2");
    let err = run(cfg, &f.root.join("other-teacher"), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another teacher"), "{err}");

    // A plan beyond the machine's memory.
    let err = run(
        config(&f, true, &["train.batch_size=100000000"]),
        &f.root.join("huge"),
        false,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("GB are available") && err.contains("grad_accum"),
        "{err}"
    );
}

#[test]
fn config_with_an_unknown_key_is_refused_naming_it() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let err = RunConfig::load(&tiny, &["train.learning_rate=1e-3".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny.toml") && err.contains("learning_rate"),
        "{err}"
    );
    let err = RunConfig::load(&tiny, &["loss.kind=\"kl\"".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("loss.kind"), "{err}");
    // Every committed config parses.
    for c in ["tiny.toml", "smollm2-student.toml"] {
        RunConfig::load(&tiny.with_file_name(c), &[]).unwrap();
    }
}

#[test]
fn a_cache_without_the_valid_split_evaluates_with_the_live_teacher() {
    let f = fixture(false);
    let teacher = distill_core::ModelDir::load(&f.root.join("teacher"), &Device::Cpu).unwrap();
    let hash = distill_core::weights::model_hash(&f.root.join("teacher")).unwrap();
    let opts = CacheOptions {
        top_k: 16,
        splits: vec!["train".into()],
        ..Default::default()
    };
    build_cache(
        &teacher,
        &hash,
        &f.root.join("tokens"),
        &f.root.join("cache"),
        &opts,
        |_, _| {},
    )
    .unwrap();
    let out = f.root.join("run");
    run(
        config(&f, true, &["train.max_steps=4", "train.eval_every=2"]),
        &out,
        false,
        None,
    )
    .unwrap();
    let evals = metrics(&out, "eval");
    assert_eq!(evals.len(), 2);
    assert!(evals[1]["kl_to_teacher"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_student_from_a_model_dir_with_frozen_embeddings_resumes_bit_identically() {
    let f = fixture(true);
    // The student starts as a copy of another random model of the teacher's shape and tokenizer.
    let start = f.root.join("start");
    write_tiny_model_dir(&start, &tiny_config(), 21).unwrap();
    let cfg = |max_steps: u64| {
        let text = format!(
            "name = \"heal\"\n[data]\ntokens = {:?}\ncache = {:?}\n[teacher]\nmodel = {:?}\n\
             [student]\ninit = \"model\"\nmodel = {:?}\nfreeze_embeddings = true\n\
             [train]\nbatch_size = 2\nmax_steps = {max_steps}\nlr = 3e-3\nmin_lr = 3e-4\n\
             warmup_steps = 2\nlog_every = 1\neval_every = 0\ncheckpoint_every = 100\n",
            f.root.join("tokens").display().to_string(),
            f.root.join("cache").display().to_string(),
            f.root.join("teacher").display().to_string(),
            start.display().to_string(),
        );
        RunConfig::from_table(toml::from_str(&text).unwrap()).unwrap()
    };
    let straight = f.root.join("straight");
    run(cfg(10), &straight, false, None).unwrap();
    let emb = |dir: &Path| distill_core::testing::saved_tensor(dir, "model.embed_tokens.weight");
    assert_eq!(
        emb(&straight.join("final")),
        emb(&start),
        "frozen embeddings moved"
    );
    let halves = f.root.join("halves");
    run(cfg(10), &halves, false, Some(5)).unwrap();
    // The dir the run started from changes under it: the resumed run reads its frozen
    // embeddings from its own checkpoint, not from there.
    write_tiny_model_dir(&start, &tiny_config(), 22).unwrap();
    run(cfg(10), &halves, true, None).unwrap();
    assert_eq!(losses(&straight), losses(&halves));
    assert_eq!(
        std::fs::read(straight.join("final/model.safetensors")).unwrap(),
        std::fs::read(halves.join("final/model.safetensors")).unwrap()
    );
}

/// On-policy batches (λ = 0.5, so both kinds alternate inside one optimizer step) with a
/// hidden-state loss through a learned projection (a student half the teacher's width).
const ON_POLICY_HIDDEN: [&str; 10] = [
    "onpolicy.fraction=0.5",
    "onpolicy.prompt_tokens=8",
    "onpolicy.max_new_tokens=8",
    "hidden.weight=0.5",
    "hidden.kind=\"mse\"",
    "hidden.layers=[[0, 0], [1, 1]]",
    "student.hidden=16",
    "train.grad_accum=2",
    "train.max_steps=12",
    "train.eval_every=5",
];

#[test]
fn on_policy_and_hidden_state_runs_train_log_and_resume_bit_identically() {
    let f = fixture(false);
    let mut sets = ON_POLICY_HIDDEN.to_vec();
    sets.push("train.checkpoint_every=100");
    let straight = f.root.join("straight");
    run(config(&f, false, &sets), &straight, false, None).unwrap();
    let steps = metrics(&straight, "train");
    assert_eq!(steps.len(), 12);
    for s in &steps {
        // One of the two micro-batches of every step is on-policy; both carry the hidden term.
        assert!(s["on_policy_kd"].as_f64().unwrap() >= 0.0, "{s}");
        assert!(s["hidden"].as_f64().unwrap() > 0.0, "{s}");
        let t = &s["seconds"];
        assert!(t["sample"].as_f64().unwrap() > 0.0 && t["teacher"].as_f64().unwrap() > 0.0);
    }
    // The projection is saved beside the model, never in it; transformers' dir stays a model.
    let fin = straight.join("final");
    let proj =
        candle_core::safetensors::load(fin.join("hidden_projection.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(proj["hidden_proj.0.weight"].dims(), &[32, 16]);
    let model =
        candle_core::safetensors::load(fin.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(model.keys().all(|k| !k.starts_with("hidden_proj")));
    distill_core::load_model(&fin, &Device::Cpu).unwrap();

    // Interrupted after step 6 and resumed: the sampler's seeds follow the step, so the run
    // draws the same continuations and ends with the same weights, moments and projections.
    let halves = f.root.join("halves");
    run(config(&f, false, &sets), &halves, false, Some(6)).unwrap();
    run(config(&f, false, &sets), &halves, true, None).unwrap();
    assert_eq!(losses(&straight), losses(&halves));
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "hidden_projection.safetensors",
    ] {
        assert_eq!(
            std::fs::read(straight.join("final").join(file)).unwrap(),
            std::fs::read(halves.join("final").join(file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn on_policy_and_hidden_state_refuse_a_cache_and_a_missing_teacher() {
    let f = fixture(true);
    for (set, what) in [
        ("onpolicy.fraction=0.5", "onpolicy.fraction"),
        ("hidden.weight=1.0", "hidden.weight"),
    ] {
        let err = run(
            config(&f, true, &[set, "hidden.layers=[[0, 0]]"]),
            &f.root.join("cached"),
            false,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains(what) && err.contains("live teacher") && err.contains("remove data.cache"),
            "{err}"
        );
        let err = run(
            config(
                &f,
                false,
                &[
                    set,
                    "hidden.layers=[[0, 0]]",
                    "loss.alpha_kd=0",
                    "loss.alpha_ce=1",
                ],
            ),
            &f.root.join("textonly"),
            false,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains(what) && err.contains("alpha_kd"), "{err}");
    }
    // A layer map beyond either model, and none at all for a student that was not pruned.
    let err = run(
        config(&f, false, &["hidden.weight=1.0", "hidden.layers=[[0, 7]]"]),
        &f.root.join("beyond"),
        false,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("[0, 7]") && err.contains("teacher 2"), "{err}");
    let err = run(
        config(&f, false, &["hidden.weight=1.0"]),
        &f.root.join("nomap"),
        false,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("layer map") && err.contains("hidden.layers"),
        "{err}"
    );
    for (set, what) in [
        ("onpolicy.fraction=1.5", "onpolicy.fraction"),
        ("hidden.kind=\"l1\"", "hidden.kind"),
        ("onpolicy.temperature=-1", "onpolicy.temperature"),
    ] {
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
        let err = RunConfig::load(&tiny, &[set.to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn on_policy_prompts_from_a_file_train_and_resume_bit_identically() {
    let f = fixture(false);
    let prompts = f.root.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "the cat\n{\"prompt\": \"a dog and a bird\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"the end\"}]}\n",
    )
    .unwrap();
    let p = format!("onpolicy.prompts=\"{}\"", prompts.display());
    let sets = [
        "onpolicy.fraction=1",
        "onpolicy.max_new_tokens=6",
        p.as_str(),
        "train.max_steps=6",
        "train.checkpoint_every=100",
    ];
    let straight = f.root.join("straight");
    run(config(&f, false, &sets), &straight, false, None).unwrap();
    assert!(metrics(&straight, "train")
        .iter()
        .all(|s| s["on_policy_kd"].as_f64().unwrap() >= 0.0));
    let halves = f.root.join("halves");
    run(config(&f, false, &sets), &halves, false, Some(3)).unwrap();
    run(config(&f, false, &sets), &halves, true, None).unwrap();
    assert_eq!(losses(&straight), losses(&halves));
    assert_eq!(
        std::fs::read(straight.join("final/model.safetensors")).unwrap(),
        std::fs::read(halves.join("final/model.safetensors")).unwrap()
    );
    // A prompts file that is not one names itself.
    std::fs::write(&prompts, "{\"nope\": 1}\n").unwrap();
    let err = run(config(&f, false, &sets), &f.root.join("bad"), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("prompts.jsonl") && err.contains("line 1"),
        "{err}"
    );
    // A prompt with nothing to continue names itself too.
    std::fs::write(&prompts, "the cat\n{\"prompt\": \"\"}\n").unwrap();
    let err = run(config(&f, false, &sets), &f.root.join("empty"), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("prompts.jsonl") && err.contains("prompt 2 is empty"),
        "{err}"
    );
}

/// A live teacher at bf16 (AMX): the loss falls, a resumed run is bit-identical to a straight
/// one, the run's config.toml records the precision, and the first steps' losses stay within
/// bf16 rounding of the f32 teacher's. An unknown precision is refused naming the key.
#[test]
fn a_live_bf16_teacher_trains_and_resumes_bit_identically() {
    let f = fixture(false);
    unknown_precision_is_refused("teacher.precision");
    // A cache built at f32 with a bf16 teacher asked: refused, naming both (before any AMX use).
    let bf16_run_error = |f: &Fixture, cache: bool, name: &str| {
        let cfg = config(f, cache, &["teacher.precision=\"bf16\""]);
        run(cfg, &f.root.join(name), false, None)
            .unwrap_err()
            .to_string()
    };
    let err = bf16_run_error(&fixture(true), true, "mismatch");
    assert!(
        err.contains("data.cache") && err.contains("at f32") && err.contains("teacher.precision"),
        "{err}"
    );
    if !distill_core::ops::bf16::available() {
        let err = bf16_run_error(&f, false, "refused");
        assert!(
            err.contains("teacher.precision") && err.contains("AMX-BF16"),
            "{err}"
        );
        return;
    }
    let sets = [
        "train.max_steps=30",
        "train.checkpoint_every=100",
        "train.eval_every=10",
        "teacher.precision=\"bf16\"",
    ];
    bf16_run_trains_and_resumes(&f, &sets);
}

/// Mixed-precision training (`train.precision = "bf16"`: the student's products on AMX tiles):
/// the loss falls, a resumed run is bit-identical to a straight one, the run's config.toml
/// records the precision, and the first steps' losses stay within bf16 rounding of f32's. An
/// unknown precision is refused naming the key; without AMX, bf16 is refused naming it.
#[test]
fn bf16_student_products_train_and_resume_bit_identically() {
    let f = fixture(false);
    unknown_precision_is_refused("train.precision");
    let sets = [
        "train.max_steps=30",
        "train.checkpoint_every=100",
        "train.eval_every=10",
        "train.precision=\"bf16\"",
    ];
    if !distill_core::ops::bf16::available() {
        let err = run(
            config(&f, false, &sets),
            &f.root.join("refused"),
            false,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("train.precision") && err.contains("AMX-BF16"),
            "{err}"
        );
        return;
    }
    bf16_run_trains_and_resumes(&f, &sets);
}

/// A 30-step run with `sets` (the last one the bf16 setting): the loss falls, the run's
/// config.toml records the precision, a resumed run is bit-identical to a straight one, and the
/// first steps' losses stay within bf16 rounding of the same run at f32 (without the last set).
fn bf16_run_trains_and_resumes(f: &Fixture, sets: &[&str; 4]) {
    let straight = f.root.join("straight");
    run(config(f, false, sets), &straight, false, None).unwrap();
    let config_toml = std::fs::read_to_string(straight.join("config.toml")).unwrap();
    assert!(
        config_toml.contains("precision = \"bf16\""),
        "{config_toml}"
    );
    let l = losses(&straight);
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[25..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss {first} → {last}");
    let halves = f.root.join("halves");
    run(config(f, false, sets), &halves, false, Some(15)).unwrap();
    run(config(f, false, sets), &halves, true, None).unwrap();
    assert_eq!(losses(&straight), losses(&halves));
    assert_eq!(
        std::fs::read(straight.join("final/model.safetensors")).unwrap(),
        std::fs::read(halves.join("final/model.safetensors")).unwrap()
    );
    let f32_run = f.root.join("f32");
    run(config(f, false, &sets[..3]), &f32_run, false, Some(3)).unwrap();
    assert_eq!(losses(&f32_run).len(), 3);
    for ((_, a), (_, b)) in losses(&f32_run).iter().zip(&l) {
        assert!(
            a != b && (a - b).abs() < 1e-2 * a.abs(),
            "f32 {a} vs bf16 {b}"
        );
    }
}

/// `KEY = "fp8"` in a run config is refused, naming the value and the precisions there are.
fn unknown_precision_is_refused(key: &str) {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let err = RunConfig::load(&tiny, &[format!("{key}=\"fp8\"")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("fp8") && err.contains("bf16"), "{err}");
}
