//! The teacher cache on a tiny random teacher: values against the full log-softmax, resume,
//! shard I/N parts, and every integrity failure.

use candle_core::{Device, Tensor};
use distill_core::cache::{CacheDType, CacheExpect, TeacherCache, TeacherTargets};
use distill_core::shards::{TokenShards, TokenShardsMeta};
use distill_core::testing::{tiny_config, write_tiny_model_dir, write_tiny_tokens};
use distill_core::weights::model_hash;
use distill_core::ModelDir;
use distill_teacher::cache::{build_cache, merge_cache, CacheOptions};
use std::path::{Path, PathBuf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: ModelDir,
    hash: String,
    tokens: PathBuf,
    meta: TokenShardsMeta,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write_tiny_model_dir(&root.join("teacher"), &tiny_config(), 7).unwrap();
    let tokens = root.join("tokens");
    // 16-token sequences, 5 per token shard: several token shards, each cut into cache shards.
    let meta = write_tiny_tokens(&tokens, 4, 16, 5, 3).unwrap();
    let teacher = ModelDir::load(&root.join("teacher"), &Device::Cpu).unwrap();
    let hash = model_hash(&root.join("teacher")).unwrap();
    Fixture {
        _dir: dir,
        root,
        teacher,
        hash,
        tokens,
        meta,
    }
}

fn opts(k: usize, dtype: CacheDType) -> CacheOptions {
    CacheOptions {
        top_k: k,
        dtype,
        batch_size: 2,
        shard_sequences: 3,
        ..Default::default()
    }
}

fn build(f: &Fixture, out: &Path, o: &CacheOptions) -> distill_core::Result<()> {
    build_cache(&f.teacher, &f.hash, &f.tokens, out, o, |_, _| {}).map(|_| ())
}

fn expect(f: &Fixture) -> CacheExpect {
    CacheExpect {
        teacher_hash: Some(f.hash.clone()),
        tokenizer_hash: Some(f.meta.tokenizer_hash.clone()),
        tokens_hash: None,
    }
}

/// All files under `dir` (relative path → bytes), manifests included.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn shard_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
        .collect()
}

fn sparse(t: TeacherTargets) -> (Vec<u32>, Vec<f32>, Vec<f32>, Vec<usize>) {
    match t {
        TeacherTargets::Sparse {
            ids,
            logprobs,
            logsumexp,
        } => (
            ids.flatten_all().unwrap().to_vec1().unwrap(),
            logprobs.flatten_all().unwrap().to_vec1().unwrap(),
            logsumexp.flatten_all().unwrap().to_vec1().unwrap(),
            ids.dims().to_vec(),
        ),
        TeacherTargets::Dense { .. } => panic!("a cache gives sparse targets"),
    }
}

