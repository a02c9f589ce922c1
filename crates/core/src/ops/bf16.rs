//! bf16 products on Intel AMX: `A B` with `B` rounded to bf16 and packed into AMX tiles, `A`
//! rounded to bf16 per call (round to nearest even), products summed in f32 by the tile unit. A
//! frozen weight (the teacher's, `--teacher-precision bf16`) is packed once; a trained student's
//! operands — weights, activations, gradients, given by strides — are packed per product
//! (`train.precision = "bf16"`, through `ops::product`). On a CPU with AMX-BF16 the tile multiply
//! runs several times faster than the f32 FMA units, so this is the one way past the f32
//! roofline; the price is the two roundings (about 3 significant decimal digits of each input),
//! which `distill bench cache --teacher-precision bf16` measures as a KL to the f32 forward and
//! BENCHMARKS.md (seventh pass) as a healed student's perplexity.
//!
//! Each output element is one fixed sequence of tile multiplies over K, whatever the thread
//! count or the row range a thread takes, so results are reproducible (the cache's byte-identical
//! rerun holds at bf16 too).

use candle_core::{Result, Tensor};
use std::sync::OnceLock;

/// Rows and f32 columns of a C tile; rows of an A tile and k-pairs of a B tile.
const TILE: usize = 16;
/// bf16 values along K in one A-tile row (64 bytes).
const KB: usize = 32;
/// Rows of A rounded to bf16 and kept in L2 while every column block of the task streams past.
const ROW_CHUNK: usize = 256;

/// Whether this CPU and OS run AMX-BF16 tile code (asked once: CPUID, then the Linux permission
/// to use the tile state, which a process must request before its first tile instruction).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

/// Whether bf16 products can run for tensors on `device`: the CPU, with [`available`] AMX; else
/// the one error every bf16 entry point gives.
pub fn require(device: &candle_core::Device) -> Result<()> {
    if !device.is_cpu() {
        candle_core::bail!("bf16 products run on the CPU's AMX tiles, not on a GPU; use f32")
    }
    if !available() {
        candle_core::bail!(
            "bf16 products need AMX-BF16, which this CPU or OS does not offer; use f32"
        )
    }
    Ok(())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    // A safe fn in recent Rust, unsafe in older releases (rust-version 1.85).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU.
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 when the kernel grants it.
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a raw arch_prctl syscall; it reads no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

pub use crate::vexp::bf16_bits as to_bf16;

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A right operand in bf16 — a weight (out × in) of `x Wᵀ`, or any B (k × n) as `n` outputs over
/// `k` inputs — laid out as AMX B tiles: for each block of 16 outputs, for each block of 32
/// inputs, a 16 × 64-byte tile whose row `r` holds, for each output `n` of the block, the pair
/// (W[n][2r], W[n][2r+1]) of that input block. Outputs and inputs are padded with zeros to whole
/// blocks (32 outputs, 32 inputs).
pub struct PackedBf16 {
    data: Vec<u16>,
    out: usize,
    inp: usize,
    /// Input blocks of 32.
    kblocks: usize,
}

/// Where W[n][k] of a 16-output panel's block `n` lies in the panel: input block k / 32's tile,
/// row (k mod 32) / 2 of it, the pair of output n, the pair's element k mod 2.
#[inline(always)]
fn in_panel(n: usize, k: usize) -> usize {
    let (kb, kk) = (k / KB, k % KB);
    kb * TILE * KB + (kk / 2) * KB + n * 2 + kk % 2
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16({} × {})", self.out, self.inp)
    }
}

/// Where k pair `q` of a panel's first output lies, in u32 cells ([`in_panel`] / 2 at n = 0).
#[inline(always)]
fn pair_cell(q: usize) -> usize {
    (q / TILE) * TILE * TILE + (q % TILE) * TILE
}

