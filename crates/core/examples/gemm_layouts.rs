//! The fused lm-head loss's three products on one chunk, timed through `ops::gemm_f32` as the
//! loss calls it, with the projection's gradient in both layouts: (V × d) as dzᵀ·h, and the
//! transposed (d × V) as hᵀ·dz, which the loss accumulates (BENCHMARKS.md, fifth pass).
//!
//! cargo run --release -p distill-core --example gemm_layouts -- [ROWS D V]   (682 256 49152)

use distill_core::ops::gemm_f32;
use std::time::Instant;

/// Best of 5 of `f`, as GFLOP/s of an (m × n × k) product.
fn time(what: &str, (m, n, k): (usize, usize, usize), mut f: impl FnMut()) {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (m * n * k) as f64 / best / 1e9;
    println!("{what:34} {gflops:7.1} GFLOP/s {:8.1} ms", best * 1e3);
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS D V: three integers"))
        .collect();
    let (m, d, v) = match args.as_slice() {
        [m, d, v] => (*m, *d, *v),
        _ => (682, 256, 49152),
    };
    let threads = candle_core::utils::get_num_threads();
    println!("chunk of {m} rows, d = {d}, V = {v}, {threads} threads");
    let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let (h, w, dz) = (fill(m * d, 0.37), fill(v * d, 0.11), fill(m * v, 0.07));
    let (mut z, mut dh, mut dw) = (vec![0f32; m * v], vec![0f32; m * d], vec![0f32; v * d]);
    time("z = h·Wᵀ (m × V)", (m, v, d), || {
        gemm_f32(
            m,
            v,
            d,
            &mut z,
            (1, v),
            false,
            &h,
            (1, d),
            &w,
            (d, 1),
            threads,
        )
    });
    time("dh = dz·W (m × d)", (m, d, v), || {
        gemm_f32(
            m,
            d,
            v,
            &mut dh,
            (1, d),
            false,
            &dz,
            (1, v),
            &w,
            (1, d),
            threads,
        )
    });
    time("dW += dzᵀ·h (V × d)", (v, d, m), || {
        gemm_f32(
            v,
            d,
            m,
            &mut dw,
            (1, d),
            true,
            &dz,
            (v, 1),
            &h,
            (1, d),
            threads,
        )
    });
    time("dWᵀ += hᵀ·dz (d × V)", (d, v, m), || {
        gemm_f32(
            d,
            v,
            m,
            &mut dw,
            (1, v),
            true,
            &h,
            (d, 1),
            &dz,
            (1, v),
            threads,
        )
    });
}