/// For every cached position: ids are the true top-k of the full logits, log-probs equal
/// log_softmax at those ids within `tol(exact)`, logsumexp and tail mass are right.
fn check_against_full_softmax(k: usize, dtype: CacheDType, tol: impl Fn(f32) -> f32) {
    let f = fixture();
    let out = f.root.join("cache");
    build(&f, &out, &opts(k, dtype)).unwrap();
    let cache = TeacherCache::open(&out, &f.meta, &expect(&f)).unwrap();
    for split in ["train", "valid"] {
        let shards = TokenShards::open(&f.tokens, split).unwrap();
        assert_eq!(cache.sequences(split), shards.len());
        let seqs: Vec<usize> = (0..shards.len()).rev().collect(); // any order
        let (ids, lps, lses, dims) = sparse(cache.targets(split, &seqs, &Device::Cpu).unwrap());
        assert_eq!(dims, vec![seqs.len(), 16, k]);
        let input: Vec<u32> = seqs.iter().flat_map(|&i| shards.sequence(i)).collect();
        let input = Tensor::from_vec(input, (seqs.len(), 16), &Device::Cpu).unwrap();
        let logits = f.teacher.model.forward(&input).unwrap();
        let logp = distill_core::model::log_softmax(&logits).unwrap();
        let lse_full = logits
            .exp()
            .unwrap()
            .sum_keepdim(2)
            .unwrap()
            .log()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let logp: Vec<f32> = logp.flatten_all().unwrap().to_vec1().unwrap();
        let v = tiny_config().vocab_size;
        for row in 0..seqs.len() * 16 {
            let full = &logp[row * v..(row + 1) * v];
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&a, &b| full[b].total_cmp(&full[a]).then(a.cmp(&b)));
            let kept = &ids[row * k..(row + 1) * k];
            // The true top-k up to exact ties: the cache's logits come from its own chunked
            // product, which can order two equal logits of this forward either way (a tiny random
            // model has such ties). Rank j's id must score rank j's value, within 1e-6.
            let mut distinct = kept.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), k, "row {row}: repeated ids {kept:?}");
            for (j, (&id, &want)) in kept.iter().zip(&order[..k]).enumerate() {
                let (got, best) = (full[id as usize], full[want]);
                assert!(
                    (got - best).abs() <= 1e-6,
                    "row {row}: not the true top-k: rank {j} is id {id} ({got}), the forward's is id {want} ({best})"
                );
            }
            let mut kept_mass = 0f64;
            for j in 0..k {
                let exact = full[kept[j] as usize];
                let got = lps[row * k + j];
                assert!(
                    (got - exact).abs() <= tol(exact),
                    "row {row} kept {j}: cached {got} vs log_softmax {exact}"
                );
                kept_mass += (exact as f64).exp();
            }
            assert!((lses[row] - lse_full[row]).abs() <= 1e-5 * lse_full[row].abs().max(1.0));
            // Tail mass = 1 − Σ kept = Σ of the probabilities not kept.
            let tail: f64 = order[k..].iter().map(|&i| (full[i] as f64).exp()).sum();
            let cached_kept: f64 = lps[row * k..(row + 1) * k]
                .iter()
                .map(|&x| (x as f64).exp())
                .sum();
            assert!((1.0 - kept_mass - tail).abs() < 1e-5);
            assert!(
                (cached_kept - kept_mass).abs() < 1e-3,
                "{cached_kept} vs {kept_mass}"
            );
        }
    }
}

#[test]
fn f32_cache_equals_log_softmax_at_the_true_top_k() {
    check_against_full_softmax(8, CacheDType::F32, |_| 1e-6);
}

#[test]
fn f16_cache_is_log_softmax_rounded_to_f16() {
    // The f16 value nearest the exact one: at most half an f16 ulp away, plus the 1e-6 by which
    // our f32 logsumexp may differ from candle's log_softmax.
    check_against_full_softmax(5, CacheDType::F16, |exact| {
        let h = half::f16::from_f32(exact);
        let ulp = (half::f16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()).abs();
        ulp / 2.0 + 1e-6
    });
}

#[test]
fn rerun_after_interruption_gives_identical_shards_and_skips_complete_ones() {
    let f = fixture();
    let o = opts(4, CacheDType::F16);
    let straight = f.root.join("straight");
    build(&f, &straight, &o).unwrap();

    // Interrupt inside the third shard (a panic stands in for Ctrl-C / kill -9: the manifest is
    // only written after a shard's file is renamed into place).
    let resumed = f.root.join("resumed");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        build_cache(&f.teacher, &f.hash, &f.tokens, &resumed, &o, |done, _| {
            // Token shards hold 5 sequences, cut into cache shards of 3 + 2: after two cache
            // shards 80 tokens are done; stop inside the third.
            if done > 80 {
                panic!("interrupted");
            }
        })
    }));
    assert!(r.is_err());
    let partial = shard_files(&resumed);
    assert_eq!(
        partial.len(),
        2,
        "two complete shards before the interruption"
    );
    // A half-written temp file may be left behind; the rerun must not mind it.
    std::fs::write(
        resumed.join("train/.shard-00001-0000.safetensors.tmp"),
        b"junk",
    )
    .unwrap();
    let s = build_cache(&f.teacher, &f.hash, &f.tokens, &resumed, &o, |_, _| {}).unwrap();
    assert_eq!(
        s.shards_written,
        s.shards_total - 2,
        "complete shards are not recomputed"
    );
    assert_eq!(shard_files(&resumed), shard_files(&straight));
    assert_eq!(
        std::fs::read(resumed.join("manifest.json")).unwrap(),
        std::fs::read(straight.join("manifest.json")).unwrap()
    );
    TeacherCache::open(&resumed, &f.meta, &expect(&f)).unwrap();
}