/// Rows `2q` and `2q + 1` of a source whose rows start every `stride` elements, `len` values
/// each, as bf16 pairs ([`crate::vexp::to_bf16_pairs`]): an operand's k pair `q`. Past an odd
/// `k` the second row is zeros.
fn round_pair(src: &[f32], stride: usize, k: usize, q: usize, out: &mut [u32]) {
    let len = out.len();
    let lo = &src[2 * q * stride..][..len];
    if 2 * q + 1 < k {
        crate::vexp::to_bf16_pairs(lo, &src[(2 * q + 1) * stride..][..len], out);
    } else {
        crate::vexp::to_bf16_pairs(lo, lo, out);
        out.iter_mut().for_each(|v| *v &= 0xffff);
    }
}

impl PackedBf16 {
    /// Packs `w` (out × in, row-major).
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(w.len(), out * inp, "PackedBf16::pack: weight length");
        Self::pack_strided(w, inp, out, (inp, 1))
    }

    /// Packs the right operand `B` (k × n) of a product `A B`, element `B[i][j]` at
    /// `b[i·rs + j·cs]` (column stride `cs`, row stride `rs`): as a weight of `n` outputs over
    /// `k` inputs. A weight (out × in, row-major) in `x Wᵀ` is `(in, out, (in, 1))`.
    pub fn pack_strided(b: &[f32], k: usize, n: usize, (cs, rs): (usize, usize)) -> Self {
        use rayon::prelude::*;
        assert!(
            b.len() >= super::span(cs, rs, k, n),
            "PackedBf16::pack_strided: operand too short"
        );
        let kblocks = k.div_ceil(KB);
        let nblocks = n.div_ceil(2 * TILE) * 2;
        let panel = kblocks * TILE * KB; // u16 per 16-output panel
        let mut data = vec![0u16; nblocks * panel];
        if panel == 0 {
            // No inputs: nothing to pack (every product is 0).
            return Self {
                data,
                out: n,
                inp: k,
                kblocks,
            };
        }
        if cs == 1 && n > 0 && data.as_ptr().align_offset(4) == 0 {
            // Rows of B run along the outputs (an activation): each k pair's two rows read as
            // two streams and interleaved in one vector pass, then copied into every panel's
            // cells for that pair (a panel-major walk would read one cache line per row).
            let cells = SendPtr(data.as_mut_ptr().cast::<u32>());
            let half_panel = panel / 2;
            (0..k.div_ceil(2))
                .into_par_iter()
                .with_min_len(8)
                .for_each_init(
                    || vec![0u32; n],
                    |pairs, q| {
                        round_pair(b, rs, k, q, pairs);
                        let at = pair_cell(q);
                        for (nb, chunk) in pairs.chunks(TILE).enumerate() {
                            // SAFETY: panel nb's cells of pair q, inside `data` (n ≤ panels ×
                            // 16, q < kblocks × 16); no other pair writes them.
                            unsafe {
                                let dst = cells.ptr().add(nb * half_panel + at);
                                std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len());
                            }
                        }
                    },
                );
            return Self {
                data,
                out: n,
                inp: k,
                kblocks,
            };
        }
        data.par_chunks_mut(panel).enumerate().for_each(|(nb, p)| {
            let n0 = nb * TILE;
            let width = TILE.min(n.saturating_sub(n0));
            if width == 0 {
                return;
            }
            // The panel as (k-pair, output) u32 cells: a pair's two bf16 values side by side.
            // SAFETY: any bit pattern is a valid u16 and u32; the u32 middle is aligned.
            let plen = p.len();
            let (pre, cells, _) = unsafe { p.align_to_mut::<u32>() };
            if pre.is_empty() && 2 * cells.len() == plen && rs == 1 {
                // Columns of B run along K (a weight, out × in): each output's row rounded in
                // one vector pass, then its k pairs moved into their cells.
                let half = k.div_ceil(2);
                let mut row = vec![0u16; 2 * half];
                for j in 0..width {
                    crate::vexp::to_bf16(&b[(n0 + j) * cs..][..k], &mut row[..k]);
                    for q in 0..half {
                        cells[pair_cell(q) + j] = row[2 * q] as u32 | (row[2 * q + 1] as u32) << 16;
                    }
                }
            } else {
                for i in 0..k {
                    for j in 0..width {
                        p[in_panel(j, i)] = to_bf16(b[i * rs + (n0 + j) * cs]);
                    }
                }
            }
        });
        Self {
            data,
            out: n,
            inp: k,
            kblocks,
        }
    }

    /// Packs a 2-D f32 weight tensor (out, in).
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let v = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self::pack(&v, out, inp))
    }

    /// The weight back in f32 (the bf16 values), (out × in): what the products multiply by.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        let panel = self.kblocks * TILE * KB;
        for row in 0..self.out {
            let (nb, n) = (row / TILE, row % TILE);
            for k in 0..self.inp {
                w[row * self.inp + k] = from_bf16(self.data[nb * panel + in_panel(n, k)]);
            }
        }
        w
    }
}

