//! The group norm on the CPU in f32, forward and backward, in passes over the activation split
//! over candle's pool. Forward: per-channel sums (vectorised along the contiguous channels,
//! folded into f64 every few rows), then `x a + s` per channel (the statistics and the affine
//! folded into one scale and shift), optionally with the SiLU that follows every resnet's norm.
//! Backward: the same statistics, one pass of per-channel gradient sums, one multiply-add pass.
//! The composites they replace made a dozen passes each, every one a separate tensor, and the
//! scalar f64 backward before this one was a fifth of a tiny D3PO step's backward.

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

/// Rows in blocks, a few per thread and never across items: block `t` belongs to item
/// `t / per_item_blocks`.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    channels: usize,
    per_item: usize,
    rows: usize,
    per_item_blocks: usize,
}

impl Blocks {
    fn of(len: usize, channels: usize, batch: usize) -> Self {
        let per_item = len / channels / batch;
        let threads = super::matmul::pool_threads();
        let rows = per_item
            .div_ceil((2 * threads).div_ceil(batch))
            .clamp(1, per_item.max(1));
        Self {
            channels,
            per_item,
            rows,
            per_item_blocks: per_item.div_ceil(rows),
        }
    }

    /// The rows of block `t`, as a range of rows of the whole activation.
    fn rows_of(&self, t: usize) -> std::ops::Range<usize> {
        let item = t / self.per_item_blocks;
        let first = item * self.per_item + (t % self.per_item_blocks) * self.rows;
        first..(first + self.rows).min((item + 1) * self.per_item)
    }

    /// `out` cut into the blocks' rows, each behind a lock taken by the worker given it (and
    /// taken out of it by the last pass, through [`Self::each`]).
    fn split<'a>(&self, out: &'a mut [f32]) -> Vec<Mutex<Option<&'a mut [f32]>>> {
        out.chunks_mut(self.per_item * self.channels)
            .flat_map(|rows| rows.chunks_mut(self.rows * self.channels))
            .map(|block| Mutex::new(Some(block)))
            .collect()
    }

    /// The blocks' lengths in values, in order (the pieces of a new output).
    fn lengths(&self, len: usize) -> impl Iterator<Item = usize> {
        imagegen_gemm::nested_pieces(
            len,
            self.per_item * self.channels,
            self.rows * self.channels,
        )
    }

    fn count(&self, batch: usize) -> usize {
        batch * self.per_item_blocks
    }

    /// `f(item, dst, src)` for each of the `count` blocks, `dst` being `take(t)` (block `t` of an
    /// output, skipped when `None`) and `src` the same rows of `x`, over candle's pool; `f` runs
    /// inside [`vectorized`], so it must be `#[inline(always)]`.
    fn each<'a>(
        &self,
        count: usize,
        take: impl Fn(usize) -> Option<&'a mut [f32]> + Sync,
        x: &[f32],
        f: impl Fn(usize, &mut [f32], &[f32]) + Sync,
    ) {
        candle_core::utils::barrier_pool().execute_chunked(count, |range| {
            for t in range {
                let Some(dst) = take(t) else {
                    continue;
                };
                let src = &x[self.rows_of(t).start * self.channels..][..dst.len()];
                vectorized(
                    #[inline(always)]
                    || f(t / self.per_item_blocks, dst, src),
                );
            }
        });
    }
}

/// Per block, two sums per channel over its rows, kept in f32 for [`FOLD_ROWS`] rows at a time
/// and folded into f64: `fold(rows, a, b)` adds those rows' terms to the zeroed `a` and `b`.
fn channel_sums(
    blocks: Blocks,
    batch: usize,
    fold: impl Fn(std::ops::Range<usize>, &mut [f32], &mut [f32]) + Sync,
) -> Vec<Vec<(f64, f64)>> {
    let channels = blocks.channels;
    let partials: Vec<Mutex<Vec<(f64, f64)>>> = (0..blocks.count(batch))
        .map(|_| Mutex::new(Vec::new()))
        .collect();
    candle_core::utils::barrier_pool().execute_chunked(partials.len(), |range| {
        let (mut a, mut b) = (vec![0f32; channels], vec![0f32; channels]);
        for t in range {
            let rows = blocks.rows_of(t);
            let mut totals = vec![(0f64, 0f64); channels];
            for first in rows.clone().step_by(FOLD_ROWS) {
                a.fill(0.0);
                b.fill(0.0);
                fold(first..(first + FOLD_ROWS).min(rows.end), &mut a, &mut b);
                for ((t, &a), &b) in totals.iter_mut().zip(&a).zip(&b) {
                    t.0 += f64::from(a);
                    t.1 += f64::from(b);
                }
            }
            if let Ok(mut slot) = partials[t].lock() {
                *slot = totals;
            }
        }
    });
    partials
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_default())
        .collect()
}

