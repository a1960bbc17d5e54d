//! A layer's new output buffer, zeroed piece by piece by the threads that then write it.
//!
//! `vec![0.0; n]` zeroes a layer's whole output on the calling thread before the pool fills it:
//! in a profile of the tiny 4-image pipeline that serial pass was about 9% of the main thread's
//! time (page faults included), and it streams the buffer out of cache just before the workers
//! write it again. [`fresh_buffer`] hands out the buffer's pieces instead; each piece is zeroed
//! by the thread that takes it, right before it writes it (in parallel, and in cache), or, for a
//! piece that is one matrix product, not at all: OpenBLAS writes the product straight into the
//! fresh memory ([`Pieces::take_product`]).
//!
//! Sound by construction: a piece becomes a `&mut [f32]` only after it is zeroed (or BLAS stored
//! every value of it), and whatever
//! piece no one took is zeroed when the fill returns, so every value of the buffer is initialised
//! before its length is set. The pieces' borrows cannot outlive the fill (`for<'a>`).

use std::mem::MaybeUninit;
use std::sync::Mutex;

use crate::{GemmError, MatRef};

/// The pieces of a buffer being built by [`fresh_buffer`]: each taken at most once, by index.
#[derive(Debug)]
pub struct Pieces<'a> {
    slots: Vec<Mutex<Option<&'a mut [MaybeUninit<f32>]>>>,
}

impl<'a> Pieces<'a> {
    /// How many pieces there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there is no piece (an empty buffer).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Piece `i`, zeroed, the first time it is asked for; `None` after that or out of range.
    pub fn take(&self, i: usize) -> Option<&'a mut [f32]> {
        Some(zeroed(self.take_uninit(i)?))
    }

    /// Piece `i` holding `a b` (row-major, `a.rows x b.cols`, which must be the piece's size),
    /// the first time it is asked for; `Ok(None)` after that or out of range. With OpenBLAS the
    /// product is written straight into the fresh memory (BLAS stores all of `C` when it does
    /// not accumulate, so zeroing it first would be a pass for nothing); otherwise the piece is
    /// zeroed and [`crate::sgemm`] fills it.
    pub fn take_product(
        &self,
        i: usize,
        a: MatRef<'_>,
        b: MatRef<'_>,
    ) -> Result<Option<&'a mut [f32]>, GemmError> {
        let Some(piece) = self.take_uninit(i) else {
            return Ok(None);
        };
        if piece.len() != a.rows.saturating_mul(b.cols) {
            let len = piece.len();
            zeroed(piece);
            return Err(GemmError::Shape(format!(
                "a {}x{} product does not fill a piece of {len} values",
                a.rows, b.cols
            )));
        }
        if crate::product_uninit(&a, &b, piece) {
            return Ok(Some(assume_written(piece)));
        }
        let c = zeroed(piece);
        crate::sgemm(a, b, c, b.cols)?;
        Ok(Some(c))
    }

    fn take_uninit(&self, i: usize) -> Option<&'a mut [MaybeUninit<f32>]> {
        self.slots.get(i)?.lock().ok()?.take()
    }
}

fn zeroed(piece: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in piece.iter_mut() {
        v.write(0.0);
    }
    assume_written(piece)
}