/// `y := [y +] x Wᵀ` for `x` (m × in, row-major f32) and `y` (m × out): `accumulate` keeps `y`'s
/// values as the products' starting point (a residual stream). Runs on rayon's pool, each task a
/// range of 32-output blocks. Panics without AMX ([`available`]) or on mismatched lengths.
pub fn gemm(x: &[f32], m: usize, w: &PackedBf16, y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), m * w.inp, "bf16 gemm: input length");
    gemm_strided(m, x, (1, w.inp), w, y, accumulate);
}

/// [`gemm`] for a left operand `A` (m × in) given by strides: `A[i][k]` at `a[i·rs + k·cs]` (a
/// transposed or interleaved operand of a backward product). `y` (m × out) is row-major.
pub fn gemm_strided(
    m: usize,
    a: &[f32],
    (cs, rs): (usize, usize),
    w: &PackedBf16,
    y: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(y.len(), m * w.out, "bf16 gemm: output length");
    // SAFETY: y holds the m × out elements written.
    unsafe { gemm_raw(Lhs { a, cs, rs }, m, w, y.as_mut_ptr(), accumulate) }
}

/// A new (m × out) `x Wᵀ`, in memory that is not zero-filled first: every element is written.
pub fn gemm_alloc(x: &[f32], m: usize, w: &PackedBf16) -> Vec<f32> {
    assert_eq!(x.len(), m * w.inp, "bf16 gemm: input length");
    gemm_strided_alloc(m, x, (1, w.inp), w)
}

/// [`gemm_strided`] into fresh memory that is not zero-filled first.
pub fn gemm_strided_alloc(
    m: usize,
    a: &[f32],
    (cs, rs): (usize, usize),
    w: &PackedBf16,
) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(m * w.out);
    // SAFETY: without `accumulate` the kernel writes each of the m × out elements and reads
    // none, before `set_len` makes them visible.
    unsafe {
        gemm_raw(Lhs { a, cs, rs }, m, w, y.as_mut_ptr(), false);
        y.set_len(m * w.out);
    }
    y
}

/// A product's left operand in f32: element (i, k) at `a[i·rs + k·cs]`.
struct Lhs<'a> {
    a: &'a [f32],
    cs: usize,
    rs: usize,
}

