//! Rows of logits on the host: the top-k and log-softmax of one row, as the teacher cache stores
//! them, eval scores them and the API returns them, and the KL between two rows.

/// Top-k of one row of raw logits, most likely first (ties: lower id first), written to `ids` and
/// `logprobs` (len k each); returns the row's logsumexp (vectorised exponentials, f32 lanes over
/// blocks added in f64: [`crate::vexp::lse`]).
pub fn row_topk(row: &[f32], ids: &mut [u32], logprobs: &mut [f32]) -> f32 {
    let k = ids.len().min(row.len());
    if k == 0 {
        return crate::vexp::lse(row, 1.0);
    }
    // A sorted (descending) list of the best k. Once it is full, a block of 16 candidates is
    // looked at only if one of them beats the k-th best (a branch-free test the compiler
    // vectorises): most blocks of a 49,152-wide row fail it.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (c, block) in row.chunks(16).enumerate() {
        if best.len() == k {
            let kth = best[k - 1].0;
            if !block.iter().fold(false, |any, &x| any | (x > kth)) {
                continue;
            }
        }
        for (j, &x) in block.iter().enumerate() {
            if best.len() == k {
                // (NaN never enters a full list: it compares false.)
                if x.partial_cmp(&best[k - 1].0) != Some(std::cmp::Ordering::Greater) {
                    continue;
                }
                best.pop();
            }
            let at = best.partition_point(|b| b.0 >= x);
            best.insert(at, (x, (c * 16 + j) as u32));
        }
    }
    // The best is the row's largest, which `lse` would look for in a pass of its own (unless a
    // NaN took a place in the list before it was full).
    let lse = if best.iter().any(|b| b.0.is_nan()) {
        crate::vexp::lse(row, 1.0)
    } else {
        let m = best[0].0;
        if m == f32::NEG_INFINITY {
            m
        } else {
            m + crate::vexp::sum_exp(row, 1.0, -m).ln() as f32
        }
    };
    for (j, (x, i)) in best.into_iter().enumerate() {
        ids[j] = i;
        logprobs[j] = x - lse;
    }
    lse
}

/// KL(p‖q) = Σ p (log p − log q) for raw logit rows with known logsumexps, over the first
/// `min(len)` ids (vocabularies that differ by padding).
pub fn kl_row(t: &[f32], t_lse: f32, s: &[f32], s_lse: f32) -> f64 {
    let v = t.len().min(s.len());
    let mut kl = 0f64;
    for j in 0..v {
        let lp = t[j] - t_lse;
        let lq = s[j] - s_lse;
        kl += (lp.exp() * (lp - lq)) as f64;
    }
    kl.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_a_hand_built_pair() {
        // p = softmax([0, ln 3]) = [1/4, 3/4], q = softmax([0, 0]) = [1/2, 1/2]:
        // KL(p‖q) = 1/4·ln(1/2) + 3/4·ln(3/2) = −0.1732868 + 0.3040988 = 0.1308120.
        let t = [0.0f32, 3f32.ln()];
        let s = [0.0f32, 0.0];
        let lse = |r: &[f32]| row_topk(r, &mut [], &mut []);
        let kl = kl_row(&t, lse(&t), &s, lse(&s));
        assert!((kl - 0.130_812_0).abs() < 1e-6, "{kl}");
        assert!(kl_row(&t, lse(&t), &t, lse(&t)).abs() < 1e-7);
    }

    #[test]
    fn topk_is_sorted_with_ties_by_id_and_lse_matches_f64() {
        // 1,000 logits with a remainder past the 16-lane blocks; a tie between ids 3 and 700.
        let mut row: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.731).sin() * 6.0)
            .collect();
        row[3] = 9.0;
        row[700] = 9.0;
        row[42] = 11.0;
        let (mut ids, mut lps) = (vec![0u32; 4], vec![0f32; 4]);
        let lse = row_topk(&row, &mut ids, &mut lps);
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let want = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        assert!((lse as f64 - want).abs() < 1e-5, "{lse} vs {want}");
        assert_eq!(&ids[..3], &[42, 3, 700]);
        for (&i, &lp) in ids.iter().zip(&lps) {
            assert_eq!(lp, row[i as usize] - lse);
        }
        assert!(lps.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(
            lse,
            crate::vexp::lse(&row, 1.0),
            "the same logsumexp as `lse`"
        );
    }

    #[test]
    fn topk_of_a_long_row_is_the_sorted_prefix() {
        // 5,003 values with many repeats (ties resolved by id) and a remainder block of 11.
        let row: Vec<f32> = (0..5003)
            .map(|i| (((i * 7919) % 1000) as f32 * 0.01).round())
            .collect();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for k in [1, 16, 64] {
            let (mut ids, mut lps) = (vec![0u32; k], vec![0f32; k]);
            let lse = row_topk(&row, &mut ids, &mut lps);
            let want: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want, "k = {k}");
            assert_eq!(lse, crate::vexp::lse(&row, 1.0));
        }
    }
}
