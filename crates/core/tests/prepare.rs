//! `distill prepare` and the shard reader on generated fixtures with the tiny tokenizer.

use distill_core::prepare::{prepare, PrepareOptions};
use distill_core::shards::{BatchReader, TokenShards};
use distill_core::testing::tiny_tokenizer;
use std::path::{Path, PathBuf};

const DOCS: [&str; 3] = [
    "the cat sat on the mat and then the cat slept",
    "Unicode too: naïve café, 日本語, 🦀",
    "a third document\nwith two lines",
];

fn write_inputs(dir: &Path) -> Vec<PathBuf> {
    std::fs::write(dir.join("a.txt"), DOCS[0]).unwrap();
    std::fs::write(dir.join("b.txt"), DOCS[1]).unwrap();
    let line = serde_json::json!({"text": DOCS[2]}).to_string();
    std::fs::write(dir.join("c.jsonl"), format!("{line}\n\n")).unwrap();
    vec![dir.join("a.txt"), dir.join("b.txt"), dir.join("c.jsonl")]
}

fn opts(seq_len: usize) -> PrepareOptions {
    PrepareOptions {
        seq_len,
        shard_sequences: 3,
        ..Default::default()
    }
}

#[test]
fn round_trip_decodes_to_documents_joined_with_eos() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let inputs = write_inputs(dir.path());
    let out = dir.path().join("tokens");
    let meta = prepare(&tok, &inputs, &out, &opts(8), |_| {}).unwrap();
    let eos = tok.eos_id().unwrap();
    let mut expected = Vec::new();
    for d in DOCS {
        expected.extend(tok.encode(d, false).unwrap());
        expected.push(eos);
    }
    let train = &meta.splits["train"];
    assert_eq!(train.documents, 3);
    assert_eq!(train.sequences as usize, expected.len() / 8);
    assert!(
        train.shards.len() > 1,
        "small shards to exercise several files"
    );
    let shards = TokenShards::open(&out, "train").unwrap();
    let got: Vec<u32> = (0..shards.len()).flat_map(|i| shards.sequence(i)).collect();
    assert_eq!(got, expected[..got.len()]);
    // Decoding the packed ids gives the documents back, EOS between them.
    let text = tok.decode(&got, false).unwrap();
    let joined = DOCS.join("<|im_end|>") + "<|im_end|>";
    assert!(joined.starts_with(&text), "{text:?}");
    assert_eq!(meta.tokenizer_hash, tok.hash());
    assert_eq!(meta.sources.len(), 3);
    assert!(meta.sources.iter().all(|s| s.sha256.len() == 64));
}

#[test]
fn shuffling_is_deterministic_and_cursor_restores() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let inputs = write_inputs(dir.path());
    let out = dir.path().join("tokens");
    prepare(&tok, &inputs, &out, &opts(4), |_| {}).unwrap();
    let shards = TokenShards::open(&out, "train").unwrap();
    assert!(shards.len() >= 8);
    let batches = |seed| {
        let mut r = BatchReader::new(&shards, seed);
        (0..5).map(|_| r.next_batch(3)).collect::<Vec<_>>()
    };
    assert_eq!(batches(1), batches(1));
    assert_ne!(batches(1), batches(2));
    // Save the cursor mid-run (and across an epoch boundary), restore it in a new reader.
    let mut a = BatchReader::new(&shards, 7);
    for _ in 0..shards.len() / 2 + 1 {
        a.next_batch(2);
    }
    let cursor = a.cursor();
    let rest: Vec<_> = (0..4).map(|_| a.next_batch(3)).collect();
    let mut b = BatchReader::new(&shards, 7);
    b.restore(cursor);
    let again: Vec<_> = (0..4).map(|_| b.next_batch(3)).collect();
    assert_eq!(rest, again);
    assert!(b.cursor().epoch >= 1, "the test should cross an epoch");
}

#[test]
fn valid_dirs_and_fraction_go_to_validation() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("valid")).unwrap();
    std::fs::write(
        dir.path().join("valid/v.txt"),
        "held out text for validation",
    )
    .unwrap();
    std::fs::write(dir.path().join("t.txt"), DOCS[0]).unwrap();
    let line = serde_json::json!({"text": DOCS[1]}).to_string();
    std::fs::write(dir.path().join("valid.jsonl"), format!("{line}\n")).unwrap();
    let out = dir.path().join("tokens");
    let meta = prepare(&tok, &[dir.path().to_path_buf()], &out, &opts(4), |_| {}).unwrap();
    assert_eq!(meta.splits["valid"].documents, 2);
    assert_eq!(meta.splits["train"].documents, 1);
    // With blank-line documents and fraction 1.0, everything is held out.
    std::fs::write(dir.path().join("t.txt"), "one\n\ntwo\n\nthree").unwrap();
    let o = PrepareOptions {
        valid_fraction: 1.0,
        blank_line_docs: true,
        ..opts(4)
    };
    let meta = prepare(&tok, &[dir.path().join("t.txt")], &out, &o, |_| {}).unwrap();
    assert_eq!(meta.splits["valid"].documents, 3);
    assert_eq!(meta.splits["train"].documents, 0);
}