impl Lhs<'_> {
    /// The operand's `m` rows (K = `k`) rounded into `dst` (m rows of `kp` ≥ k, zeros after K).
    fn round_into(&self, m: usize, k: usize, kp: usize, dst: &mut [u16]) {
        use rayon::prelude::*;
        let (a, cs, rs) = (self.a, self.cs, self.rs);
        if cs == 1 {
            dst.par_chunks_mut(kp)
                .enumerate()
                .for_each(|(i, d)| round_row(&a[i * rs..][..k], d));
        } else if rs == 1 && dst.as_ptr().align_offset(4) == 0 {
            // A transposed operand (its columns contiguous): each k pair's two source rows read
            // as two streams and interleaved in one vector pass, then moved into the m rows.
            // Eight pairs at a time, so that each row gets 32 contiguous bytes per visit.
            const PAIRS: usize = 8;
            let cells = SendPtr(dst.as_mut_ptr().cast::<u32>());
            let (half_kp, half) = (kp / 2, k.div_ceil(2));
            (0..half.div_ceil(PAIRS)).into_par_iter().for_each_init(
                || vec![0u32; PAIRS * m],
                |pairs, block| {
                    let q0 = block * PAIRS;
                    let count = PAIRS.min(half - q0);
                    for (qq, out) in pairs.chunks_mut(m).take(count).enumerate() {
                        round_pair(a, cs, k, q0 + qq, out);
                    }
                    for i in 0..m {
                        // SAFETY: row i's pairs q0.., inside `dst` (i < m, 2(q0 + count) ≤
                        // kp); no other block writes them.
                        let row = unsafe { cells.ptr().add(i * half_kp + q0) };
                        for qq in 0..count {
                            unsafe { *row.add(qq) = pairs[qq * m + i] };
                        }
                    }
                },
            );
            let end = 2 * k.div_ceil(2);
            dst.par_chunks_mut(kp).for_each(|d| d[end..].fill(0));
        } else {
            dst.par_chunks_mut(kp).enumerate().for_each(|(i, d)| {
                for (kk, v) in d[..k].iter_mut().enumerate() {
                    *v = to_bf16(a[i * rs + kk * cs]);
                }
                d[k..].fill(0);
            });
        }
    }
}

/// [`gemm`] into `y`, which must hold m × out elements (read only when `accumulate`).
unsafe fn gemm_raw(x: Lhs, m: usize, w: &PackedBf16, y: *mut f32, accumulate: bool) {
    use rayon::prelude::*;
    assert!(available(), "bf16 gemm: this CPU or OS has no AMX-BF16");
    assert!(
        x.a.len() >= super::span(x.cs, x.rs, m, w.inp),
        "bf16 gemm: input too short"
    );
    if m == 0 || w.out == 0 {
        return;
    }
    if w.inp == 0 {
        if !accumulate {
            std::ptr::write_bytes(y, 0, m * w.out);
        }
        return;
    }
    let kp = w.kblocks * KB;
    let mp = m.div_ceil(2 * TILE) * 2 * TILE;
    // x in bf16, rows and K padded with zeros to whole tiles, in a buffer this thread keeps
    // (fresh pages each call would cost the kernel's page clearing). Taken out for the call, so
    // a call nested on this thread (a rayon worker running another task while it waits) finds
    // none and allocates its own.
    thread_local! {
        static A: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut buf = A.take();
    if buf.len() < mp * kp {
        buf = vec![0u16; mp * kp];
    }
    let a = &mut buf[..mp * kp];
    let (rows, pad) = a.split_at_mut(m * kp);
    x.round_into(m, w.inp, kp, rows);
    pad.fill(0);
    let pairs = w.out.div_ceil(2 * TILE); // 32-output blocks
    let threads = rayon::current_num_threads().max(1);
    let per_task = pairs.div_ceil(threads * 4).max(1);
    let y = SendPtr(y);
    let a = &*a;
    (0..pairs.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let (p0, p1) = (t * per_task, ((t + 1) * per_task).min(pairs));
        // SAFETY: AMX is available (asserted); tasks write disjoint column blocks of y.
        unsafe { run_task(a, kp, m, w, p0..p1, y, accumulate) };
    });
    A.set(buf);
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the tasks sharing it write disjoint elements.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that a closure captures the wrapper, not its field).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// One row of f32 into bf16, zeros after it to the end of `dst`.
fn round_row(src: &[f32], dst: &mut [u16]) {
    let (head, tail) = dst.split_at_mut(src.len());
    crate::vexp::to_bf16(src, head);
    tail.fill(0);
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows × 64 bytes
/// (tmm0–3 the C blocks, tmm4–5 two A tiles, tmm6–7 two B tiles).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = TILE as u8;
        }
        Self(c)
    }
}

