//! The group norm's forward on the CPU in f32, in two passes over the activation, both split
//! over candle's pool: per-channel sums (vectorised along the contiguous channels, folded into
//! f64 group totals every few rows), then `x a + s` per channel (the statistics and the affine
//! folded into one scale and shift), optionally with the SiLU that follows every resnet's norm.
//! The composite it replaces made a dozen passes, each a separate tensor.

use std::sync::Mutex;

use super::simd::vectorized;

/// Rows whose per-channel sums stay in f32 before they are folded into the f64 totals.
const FOLD_ROWS: usize = 64;

/// What one call normalises: `x` is `[batch * positions, channels]`, channels-last.
#[derive(Debug, Clone, Copy)]
pub(super) struct Problem {
    pub(super) batch: usize,
    pub(super) groups: usize,
    pub(super) eps: f64,
    /// Apply SiLU to the result.
    pub(super) silu: bool,
}

/// `GroupNorm(x) * w + b` (then SiLU when asked) for channels-last `x`.
pub(super) fn forward(x: &[f32], w: &[f32], b: &[f32], p: Problem) -> Vec<f32> {
    let channels = w.len();
    let mut out = vec![0f32; x.len()];
    if x.is_empty() || channels == 0 || p.batch == 0 {
        return out;
    }
    let rows = x.len() / channels;
    let per_item = rows / p.batch;
    let per_group = channels / p.groups;
    let threads = super::matmul::pool_threads();
    // Row blocks: a few per thread, never across items.
    let block = per_item
        .div_ceil((2 * threads).div_ceil(p.batch))
        .clamp(1, per_item.max(1));
    let blocks_per_item = per_item.div_ceil(block);

    // Pass 1: per block, each group's sum and sum of squares.
    let partials: Vec<Mutex<Vec<(f64, f64)>>> = (0..p.batch * blocks_per_item)
        .map(|_| Mutex::new(Vec::new()))
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(partials.len(), |range| {
        let (mut sum, mut sq) = (vec![0f32; channels], vec![0f32; channels]);
        for t in range {
            let (item, blk) = (t / blocks_per_item, t % blocks_per_item);
            let first = item * per_item + blk * block;
            let last = (first + block).min((item + 1) * per_item);
            let mut totals = vec![(0f64, 0f64); p.groups];
            for fold in (first..last).step_by(FOLD_ROWS) {
                sum.fill(0.0);
                sq.fill(0.0);
                vectorized(
                    #[inline(always)]
                    || {
                        for row in x[fold * channels..(fold + FOLD_ROWS).min(last) * channels]
                            .chunks_exact(channels)
                        {
                            for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                                *s += v;
                                *q += v * v;
                            }
                        }
                    },
                );
                for (g, total) in totals.iter_mut().enumerate() {
                    let span = g * per_group..(g + 1) * per_group;
                    total.0 += sum[span.clone()].iter().map(|&v| f64::from(v)).sum::<f64>();
                    total.1 += sq[span].iter().map(|&v| f64::from(v)).sum::<f64>();
                }
            }
            if let Ok(mut slot) = partials[t].lock() {
                *slot = totals;
            }
        }
    });

    // Per item and channel: y = x * scale + shift.
    let count = (per_item * per_group) as f64;
    let mut affine = Vec::with_capacity(p.batch);
    for item in 0..p.batch {
        let mut totals = vec![(0f64, 0f64); p.groups];
        for blk in &partials[item * blocks_per_item..(item + 1) * blocks_per_item] {
            let part = blk.lock().map(|v| v.clone()).unwrap_or_default();
            for (t, (s, q)) in totals.iter_mut().zip(part) {
                t.0 += s;
                t.1 += q;
            }
        }
        let (mut scale, mut shift) = (vec![0f32; channels], vec![0f32; channels]);
        for (g, (s, q)) in totals.into_iter().enumerate() {
            let mean = s / count;
            let rstd = 1.0 / ((q / count - mean * mean).max(0.0) + p.eps).sqrt();
            for c in g * per_group..(g + 1) * per_group {
                let a = rstd * f64::from(w[c]);
                scale[c] = a as f32;
                shift[c] = (f64::from(b[c]) - mean * a) as f32;
            }
        }
        affine.push((scale, shift));
    }

    // Pass 2: normalise (and activate) block by block.
    // Each item's rows in blocks of its own: block `t` belongs to item `t / blocks_per_item`.
    let outputs: Vec<Mutex<&mut [f32]>> = out
        .chunks_mut(per_item * channels)
        .flat_map(|rows| rows.chunks_mut(block * channels))
        .map(Mutex::new)
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(outputs.len(), |range| {
        for t in range {
            let Ok(mut dst) = outputs[t].lock() else {
                continue;
            };
            let item = t / blocks_per_item;
            let start = (item * per_item + (t % blocks_per_item) * block) * channels;
            let (scale, shift) = &affine[item];
            let src = &x[start..start + dst.len()];
            vectorized(
                #[inline(always)]
                || {
                    for (d_row, s_row) in dst
                        .chunks_exact_mut(channels)
                        .zip(src.chunks_exact(channels))
                    {
                        for (((d, &v), &a), &s) in d_row.iter_mut().zip(s_row).zip(scale).zip(shift)
                        {
                            *d = v * a + s;
                        }
                        if p.silu {
                            d_row
                                .iter_mut()
                                .for_each(|d| *d = super::activation::silu_f32(*d));
                        }
                    }
                },
            );
        }
    });
    drop(outputs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(batch: usize, groups: usize, silu: bool) -> Problem {
        Problem {
            batch,
            groups,
            eps: 0.0,
            silu,
        }
    }

    /// One item, two positions, two channels, one group: `x = [1, 2, 3, 4]` has mean 2.5 and
    /// variance 1.25, so `y = (x - 2.5) / sqrt(1.25) = [-1.3416, -0.4472, 0.4472, 1.3416]`, then
    /// `* w + b` per channel.
    #[test]
    fn a_group_by_hand() {
        let y = forward(
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 1.0],
            &[0.0, 0.0],
            problem(1, 1, false),
        );
        let want = [-1.341_640_8, -0.447_213_6, 0.447_213_6, 1.341_640_8];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        let y = forward(
            &[1.0, 2.0, 3.0, 4.0],
            &[2.0, 1.0],
            &[0.5, -1.0],
            problem(1, 1, false),
        );
        assert!((y[0] - (2.0 * -1.341_640_8 + 0.5)).abs() < 1e-6);
        assert!((y[3] - (1.341_640_8 - 1.0)).abs() < 1e-6);
        // Two groups of one channel: each channel over its positions, [1, 3] and [2, 4].
        let y = forward(
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 1.0],
            &[0.0, 0.0],
            problem(1, 2, false),
        );
        for (a, b) in y.iter().zip([-1.0, -1.0, 1.0, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        // SiLU of the same: y / (1 + e^-y).
        let y = forward(
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 1.0],
            &[0.0, 0.0],
            problem(1, 2, true),
        );
        let silu = |v: f32| v / (1.0 + (-v).exp());
        for (a, b) in y.iter().zip([silu(-1.0), silu(-1.0), silu(1.0), silu(1.0)]) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    /// Items are normalised apart, whatever the blocks: a batch of two where the second item is
    /// the first scaled and shifted normalises to the same values.
    #[test]
    fn items_are_normalised_apart_across_blocks() {
        let (positions, channels) = (1000, 12);
        let first: Vec<f32> = (0..positions * channels)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let second: Vec<f32> = first.iter().map(|v| 3.0 * v + 7.0).collect();
        let x = [first, second].concat();
        let (w, b) = (vec![1.0; channels], vec![0.0; channels]);
        let y = forward(&x, &w, &b, problem(2, 3, false));
        let (a, c) = y.split_at(positions * channels);
        let diff = a
            .iter()
            .zip(c)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "items differ by {diff}");
    }
}