/// Per item, the per-channel totals of its blocks' sums.
fn item_totals(partials: &[Vec<(f64, f64)>], blocks: Blocks, item: usize) -> Vec<(f64, f64)> {
    let mut totals = vec![(0f64, 0f64); blocks.channels];
    for part in &partials[item * blocks.per_item_blocks..(item + 1) * blocks.per_item_blocks] {
        for (t, (a, b)) in totals.iter_mut().zip(part) {
            t.0 += a;
            t.1 += b;
        }
    }
    totals
}

/// Per item and channel, the group's `(mean, 1 / std)`.
fn statistics(x: &[f32], p: Problem, blocks: Blocks) -> Vec<Vec<(f64, f64)>> {
    let channels = blocks.channels;
    let partials = channel_sums(blocks, p.batch, |rows, sum, sq| {
        vectorized(
            #[inline(always)]
            || {
                for row in x[rows.start * channels..rows.end * channels].chunks_exact(channels) {
                    for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                        *s += v;
                        *q += v * v;
                    }
                }
            },
        );
    });
    let per_group = channels / p.groups;
    let count = (blocks.per_item * per_group) as f64;
    (0..p.batch)
        .map(|item| {
            let totals = item_totals(&partials, blocks, item);
            let mut stats = vec![(0f64, 0f64); channels];
            for (group, chunk) in totals.chunks(per_group).enumerate() {
                let (s, q) = chunk
                    .iter()
                    .fold((0f64, 0f64), |acc, t| (acc.0 + t.0, acc.1 + t.1));
                let mean = s / count;
                let rstd = 1.0 / ((q / count - mean * mean).max(0.0) + p.eps).sqrt();
                stats[group * per_group..(group + 1) * per_group].fill((mean, rstd));
            }
            stats
        })
        .collect()
}

/// Per item, the per-channel scale and shift the norm and its affine fold into:
/// `y = x * scale + shift`.
fn scale_shift(stats: &[Vec<(f64, f64)>], w: &[f32], b: &[f32]) -> Vec<(Vec<f32>, Vec<f32>)> {
    stats
        .iter()
        .map(|item| {
            item.iter()
                .zip(w.iter().zip(b))
                .map(|(&(mean, rstd), (&w, &b))| {
                    let a = rstd * f64::from(w);
                    (a as f32, (f64::from(b) - mean * a) as f32)
                })
                .unzip()
        })
        .collect()
}