/// The output blocks `pairs` (each 32 wide) of `y` for all `m` rows, from `a` (bf16, rows padded
/// to 32, row length `kp`).
#[cfg(target_arch = "x86_64")]
unsafe fn run_task(
    a: &[u16],
    kp: usize,
    m: usize,
    w: &PackedBf16,
    pairs: std::ops::Range<usize>,
    y: SendPtr<f32>,
    accumulate: bool,
) {
    let cfg = TileConfig::new();
    // SAFETY: the configuration is this thread's tile state until `tilerelease` below; nothing
    // between (no rayon call, no other tile code) changes it.
    std::arch::asm!(
        "ldtilecfg [{}]",
        in(reg) cfg.0.as_ptr(),
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, readonly)
    );
    let panel = w.kblocks * TILE * KB;
    let mut edge = [0f32; 4 * TILE * TILE];
    for r0 in (0..m).step_by(ROW_CHUNK) {
        let r1 = (r0 + ROW_CHUNK).min(m);
        for pair in pairs.clone() {
            let b0 = w.data.as_ptr().add(2 * pair * panel);
            let b1 = b0.add(panel);
            if pair + 1 < pairs.end {
                // The next pair's panels into L2 while this pair's blocks run: a weight wider
                // than the caches (the lm_head's 57 MB) streams from memory one pair at a time.
                let next = b1.add(panel) as *const i8;
                for line in (0..2 * panel * 2).step_by(64) {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        next.add(line),
                    );
                }
            }
            let c0 = pair * 2 * TILE;
            for i0 in (r0..r1).step_by(2 * TILE) {
                let a0 = a.as_ptr().add(i0 * kp);
                let full = i0 + 2 * TILE <= m && c0 + 2 * TILE <= w.out;
                let (c, ldc) = if full {
                    (y.0.add(i0 * w.out + c0), w.out)
                } else {
                    // A partial block: through a 32 × 32 buffer holding y's part of it.
                    edge.fill(0.0);
                    if accumulate {
                        for i in 0..(m - i0).min(2 * TILE) {
                            for j in 0..(w.out - c0).min(2 * TILE) {
                                edge[i * 2 * TILE + j] = *y.0.add((i0 + i) * w.out + c0 + j);
                            }
                        }
                    }
                    (edge.as_mut_ptr(), 2 * TILE)
                };
                block(a0, kp, b0, b1, w.kblocks, c, ldc, accumulate || !full);
                if !full {
                    for i in 0..(m - i0).min(2 * TILE) {
                        for j in 0..(w.out - c0).min(2 * TILE) {
                            *y.0.add((i0 + i) * w.out + c0 + j) = edge[i * 2 * TILE + j];
                        }
                    }
                }
            }
        }
    }
    std::arch::asm!(
        "tilerelease",
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, nomem)
    );
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_task(
    _: &[u16],
    _: usize,
    _: usize,
    _: &PackedBf16,
    _: std::ops::Range<usize>,
    _: SendPtr<f32>,
    _: bool,
) {
    unreachable!("AMX is x86_64 only")
}