/// `piece` as the values it holds. Private, and called only on a piece every element of which
/// was just written: by [`zeroed`], or by BLAS in [`crate::product_uninit`].
#[allow(unsafe_code)]
fn assume_written(piece: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the callers above wrote every element; `MaybeUninit<f32>` has `f32`'s layout, and
    // the borrow is handed on unchanged.
    unsafe { &mut *(piece as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A `len`-value buffer cut into pieces of `piece_lens` values (at least one each), in order (a
/// last piece takes whatever they leave; lengths past the end are cut short), which `fill` writes
/// through [`Pieces::take`] or [`Pieces::take_product`]; pieces it does not take are zeros. Returns the buffer and `fill`'s result.
#[allow(unsafe_code)]
pub fn fresh_buffer<R>(
    len: usize,
    piece_lens: impl IntoIterator<Item = usize>,
    fill: impl for<'a> FnOnce(&Pieces<'a>) -> R,
) -> (Vec<f32>, R) {
    let mut buffer: Vec<f32> = Vec::with_capacity(len);
    let result = {
        let mut rest = &mut buffer.spare_capacity_mut()[..len];
        let mut slots = Vec::new();
        for n in piece_lens {
            if rest.is_empty() {
                break;
            }
            let cut = n.clamp(1, rest.len());
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(cut);
            slots.push(Mutex::new(Some(piece)));
            rest = tail;
        }
        if !rest.is_empty() {
            slots.push(Mutex::new(Some(rest)));
        }
        let pieces = Pieces { slots };
        let result = fill(&pieces);
        for slot in pieces.slots {
            // A poisoned lock still holds its piece: zero it all the same.
            let piece = slot.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Some(piece) = piece {
                zeroed(piece);
            }
        }
        result
    };
    // SAFETY: the pieces cover `..len` of the capacity without overlap (split in order from
    // it), and each was zeroed either when taken or above, so all `len` values are initialised.
    unsafe { buffer.set_len(len) };
    (buffer, result)
}

/// Piece lengths for a buffer of `len` values made of blocks of `outer` values (the last may be
/// shorter), each cut into pieces of `inner`: bands of rows within each batch item.
pub fn nested_pieces(len: usize, outer: usize, inner: usize) -> impl Iterator<Item = usize> {
    let (outer, inner) = (outer.max(1), inner.max(1));
    (0..len).step_by(outer).flat_map(move |start| {
        let block = outer.min(len - start);
        (0..block).step_by(inner).map(move |s| inner.min(block - s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::dense;

    #[test]
    fn taken_pieces_hold_what_was_written_and_the_rest_is_zero() {
        // 10 values in pieces of 3, 3, 3 and the remaining 1; pieces 0 and 2 written.
        let (buffer, taken) = fresh_buffer(10, [3, 3, 3], |pieces| {
            assert_eq!(pieces.len(), 4);
            for i in [0, 2] {
                let piece = pieces.take(i).expect("first take");
                assert_eq!(piece, &[0.0; 3]);
                piece.fill(i as f32 + 1.0);
            }
            assert!(pieces.take(0).is_none(), "a piece is handed out once");
            assert!(pieces.take(9).is_none());
            2
        });
        assert_eq!(taken, 2);
        assert_eq!(buffer, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 0.0]);
    }

    #[test]
    fn pieces_are_written_from_many_threads() {
        let (buffer, ()) = fresh_buffer(1000, std::iter::repeat(64), |pieces| {
            std::thread::scope(|s| {
                for t in 0..4 {
                    s.spawn(move || {
                        for i in (t..pieces.len()).step_by(4) {
                            if let Some(p) = pieces.take(i) {
                                p.iter_mut().for_each(|v| *v = i as f32);
                            }
                        }
                    });
                }
            });
        });
        let expected: Vec<f32> = (0..1000).map(|j| (j / 64) as f32).collect();
        assert_eq!(buffer, expected);
    }

    #[test]
    fn lengths_past_the_end_are_cut_and_empty_buffers_have_no_pieces() {
        let (buffer, n) = fresh_buffer(5, [4, 4, 4], |p| p.len());
        assert_eq!((buffer, n), (vec![0.0; 5], 2));
        let (buffer, n) = fresh_buffer(0, [4], |p| p.len());
        assert_eq!((buffer.len(), n), (0, 0));
    }

    #[test]
    fn a_product_taken_into_a_fresh_piece_is_the_product_on_both_backends() {
        // [[1, 2, 3], [4, 5, 6]] x [[1, 0], [0, 1], [1, 1]] = [[4, 5], [10, 11]].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let (a, b) = (dense(&a, 2, 3), dense(&b, 3, 2));
        let (buffer, ()) = fresh_buffer(12, [4, 4, 4], |pieces| {
            let first = pieces
                .take_product(0, a, b)
                .expect("fits")
                .expect("first take");
            assert_eq!(first, &[4.0, 5.0, 10.0, 11.0]);
            assert!(pieces.take_product(0, a, b).expect("taken").is_none());
            // `b` through a column-major view, which OpenBLAS also takes (transposed).
            let b_cols = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
            let b_view = MatRef {
                data: &b_cols,
                rows: 3,
                cols: 2,
                row_stride: 1,
                col_stride: 3,
            };
            pieces.take_product(2, a, b_view).expect("fits");
            let wrong = pieces.take_product(1, a, dense(&[1.0; 3], 3, 1));
            assert!(matches!(wrong, Err(GemmError::Shape(_))));
        });
        let expected = [
            4.0, 5.0, 10.0, 11.0, 0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 10.0, 11.0,
        ];
        assert_eq!(buffer, expected, "backend {}", crate::backend().name());
    }

    #[test]
    fn nested_pieces_cut_each_block_and_the_short_last_one() {
        // Blocks of 7 (7, 7, 3), each cut into 3s.
        let lens: Vec<usize> = nested_pieces(17, 7, 3).collect();
        assert_eq!(lens, [3, 3, 1, 3, 3, 1, 3]);
        assert_eq!(nested_pieces(0, 7, 3).count(), 0);
    }
}