/// `GroupNorm(x) * w + b` (then SiLU when asked) for channels-last `x`.
pub(super) fn forward(x: &[f32], w: &[f32], b: &[f32], p: Problem) -> Vec<f32> {
    let channels = w.len();
    if x.is_empty() || channels == 0 || p.batch == 0 {
        return vec![0f32; x.len()];
    }
    let blocks = Blocks::of(x.len(), channels, p.batch);
    let affine = scale_shift(&statistics(x, p, blocks), w, b);
    // Each block zeroed by the worker that writes it, not the whole output up front.
    let (out, ()) = imagegen_gemm::fresh_buffer(x.len(), blocks.lengths(x.len()), |outputs| {
        blocks.each(
            outputs.len(),
            |t| outputs.take(t),
            x,
            #[inline(always)]
            |item, dst, src| {
                let (scale, shift) = &affine[item];
                for (d_row, s_row) in dst
                    .chunks_exact_mut(channels)
                    .zip(src.chunks_exact(channels))
                {
                    for (((d, &v), &a), &s) in d_row.iter_mut().zip(s_row).zip(scale).zip(shift) {
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
    });
    out
}

/// The gradients of [`forward`] given the output's gradient `dy`, in one buffer: `dx`, then
/// `dw`, then `db`.
///
/// With `g` the gradient at the norm's affine output (`dy`, or `dy * silu'(z)` with SiLU) and
/// `xhat = (x - mean) * rstd`: `db = sum g`, `dw = sum g xhat`, and per group
/// `dx = rstd (g w - mean_k(g w) - xhat mean_k(g w xhat))`. Both group means come from the
/// per-channel sums of `g` and `g xhat` (one pass, which also writes `g` into `dx`); the second
/// pass is then one multiply-add per element, `dx = g P + x Q + R` per channel.
pub(super) fn backward(x: &[f32], w: &[f32], b: &[f32], dy: &[f32], p: Problem) -> Vec<f32> {
    let channels = w.len();
    let mut packed = vec![0f32; x.len() + 2 * channels];
    if x.is_empty() || channels == 0 || p.batch == 0 {
        return packed;
    }
    let (dx, dw_db) = packed.split_at_mut(x.len());
    let (dw, db) = dw_db.split_at_mut(channels);
    let blocks = Blocks::of(x.len(), channels, p.batch);
    let stats = statistics(x, p, blocks);
    let affine = scale_shift(&stats, w, b);
    // xhat = x * r + m per channel, as f32.
    let normal: Vec<(Vec<f32>, Vec<f32>)> = stats
        .iter()
        .map(|item| {
            item.iter()
                .map(|&(mean, rstd)| (rstd as f32, (-mean * rstd) as f32))
                .unzip()
        })
        .collect();

    // Pass 1: g into dx (with SiLU), and per block the channel sums of g and g * xhat.
    let outputs = blocks.split(dx);
    let partials = channel_sums(blocks, p.batch, |rows, g_sum, gx_sum| {
        let t = block_of(blocks, rows.start);
        let Ok(mut block) = outputs[t].lock() else {
            return;
        };
        let Some(dst) = block.as_deref_mut() else {
            return;
        };
        let item = t / blocks.per_item_blocks;
        let (r, m) = &normal[item];
        let (scale, shift) = &affine[item];
        let local = (rows.start - blocks.rows_of(t).start) * channels;
        let span = rows.start * channels..rows.end * channels;
        let dst = &mut dst[local..local + span.len()];
        vectorized(
            #[inline(always)]
            || {
                // Plain zipped loops, the SiLU's branch outside them: indexed, the loop stayed
                // scalar (ten times the forward's time).
                for ((g_row, x_row), dy_row) in dst
                    .chunks_exact_mut(channels)
                    .zip(x[span.clone()].chunks_exact(channels))
                    .zip(dy[span.clone()].chunks_exact(channels))
                {
                    if p.silu {
                        for ((((g, &v), &d), &a), &s) in g_row
                            .iter_mut()
                            .zip(x_row)
                            .zip(dy_row)
                            .zip(scale)
                            .zip(shift)
                        {
                            *g = super::activation::silu_grad_f32(v * a + s, d);
                        }
                    } else {
                        g_row.copy_from_slice(dy_row);
                    }
                    for (((((gs, gxs), &g), &v), &r), &m) in g_sum
                        .iter_mut()
                        .zip(gx_sum.iter_mut())
                        .zip(g_row.iter())
                        .zip(x_row)
                        .zip(r)
                        .zip(m)
                    {
                        *gs += g;
                        *gxs += g * (v * r + m);
                    }
                }
            },
        );
    });

    // Per item: the group means, folded into P, Q, R per channel; dw and db summed over items.
    let per_group = channels / p.groups;
    let count = (blocks.per_item * per_group) as f64;
    let mut coefficients = Vec::with_capacity(p.batch);
    let (mut dw64, mut db64) = (vec![0f64; channels], vec![0f64; channels]);
    for (item, item_stats) in stats.iter().enumerate() {
        let totals = item_totals(&partials, blocks, item);
        let (mut pc, mut qc, mut rc) = (
            vec![0f32; channels],
            vec![0f32; channels],
            vec![0f32; channels],
        );
        for group in 0..p.groups {
            let span = group * per_group..(group + 1) * per_group;
            let (mut mean_gw, mut mean_gwx) = (0f64, 0f64);
            for c in span.clone() {
                mean_gw += f64::from(w[c]) * totals[c].0;
                mean_gwx += f64::from(w[c]) * totals[c].1;
            }
            let (mean_gw, mean_gwx) = (mean_gw / count, mean_gwx / count);
            for c in span {
                let (mean, rstd) = item_stats[c];
                pc[c] = (rstd * f64::from(w[c])) as f32;
                qc[c] = (-rstd * rstd * mean_gwx) as f32;
                rc[c] = (-rstd * mean_gw + mean * rstd * rstd * mean_gwx) as f32;
            }
        }
        for (c, &(g, gx)) in totals.iter().enumerate() {
            db64[c] += g;
            dw64[c] += gx;
        }
        coefficients.push((pc, qc, rc));
    }
    for c in 0..channels {
        dw[c] = dw64[c] as f32;
        db[c] = db64[c] as f32;
    }

    // Pass 2: dx = g P + x Q + R, in place.
    blocks.each(
        outputs.len(),
        |t| outputs[t].lock().ok().and_then(|mut block| block.take()),
        x,
        #[inline(always)]
        |item, dst, src| {
            let (pc, qc, rc) = &coefficients[item];
            for (d_row, x_row) in dst
                .chunks_exact_mut(channels)
                .zip(src.chunks_exact(channels))
            {
                for ((((d, &v), &p), &q), &r) in d_row.iter_mut().zip(x_row).zip(pc).zip(qc).zip(rc)
                {
                    *d = *d * p + v * q + r;
                }
            }
        },
    );
    drop(outputs);
    packed
}

/// The block holding row `row`.
fn block_of(blocks: Blocks, row: usize) -> usize {
    let item = row / blocks.per_item;
    item * blocks.per_item_blocks + (row % blocks.per_item) / blocks.rows
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