/// One 32 × 32 block of C (f32, row stride `ldc` elements) from 32 rows of A (bf16, row stride
/// `kp` elements) and two B panels, over `kblocks` blocks of 32 inputs; C starts from its values
/// (`load`) or from zero. One `asm!` from the first tile load to the stores, so no tile
/// register's content crosses an asm boundary (all eight are declared clobbered); the tile
/// configuration it runs under is the task's ([`run_task`] loads it once: `ldtilecfg` per block
/// cost a quarter of the throughput).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block(
    a0: *const u16,
    kp: usize,
    b0: *const u16,
    b1: *const u16,
    kblocks: usize,
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    let lda = kp * 2;
    let a1 = a0.add(TILE * kp);
    let ldc_b = ldc * 4;
    let c1 = c.add(TILE);
    let c2 = c.add(TILE * ldc);
    let c3 = c2.add(TILE);
    std::arch::asm!(
        "test {load}, {load}",
        "jz 3f",
        "tileloadd tmm0, [{c0} + {ldc}*1]",
        "tileloadd tmm1, [{c1} + {ldc}*1]",
        "tileloadd tmm2, [{c2} + {ldc}*1]",
        "tileloadd tmm3, [{c3} + {ldc}*1]",
        "jmp 2f",
        "3:",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {lda}*1]",
        "tileloadd tmm6, [{b0} + {s64}*1]",
        "tileloadd tmm5, [{a1} + {lda}*1]",
        "tileloadd tmm7, [{b1} + {s64}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c3} + {ldc}*1], tmm3",
        load = in(reg) load as usize,
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a1 => _,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        n = inout(reg) kblocks => _,
        lda = in(reg) lda,
        s64 = in(reg) 64usize,
        c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
        ldc = in(reg) ldc_b,
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack)
    );
}

