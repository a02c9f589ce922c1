//! The converted HF dir gives the GGUF's own logits, checked against an implementation we did not
//! write: candle-transformers' quantized_llama on the same GGUF with CANDLE_DEQUANTIZE_ALL=1 (exact
//! f32 weights, interleaved rope on llama.cpp's permuted Q/K). It returns the last position only.
//! In its own test binary because CANDLE_DEQUANTIZE_ALL is read once per thread.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

#[test]
fn converted_logits_match_gguf_reference() {
    let (Some(dir), Some(gguf)) = (common::teacher_dir(), common::teacher_gguf()) else {
        return;
    };
    // SAFETY: set before any thread reads it; this binary has this one test.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let device = Device::Cpu;
    let mut file = std::fs::File::open(&gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut file, &device).unwrap();
    let (ours, _) = distill_core::load_model(&dir, &device).unwrap();
    let tok = distill_core::Tokenizer::from_dir(&dir).unwrap();
    for prompt in [
        "The capital of France is",
        "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "1, 1, 2, 3, 5, 8, 13,",
    ] {
        let ids = tok.encode(prompt, false).unwrap();
        let x = Tensor::new(ids.as_slice(), &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference.clear_kv_cache();
        let want = reference.forward(&x, 0).unwrap().squeeze(0).unwrap(); // (V,)
        let got = ours.forward(&x).unwrap().squeeze(0).unwrap();
        let got = got.get(ids.len() - 1).unwrap();
        let diff: f32 = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        eprintln!("{prompt:?}: max |Δ logits| = {diff:.2e}");
        assert!(diff <= 1e-3, "{prompt:?}: max |Δ logits| = {diff}");
        assert_eq!(
            got.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            want.argmax(0).unwrap().to_scalar::<u32>().unwrap()
        );
    }
}
