//! The teacher's products at bf16 on AMX (`ops::bf16::gemm`, input rounding included) against
//! f32 (`ops::gemm_f32`), on the shapes of a SmolLM2-135M forward at batch 8 × 256.
//!
//! cargo run --release -p distill-core --example bf16_gemm -- [ROWS]   (2048)

use distill_core::ops::{bf16, gemm_f32};
use std::time::Instant;

/// Best of 5 of `f` in seconds.
fn best(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROWS: an integer"))
        .unwrap_or(2048);
    let threads = candle_core::utils::get_num_threads();
    if !bf16::available() {
        println!("this CPU or OS has no AMX-BF16");
        return;
    }
    println!("{m} rows, {threads} threads; GFLOP/s, best of 5");
    println!(
        "{:28} {:>8} {:>8} {:>6}",
        "product (in → out)", "f32", "bf16", "ratio"
    );
    let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    for (what, k, n) in [
        ("q,k,v (576 → 960)", 576, 960),
        ("o_proj (576 → 576)", 576, 576),
        ("gate,up (576 → 3072)", 576, 3072),
        ("down (1536 → 576)", 1536, 576),
        ("lm_head (576 → 49152)", 576, 49152),
    ] {
        let (x, w) = (fill(m * k, 0.37), fill(n * k, 0.11));
        let mut y = vec![0f32; m * n];
        let f32_s = best(|| {
            gemm_f32(
                m,
                n,
                k,
                &mut y,
                (1, n),
                false,
                &x,
                (1, k),
                &w,
                (k, 1),
                threads,
            )
        });
        let packed = bf16::PackedBf16::pack(&w, n, k);
        let bf16_s = best(|| bf16::gemm(&x, m, &packed, &mut y, false));
        let gf = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        println!(
            "{what:28} {:8.1} {:8.1} {:5.2}×",
            gf(f32_s),
            gf(bf16_s),
            f32_s / bf16_s
        );
    }
}
