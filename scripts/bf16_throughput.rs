//! Peak f32 FMA against AVX-512 BF16 dot-product throughput on one core: whether bf16 kernels
//! built on `vdpbf16ps` could beat the f32 GEMM on this CPU (BENCHMARKS.md, "fourth pass").
//! Twelve independent accumulators per loop hide the latency of either instruction.
//!
//! Run with: rustc -O -C target-cpu=native scripts/bf16_throughput.rs -o /tmp/bf16_throughput \
//!   && /tmp/bf16_throughput
use std::arch::x86_64::*;
use std::time::Instant;

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16(n: usize) -> f32 {
    let a: __m512bh = std::mem::transmute(_mm512_set1_ps(1.0001));
    let b: __m512bh = std::mem::transmute(_mm512_set1_ps(0.9999));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    let s = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
    _mm512_reduce_add_ps(s)
}

#[target_feature(enable = "avx512f")]
unsafe fn fma(n: usize) -> f32 {
    let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(a, b, *x);
        }
    }
    let s = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
    _mm512_reduce_add_ps(s)
}

fn main() {
    if !is_x86_feature_detected!("avx512bf16") {
        println!("this CPU has no AVX-512 BF16");
        return;
    }
    let n = 100_000_000;
    let t = Instant::now();
    let x = unsafe { fma(n) };
    let f = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let y = unsafe { dpbf16(n) };
    let b = t.elapsed().as_secs_f64();
    // FLOPs per loop: 12 FMAs of 16 lanes, 2 each; 12 dot products of 16 lanes × 2 pairs, 2 each.
    let gf = |flops: f64, s: f64| n as f64 * flops / s / 1e9;
    println!(
        "one core: f32 FMA {:.1} GFLOP/s, bf16 dot product {:.1} GFLOP/s (checksums {x} {y})",
        gf(12.0 * 32.0, f),
        gf(12.0 * 64.0, b)
    );
}