/// `[r +] x Wᵀ` over the last dimension of an f32 CPU tensor `x` (…, in) for a packed weight →
/// (…, out); `r` (…, out) is the starting value (a residual stream). None unless AMX is
/// available and the inputs are f32 CPU tensors of those shapes that need no gradient.
pub fn linear(x: &Tensor, w: &PackedBf16, r: Option<&Tensor>) -> Result<Option<Tensor>> {
    let fits = available()
        && super::cpu_f32(&[x])
        && !super::needs_grad(&[x])
        && x.rank() >= 1
        && x.dims().last() == Some(&w.inp)
        && r.is_none_or(|r| !r.track_op() && super::residual_fits(x, r, w.out));
    if !fits {
        return Ok(None);
    }
    let m = x.elem_count() / w.inp.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = w.out;
    let x = x.contiguous()?;
    let y = {
        let (s, l) = x.storage_and_layout();
        let xs = super::storage_f32(&s, l, "bf16 linear: input")?;
        match r {
            Some(r) => {
                let mut y = r.flatten_all()?.to_vec1::<f32>()?;
                gemm(xs, m, w, &mut y, true);
                y
            }
            None => gemm_alloc(xs, m, w),
        }
    };
    Ok(Some(Tensor::from_vec(y, dims, x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The vectorised row conversion equals the scalar one (the same expression, compiled for
    /// vector lanes), special values, exact ties and NaNs included.
    #[test]
    fn row_rounding_equals_the_scalar_one() {
        let mut x = lcg(11, 1000);
        x.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::MIN,
            f32::MAX,
            0.0,
            -0.0,
            1e-40,
        ]);
        // Exact ties (to even: down, then up), both signs, and a signalling NaN.
        let tie = 1.0 / 256.0;
        x.extend([1.0 + tie, 1.0 + 3.0 * tie, -1.0 - tie, -1.0 - 3.0 * tie]);
        x.push(f32::from_bits(0x7f80_0001));
        let mut row = vec![0u16; x.len()];
        crate::vexp::to_bf16(&x, &mut row);
        for (v, got) in x.iter().zip(&row) {
            assert_eq!(*got, to_bf16(*v), "{v}");
        }
        assert_eq!(&row[1008..1012], &[0x3f80, 0x3f82, 0xbf80, 0xbf82]);
        assert!(from_bf16(row[1012]).is_nan());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between bf16 1 and 1 + 2⁻⁷: to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: up, to the even one.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn packing_round_trips_the_bf16_values() {
        let (out, inp) = (37, 45);
        let w = lcg(1, out * inp);
        let back = PackedBf16::pack(&w, out, inp).unpack();
        for (a, b) in w.iter().zip(&back) {
            assert_eq!(from_bf16(to_bf16(*a)), *b);
        }
    }

    /// The tile products equal an f64 sum of the bf16-rounded inputs to f32 accuracy, at shapes
    /// with partial row, output and input blocks, from zero and from a residual.
    #[test]
    fn products_match_the_rounded_inputs_in_f64() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return;
        }
        for (m, out, inp) in [
            (1, 16, 32),
            (33, 47, 70),
            (64, 96, 576),
            (300, 130, 1000),
            (5, 9, 0),
        ] {
            let x = lcg(2, m * inp);
            let w = lcg(3, out * inp);
            let r = lcg(4, m * out);
            let packed = PackedBf16::pack(&w, out, inp);
            for accumulate in [false, true] {
                let mut y = if accumulate {
                    r.clone()
                } else {
                    vec![7.0; m * out]
                };
                gemm(&x, m, &packed, &mut y, accumulate);
                for i in 0..m {
                    for j in 0..out {
                        let mut s = if accumulate {
                            r[i * out + j] as f64
                        } else {
                            0.0
                        };
                        let mut mag = s.abs();
                        for k in 0..inp {
                            let p = from_bf16(to_bf16(x[i * inp + k])) as f64
                                * from_bf16(to_bf16(w[j * inp + k])) as f64;
                            s += p;
                            mag += p.abs();
                        }
                        let got = y[i * out + j] as f64;
                        assert!(
                            (got - s).abs() <= 1e-6 * mag + 1e-30,
                            "({m},{out},{inp}) acc={accumulate} [{i},{j}]: {got} vs {s}"
                        );
                    }
                }
            }
        }
    }

    /// Both operands given by strides, in every layout the packing and the rounding take a
    /// path for (rows of A contiguous or transposed, B as a weight or as an activation, neither),
    /// at odd K and partial blocks: the products equal an f64 sum of the rounded inputs, and the
    /// packed B unpacks to the rounded operand.
    #[test]
    fn strided_operands_match_the_rounded_inputs_in_f64() {
        // (rows, cols, pad) → (cs, rs) and the buffer length, for each layout.
        let layouts = |rows: usize, cols: usize| {
            [
                ((1, cols + 3), (rows - 1) * (cols + 3) + cols), // row-major, padded rows
                ((rows + 5, 1), (cols - 1) * (rows + 5) + rows), // transposed, padded
                (
                    (2, 2 * cols + 1),
                    (rows - 1) * (2 * cols + 1) + 2 * cols - 1,
                ), // interleaved
            ]
        };
        for (m, n, k) in [(33, 47, 71), (64, 96, 64), (5, 130, 1), (20, 17, 300)] {
            for (ai, ((acs, ars), alen)) in layouts(m, k).into_iter().enumerate() {
                for (bi, ((bcs, brs), blen)) in layouts(k, n).into_iter().enumerate() {
                    let a = lcg(20 + ai as u64, alen);
                    let b = lcg(30 + bi as u64, blen);
                    let at = |i: usize, kk: usize| from_bf16(to_bf16(a[i * ars + kk * acs]));
                    let bt = |kk: usize, j: usize| from_bf16(to_bf16(b[kk * brs + j * bcs]));
                    let packed = PackedBf16::pack_strided(&b, k, n, (bcs, brs));
                    let back = packed.unpack();
                    for kk in 0..k {
                        for j in 0..n {
                            assert_eq!(back[j * k + kk], bt(kk, j), "B layout {bi} ({kk},{j})");
                        }
                    }
                    if !available() {
                        // The packing is checked; the products need the tiles.
                        continue;
                    }
                    let r = lcg(40, m * n);
                    for accumulate in [false, true] {
                        let mut y = if accumulate {
                            r.clone()
                        } else {
                            vec![3.0; m * n]
                        };
                        gemm_strided(m, &a, (acs, ars), &packed, &mut y, accumulate);
                        let fresh = gemm_strided_alloc(m, &a, (acs, ars), &packed);
                        for i in 0..m {
                            for j in 0..n {
                                let (mut s, mut mag) = (0f64, 0f64);
                                if accumulate {
                                    s = r[i * n + j] as f64;
                                    mag = s.abs();
                                }
                                for kk in 0..k {
                                    let p = at(i, kk) as f64 * bt(kk, j) as f64;
                                    s += p;
                                    mag += p.abs();
                                }
                                let what = format!("({m},{n},{k}) A {ai} B {bi} [{i},{j}]");
                                let got = y[i * n + j] as f64;
                                assert!(
                                    (got - s).abs() <= 1e-6 * mag + 1e-30,
                                    "{what}: {got} vs {s}"
                                );
                                if !accumulate {
                                    assert_eq!(fresh[i * n + j], y[i * n + j], "{what}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each left-operand path (rows, transposed, neither) writes every element of its rows —
    /// the rounded values, zeros after K — over a buffer holding stale NaN patterns (the kept
    /// per-thread buffer's earlier contents must never reach a product).
    #[test]
    fn left_operands_overwrite_every_element() {
        let (m, k, kp) = (37, 71, 96);
        for (cs, rs, len) in [
            (1, k + 2, (m - 1) * (k + 2) + k),
            (m + 1, 1, (k - 1) * (m + 1) + m),
            (2, 2 * k, (m - 1) * 2 * k + 2 * k - 1),
        ] {
            let a = lcg(50, len);
            let mut dst = vec![0xFFFFu16; m * kp];
            Lhs { a: &a, cs, rs }.round_into(m, k, kp, &mut dst);
            for i in 0..m {
                for kk in 0..kp {
                    let want = if kk < k {
                        to_bf16(a[i * rs + kk * cs])
                    } else {
                        0
                    };
                    assert_eq!(dst[i * kp + kk], want, "({cs},{rs}) [{i},{kk}]");
                }
            }
        }
    }

    /// The same products on 1 and 3 threads, bit for bit.
    #[test]
    fn products_do_not_depend_on_the_thread_count() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return;
        }
        let (m, out, inp) = (200, 500, 576);
        let (x, w) = (lcg(5, m * inp), lcg(6, out * inp));
        let packed = PackedBf16::pack(&w, out, inp);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let mut y = vec![0f32; m * out];
            pool.install(|| gemm(&x, m, &packed, &mut y, false));
            y
        };
        let (one, three) = (run(1), run(3));
        assert!(one
            .iter()
            .zip(&three)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    /// The tensor op: shapes, the residual, and declining a tracked input.
    #[test]
    fn linear_takes_tensors_and_a_residual() -> Result<()> {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return Ok(());
        }
        let dev = candle_core::Device::Cpu;
        let x = Tensor::from_vec(lcg(7, 2 * 5 * 64), (2, 5, 64), &dev)?;
        let w = Tensor::from_vec(lcg(8, 40 * 64), (40, 64), &dev)?;
        let r = Tensor::from_vec(lcg(9, 2 * 5 * 40), (2, 5, 40), &dev)?;
        let packed = PackedBf16::from_tensor(&w)?;
        let wq = Tensor::from_vec(packed.unpack(), (40, 64), &dev)?;
        let xq = x.flatten_all()?.to_vec1::<f32>()?;
        let xq: Vec<f32> = xq.iter().map(|v| from_bf16(to_bf16(*v))).collect();
        let xq = Tensor::from_vec(xq, (2, 5, 64), &dev)?;
        let want = xq.broadcast_matmul(&wq.t()?)?;
        let got = linear(&x, &packed, None)?.expect("fits");
        assert_eq!(got.dims(), &[2, 5, 40]);
        let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let got = linear(&x, &packed, Some(&r))?.expect("fits");
        let diff = (got - (want + &r)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let var = candle_core::Var::from_tensor(&x)?;
        assert!(linear(var.as_tensor(), &packed, None)?.is_none());
        Ok(())
    }
}