fn fails(inputs: &[PathBuf], out: &Path, o: &PrepareOptions, expect: &[&str]) {
    let err = prepare(&tiny_tokenizer(), inputs, out, o, |_| {})
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    for e in expect {
        assert!(err.contains(e), "{err:?} should contain {e:?}");
    }
}

#[test]
fn bad_inputs_are_named_and_nothing_half_written_remains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokens");
    // Invalid UTF-8: file and byte offset; --lossy replaces and counts.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"good text \xff\xfe more").unwrap();
    fails(
        std::slice::from_ref(&bad),
        &out,
        &opts(4),
        &["bad.txt", "invalid UTF-8 at byte offset 10", "--lossy"],
    );
    let meta = prepare(
        &tiny_tokenizer(),
        &[bad],
        &out,
        &PrepareOptions {
            lossy: true,
            ..opts(4)
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(
        meta.sources[0].replaced, 2,
        "one U+FFFD per invalid byte, as Python's errors='replace'"
    );
    std::fs::remove_dir_all(&out).unwrap();
    // Empty inputs.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    fails(&[empty], &out, &opts(4), &["empty inputs"]);
    let none = dir.path().join("nothing");
    std::fs::create_dir_all(&none).unwrap();
    fails(&[none], &out, &opts(4), &["no .txt or .jsonl files"]);
    // A JSONL line that is not JSON: file:line.
    let j = dir.path().join("bad.jsonl");
    std::fs::write(&j, "{\"text\": \"fine\"}\n{not json\n").unwrap();
    fails(
        std::slice::from_ref(&j),
        &out,
        &opts(4),
        &["bad.jsonl:2", "not JSON"],
    );
    // A missing text field.
    std::fs::write(&j, "{\"body\": \"no text here\"}\n").unwrap();
    fails(&[j], &out, &opts(4), &["bad.jsonl:1", "no 'text' field"]);
    assert!(!out.exists(), "failed runs leave no output dir");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(
        !leftovers
            .iter()
            .any(|n| n.to_string_lossy().contains("tokens")),
        "{leftovers:?}"
    );
}

#[test]
fn refuses_to_overwrite_shards_of_another_tokenizer_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = write_inputs(dir.path());
    let out = dir.path().join("tokens");
    prepare(&tiny_tokenizer(), &inputs, &out, &opts(4), |_| {}).unwrap();
    // Pretend the shards were made by another tokenizer.
    let meta_path = out.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).unwrap();
    let other = text.replace(&tiny_tokenizer().hash(), &"0".repeat(64));
    std::fs::write(&meta_path, &other).unwrap();
    fails(
        &inputs,
        &out,
        &opts(4),
        &["tokens", "another tokenizer", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(&meta_path).unwrap(),
        other,
        "old shards untouched"
    );
    prepare(
        &tiny_tokenizer(),
        &inputs,
        &out,
        &PrepareOptions {
            force: true,
            ..opts(4)
        },
        |_| {},
    )
    .unwrap();
}

#[test]
fn truncated_shard_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = write_inputs(dir.path());
    let out = dir.path().join("tokens");
    prepare(&tiny_tokenizer(), &inputs, &out, &opts(4), |_| {}).unwrap();
    let shard = out.join("train/shard-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
    let err = TokenShards::open(&out, "train").err().unwrap().to_string();
    assert!(
        err.contains("shard-00000.bin") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn chat_messages_are_rendered_with_the_template() {
    let tok = tiny_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]});
    let f = dir.path().join("chat.jsonl");
    std::fs::write(&f, format!("{line}\n")).unwrap();
    let out = dir.path().join("tokens");
    let meta = prepare(&tok, &[f], &out, &opts(4), |_| {}).unwrap();
    let shards = TokenShards::open(&out, "train").unwrap();
    let ids: Vec<u32> = (0..shards.len()).flat_map(|i| shards.sequence(i)).collect();
    let text = tok.decode(&ids, false).unwrap();
    let want =
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_end|>";
    assert!(
        want.starts_with(&text) && text.contains("assistant\nhello"),
        "{text:?}"
    );
    assert_eq!(meta.sources[0].documents, 1);
}
