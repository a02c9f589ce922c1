//! Rows of logits on the host: the top-k and log-softmax of one row, as the teacher cache stores
//! them, eval scores them and the API returns them.

/// Top-k of one row of raw logits, most likely first (ties: lower id first), written to `ids` and
/// `logprobs` (len k each); returns the row's logsumexp (accumulated in f64).
pub fn row_topk(row: &[f32], ids: &mut [u32], logprobs: &mut [f32]) -> f32 {
    let k = ids.len().min(row.len());
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    if k == 0 {
        return lse;
    }
    // A sorted (descending) list of the best k; most candidates fail the first comparison.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k {
            // (NaN never enters: it compares false.)
            if x.partial_cmp(&best[k - 1].0) != Some(std::cmp::Ordering::Greater) {
                continue;
            }
            best.pop();
        }
        let at = best.partition_point(|b| b.0 >= x);
        best.insert(at, (x, i as u32));
    }
    for (j, (x, i)) in best.into_iter().enumerate() {
        ids[j] = i;
        logprobs[j] = x - lse;
    }
    lse
}