#[test]
fn parts_merged_equal_the_single_run() {
    let f = fixture();
    let single = f.root.join("single");
    build(&f, &single, &opts(4, CacheDType::F16)).unwrap();
    let assembled = f.root.join("assembled");
    for i in 0..3 {
        // Each part on its own "machine" (dir), then copied together.
        let part_dir = f.root.join(format!("part{i}"));
        let o = CacheOptions {
            part: [i, 3],
            ..opts(4, CacheDType::F16)
        };
        build(&f, &part_dir, &o).unwrap();
        for (rel, bytes) in files(&part_dir) {
            let dst = assembled.join(&rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::write(dst, bytes).unwrap();
        }
    }
    // The reader accepts the assembled parts as they are...
    TeacherCache::open(&assembled, &f.meta, &expect(&f)).unwrap();
    // ...and --merge verifies them and writes the same manifest as the single run.
    merge_cache(&assembled, &f.meta).unwrap();
    assert_eq!(shard_files(&assembled), shard_files(&single));
    assert_eq!(
        std::fs::read(assembled.join("manifest.json")).unwrap(),
        std::fs::read(single.join("manifest.json")).unwrap()
    );

    // A missing part is named.
    let two = f.root.join("two-of-three");
    for i in 0..2 {
        for (rel, bytes) in files(&f.root.join(format!("part{i}"))) {
            let dst = two.join(&rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::write(dst, bytes).unwrap();
        }
    }
    let err = merge_cache(&two, &f.meta).unwrap_err().to_string();
    assert!(err.contains("part 2/3 missing"), "{err}");
    let err = TeacherCache::open(&two, &f.meta, &expect(&f))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("part 2/3 missing"), "{err}");
}

fn open_err(dir: &Path, meta: &TokenShardsMeta, e: &CacheExpect) -> String {
    match TeacherCache::open(dir, meta, e) {
        Ok(_) => panic!("{} should be refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn integrity_failures_are_refused_with_their_reason() {
    let f = fixture();
    let out = f.root.join("cache");
    let o = opts(4, CacheDType::F16);
    build(&f, &out, &o).unwrap();
    let good = expect(&f);

    // Another teacher.
    let e = CacheExpect {
        teacher_hash: Some("0".repeat(64)),
        ..good.clone()
    };
    let err = open_err(&out, &f.meta, &e);
    assert!(
        err.contains("another teacher") && err.contains("manifest.json"),
        "{err}"
    );
    // Another tokenizer.
    let e = CacheExpect {
        tokenizer_hash: Some("1".repeat(64)),
        ..good.clone()
    };
    assert!(open_err(&out, &f.meta, &e).contains("another tokenizer"));
    // Other tokens (a different corpus prepared the same way).
    let other = write_tiny_tokens(&f.root.join("other-tokens"), 4, 16, 5, 99).unwrap();
    assert!(open_err(&out, &other, &good).contains("other tokens"));

    // Resuming into a cache dir with other settings.
    let err = build(&f, &out, &opts(3, CacheDType::F16))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other settings") && err.contains("top-k 4 on disk vs 3 asked"),
        "{err}"
    );

    // A truncated shard, then a corrupt one of the right length.
    let shard = out.join("train/shard-00001-0000.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let err = open_err(&out, &f.meta, &good);
    assert!(
        err.contains("shard-00001-0000") && err.contains("truncated"),
        "{err}"
    );
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x55;
    std::fs::write(&shard, &bad).unwrap();
    let err = open_err(&out, &f.meta, &good);
    assert!(
        err.contains("shard-00001-0000") && err.contains("checksum"),
        "{err}"
    );
    std::fs::write(&shard, &bytes).unwrap();
    TeacherCache::open(&out, &f.meta, &good).unwrap();

    // An incomplete cache (a shard missing from the manifest) names the first missing shard.
    let manifest_path = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["shards"].as_array_mut().unwrap().remove(2);
    std::fs::write(&manifest_path, m.to_string()).unwrap();
    let err = open_err(&out, &f.meta, &good);
    assert!(err.contains("incomplete") && err.contains("1 of"), "{err}");

    // Another format version.
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["format_version"] = serde_json::json!(99);
    std::fs::write(&manifest_path, m.to_string()).unwrap();
    let err = open_err(&out, &f.meta, &good);
    assert!(err.contains("format version 99"), "{err}");

    // Not a cache at all.
    let err = open_err(&f.tokens, &f.meta, &good);
    assert!(err.contains("not a teacher cache"), "{err}");
}

#[test]
fn max_sequences_caches_a_prefix_of_each_split() {
    let f = fixture();
    let out = f.root.join("slice");
    let o = CacheOptions {
        max_sequences: Some(7),
        ..opts(4, CacheDType::F16)
    };
    let s = build_cache(&f.teacher, &f.hash, &f.tokens, &out, &o, |_, _| {}).unwrap();
    let cache = TeacherCache::open(&out, &f.meta, &expect(&f)).unwrap();
    assert_eq!(cache.sequences("train"), 7);
    let valid = TokenShards::open(&f.tokens, "valid").unwrap().len();
    assert_eq!(cache.sequences("valid"), valid.min(7));
    assert_eq!(s.tokens_total as usize, (7 + valid.min(7)) * 16);
    // k·(4 + 2) + 4 = 28 bytes of data per token, plus the small safetensors headers.
    assert!(
        s.bytes_per_token >= 28.0 && s.bytes_per_token < 40.0,
        "{}",
        s.bytes_per_token
    );
    let err = cache
        .targets("train", &[7], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not in the teacher cache"), "{err}");
}

/// A cache of the teacher at bf16 (AMX): reruns write the same bytes, the manifest records the
/// precision, an f32 run refuses to continue it, and its targets are the f32 ones to within the
/// rounding of bf16 inputs (and not the same bytes: the bf16 products did run).
#[test]
fn bf16_teacher_cache_is_reproducible_and_recorded() {
    if !distill_core::ops::bf16::available() {
        eprintln!("skipped: no AMX-BF16 on this CPU");
        return;
    }
    let f = fixture();
    let mut teacher = f.teacher.clone();
    teacher
        .model
        .set_precision(distill_core::Precision::Bf16)
        .unwrap();
    let o = opts(4, CacheDType::F32);
    let (a, b, c) = (f.root.join("a"), f.root.join("b"), f.root.join("f32"));
    for dir in [&a, &b] {
        build_cache(&teacher, &f.hash, &f.tokens, dir, &o, |_, _| {}).unwrap();
    }
    assert_eq!(shard_files(&a), shard_files(&b));
    let manifest = std::fs::read_to_string(a.join("manifest.json")).unwrap();
    assert!(
        manifest.contains(r#""teacher_precision": "bf16""#),
        "{manifest}"
    );
    // Numbered apart from f32 caches, so builds from before the field refuse it; a manifest
    // whose number and precision disagree is refused too.
    assert!(manifest.contains(r#""format_version": 2"#), "{manifest}");
    let tampered = f.root.join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    std::fs::write(
        tampered.join("manifest.json"),
        manifest.replace(r#""format_version": 2"#, r#""format_version": 1"#),
    )
    .unwrap();
    let err = distill_core::cache::CacheManifest::read(&tampered.join("manifest.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not match its teacher precision bf16"),
        "{err}"
    );
    let err = build(&f, &a, &o).unwrap_err().to_string();
    assert!(
        err.contains("teacher precision bf16 on disk vs f32 asked"),
        "{err}"
    );
    build(&f, &c, &o).unwrap();
    assert!(!std::fs::read_to_string(c.join("manifest.json"))
        .unwrap()
        .contains("teacher_precision"));
    assert_ne!(shard_files(&a), shard_files(&c));
    let (cache16, cache32) = (
        TeacherCache::open(&a, &f.meta, &expect(&f)).unwrap(),
        TeacherCache::open(&c, &f.meta, &expect(&f)).unwrap(),
    );
    let seqs: Vec<usize> = (0..TokenShards::open(&f.tokens, "train").unwrap().len()).collect();
    let (_, lp16, lse16, _) = sparse(cache16.targets("train", &seqs, &Device::Cpu).unwrap());
    let (_, lp32, lse32, _) = sparse(cache32.targets("train", &seqs, &Device::Cpu).unwrap());
    // The top-1 log-prob and the logsumexp of each position (ids may swap at near-ties).
    for row in 0..lse16.len() {
        assert!((lse16[row] - lse32[row]).abs() < 0.05, "row {row}");
        assert!((lp16[row * 4] - lp32[row * 4]).abs() < 0.05, "row {row}");
    }
}
