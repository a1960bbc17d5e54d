//! `C = A B` in f32 for the model's CPU path, on the calling thread: callers split the work over
//! their own threads (the model runs everything on candle's one pool; a BLAS or gemm pool of its
//! own beside it would put three busy threads on two cores).
//!
//! Two backends behind one checked, safe function: OpenBLAS, when the build found it (see
//! `build.rs`), and the pure-Rust gemm crate, which also takes the strided views OpenBLAS cannot.
//! The workspace forbids unsafe code; the two FFI-style calls below are the exception, each after
//! the bounds it relies on are checked, and so is [`fresh_buffer`], the kernels' output buffers
//! zeroed piece by piece by the threads that write them.

mod fresh;

pub use fresh::{Pieces, fresh_buffer, nested_pieces};

/// Why a product was refused (the caller's shapes, never the data).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GemmError {
    #[error("gemm: {0}")]
    Shape(String),
}

/// A read-only strided matrix over `data`: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    fn check(&self, what: &str) -> Result<(), GemmError> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(a, b)| a.checked_add(b));
        match last {
            Some(last) if last < self.data.len() => Ok(()),
            _ => Err(GemmError::Shape(format!(
                "{what}: a {}x{} view with strides ({}, {}) does not fit in {} elements",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
                self.data.len()
            ))),
        }
    }
}

/// Which implementation [`sgemm`] takes for views BLAS accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    OpenBlas,
    GemmCrate,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::OpenBlas => "openblas",
            Backend::GemmCrate => "gemm-crate",
        }
    }
}

/// The backend this build uses: OpenBLAS when linked, unless `IMAGEGEN_GEMM=gemm-crate` asks for
/// the pure-Rust one (read once; for side-by-side measurements).
pub fn backend() -> Backend {
    static CHOICE: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let forced = std::env::var("IMAGEGEN_GEMM").is_ok_and(|v| v == "gemm-crate");
        if cfg!(imagegen_openblas) && !forced {
            openblas::init();
            Backend::OpenBlas
        } else {
            Backend::GemmCrate
        }
    })
}

/// Whether OpenBLAS is linked into this build.
pub fn openblas_linked() -> bool {
    cfg!(imagegen_openblas)
}

/// `c = a b` on this thread, `c` row-major `a.rows x b.cols` with rows `ldc` apart (its other
/// elements are left alone).
pub fn sgemm(a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], ldc: usize) -> Result<(), GemmError> {
    product(a, b, c, ldc, false)
}

/// `c += a b` on this thread, `c` as in [`sgemm`] (gradients summed over bands of rows).
pub fn sgemm_accumulate(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
) -> Result<(), GemmError> {
    product(a, b, c, ldc, true)
}

/// Whether `c = a b` can be taken straight into uninitialised memory (OpenBLAS, dense enough
/// views): then `c` holds the product, every value initialised; otherwise nothing is written.
fn product_uninit(a: &MatRef<'_>, b: &MatRef<'_>, c: &mut [std::mem::MaybeUninit<f32>]) -> bool {
    backend() == Backend::OpenBlas
        && a.check("lhs").is_ok()
        && b.check("rhs").is_ok()
        && openblas::sgemm_uninit(a, b, c)
}

fn product(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), GemmError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(GemmError::Shape(format!(
            "{m}x{k} times {}x{n}: inner sizes differ",
            b.rows
        )));
    }
    a.check("lhs")?;
    b.check("rhs")?;
    let needed = (m.saturating_sub(1))
        .checked_mul(ldc)
        .and_then(|r| r.checked_add(n));
    let fits = m == 0 || n == 0 || (ldc >= n && needed.is_some_and(|e| e <= c.len()));
    if !fits {
        return Err(GemmError::Shape(format!(
            "the {m}x{n} result with rows {ldc} apart does not fit in {} elements",
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return Ok(());
    }
    if backend() == Backend::OpenBlas && openblas::sgemm(&a, &b, c, ldc, accumulate) {
        return Ok(());
    }
    gemm_crate(&a, &b, c, ldc, accumulate)
}

#[allow(unsafe_code)]
fn gemm_crate(
    a: &MatRef<'_>,
    b: &MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<(), GemmError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let stride = |s: usize| {
        isize::try_from(s).map_err(|_| GemmError::Shape(format!("stride {s} is too large")))
    };
    let (a_rs, a_cs, b_rs, b_cs, c_rs) = (
        stride(a.row_stride)?,
        stride(a.col_stride)?,
        stride(b.row_stride)?,
        stride(b.col_stride)?,
        stride(ldc)?,
    );
    // SAFETY: every element the product reads lies in `a.data` / `b.data` (checked by
    // `MatRef::check`) and every element it writes in `c` (checked by `sgemm`); the borrows keep
    // them alive and `c` exclusive for the call, which runs on this thread only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0f32, // c's coefficient, read only when accumulating
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(imagegen_openblas)]
#[allow(unsafe_code)]
mod openblas {
    use super::MatRef;

    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;

    unsafe extern "C" {
        fn cblas_sgemm(
            order: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn openblas_set_num_threads(n: i32);
    }

    /// One thread per call: the callers parallelise.
    pub(super) fn init() {
        // SAFETY: takes a plain integer; OpenBLAS documents it as callable at any time.
        unsafe { openblas_set_num_threads(1) }
    }

    /// `(transpose flag, leading dimension)` of a view CBLAS can take (one unit stride, the
    /// other at least the row length), or `None`.
    fn operand(m: &MatRef<'_>) -> Option<(i32, i32)> {
        let (trans, ld) = if m.col_stride == 1 && m.row_stride >= m.cols.max(1) {
            (NO_TRANS, m.row_stride)
        } else if m.row_stride == 1 && m.col_stride >= m.rows.max(1) {
            (TRANS, m.col_stride)
        } else {
            return None;
        };
        Some((trans, i32::try_from(ld).ok()?))
    }

    /// `c = a b` (or `c += a b`) when CBLAS can take the views and sizes (`false`, nothing
    /// written, otherwise).
    pub(super) fn sgemm(
        a: &MatRef<'_>,
        b: &MatRef<'_>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) -> bool {
        // SAFETY: the caller checked that the views fit their slices (`MatRef::check`) and that
        // `c` holds m rows of n at `ldc`.
        unsafe { product(a, b, c.as_mut_ptr(), ldc, accumulate) }
    }

    /// `c = a b` into `c`, uninitialised, of exactly `a.rows x b.cols` values (rows `b.cols`
    /// apart), each of which it then holds; `false`, nothing written, when CBLAS cannot take
    /// the views and sizes or the inner size is 0.
    pub(super) fn sgemm_uninit(
        a: &MatRef<'_>,
        b: &MatRef<'_>,
        c: &mut [std::mem::MaybeUninit<f32>],
    ) -> bool {
        if a.cols == 0 || b.rows != a.cols || a.rows.checked_mul(b.cols) != Some(c.len()) {
            return false;
        }
        // SAFETY: the views fit their slices (checked by the caller) and `c` holds exactly m
        // rows of n at `ldc = n`. With beta 0, BLAS defines C as output only ("C need not be
        // set on input"): OpenBLAS stores every element of the m x n block (its beta kernel
        // zeroes C before accumulating, its small-matrix kernels store each result) and never
        // reads what was there, so every value of `c` is initialised when it returns `true`.
        unsafe { product(a, b, c.as_mut_ptr().cast::<f32>(), b.cols, false) }
    }

    /// `c = a b` (beta 0) or `c += a b` (beta 1) through CBLAS; `false`, nothing written, when
    /// it cannot take the views or sizes.
    ///
    /// # Safety
    /// `a` and `b` fit their slices, and `c` points to `a.rows` rows of `b.cols` writable values
    /// `ldc` apart, exclusively for the call; `operand` checks that the leading dimensions
    /// describe those same views, and OpenBLAS touches nothing outside them.
    unsafe fn product(
        a: &MatRef<'_>,
        b: &MatRef<'_>,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) -> bool {
        let dims = [a.rows, b.cols, a.cols, ldc].map(|d| i32::try_from(d).ok());
        let (Some((ta, lda)), Some((tb, ldb)), [Some(m), Some(n), Some(k), Some(ldc)]) =
            (operand(a), operand(b), dims)
        else {
            return false;
        };
        // SAFETY: the caller's contract above.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                ta,
                tb,
                m,
                n,
                k,
                1.0,
                a.data.as_ptr(),
                lda,
                b.data.as_ptr(),
                ldb,
                if accumulate { 1.0 } else { 0.0 },
                c,
                ldc,
            );
        }
        true
    }
}

#[cfg(not(imagegen_openblas))]
mod openblas {
    use super::MatRef;

    pub(super) fn init() {}

    /// Not linked: never takes the product.
    pub(super) fn sgemm_uninit(
        _: &MatRef<'_>,
        _: &MatRef<'_>,
        _: &mut [std::mem::MaybeUninit<f32>],
    ) -> bool {
        false
    }

    /// Not linked: never takes the product.
    pub(super) fn sgemm(_: &MatRef<'_>, _: &MatRef<'_>, _: &mut [f32], _: usize, _: bool) -> bool {
        false
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn dense(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows x cols` buffer, as a view (no copy).
    fn transposed(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
        MatRef {
            data,
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// [[1,2,3],[4,5,6]] [[7,8],[9,10],[11,12]] = [[58,64],[139,154]] (by hand).
    #[test]
    fn a_product_by_hand_on_both_backends_and_through_transposed_views() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let want = [58.0, 64.0, 139.0, 154.0];
        let mut c = [0.0f32; 4];
        sgemm(dense(&a, 2, 3), dense(&b, 3, 2), &mut c, 2).unwrap();
        assert_eq!(c, want);
        let mut c = [0.0f32; 4];
        gemm_crate(&dense(&a, 2, 3), &dense(&b, 3, 2), &mut c, 2, false).unwrap();
        assert_eq!(c, want);
        // a^T stored as [[1,4],[2,5],[3,6]], b^T as [[7,9,11],[8,10,12]].
        let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
        let mut c = [0.0f32; 4];
        sgemm(transposed(&at, 3, 2), transposed(&bt, 2, 3), &mut c, 2).unwrap();
        assert_eq!(c, want);
        // Rows of the result 3 apart: the third column is left as it was.
        let mut c = [-1.0f32; 6];
        sgemm(dense(&a, 2, 3), dense(&b, 3, 2), &mut c, 3).unwrap();
        assert_eq!(c, [58.0, 64.0, -1.0, 139.0, 154.0, -1.0]);
    }

    /// `c += a b` on both backends: [[1,2],[3,4]] + the product above = [[59,66],[142,158]].
    #[test]
    fn accumulating_adds_the_product_to_what_is_there() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let want = [59.0, 66.0, 142.0, 158.0];
        let mut c = [1.0f32, 2.0, 3.0, 4.0];
        sgemm_accumulate(dense(&a, 2, 3), dense(&b, 3, 2), &mut c, 2).unwrap();
        assert_eq!(c, want);
        let mut c = [1.0f32, 2.0, 3.0, 4.0];
        gemm_crate(&dense(&a, 2, 3), &dense(&b, 3, 2), &mut c, 2, true).unwrap();
        assert_eq!(c, want);
        let mut c = [1.0f32, 2.0, 3.0, 4.0];
        sgemm_accumulate(dense(&[], 2, 0), dense(&[], 0, 2), &mut c, 2).unwrap();
        assert_eq!(c, [1.0, 2.0, 3.0, 4.0], "an empty product adds nothing");
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros_and_bad_shapes_are_refused() {
        let mut c = [5.0f32; 4];
        sgemm(dense(&[], 2, 0), dense(&[], 0, 2), &mut c, 2).unwrap();
        assert_eq!(c, [0.0; 4]);
        let a = [1.0f32; 6];
        let err = sgemm(dense(&a, 2, 3), dense(&a, 2, 3), &mut c, 3).unwrap_err();
        assert!(err.to_string().contains("inner sizes differ"), "{err}");
        let err = sgemm(dense(&a, 3, 3), dense(&a, 3, 1), &mut c, 1).unwrap_err();
        assert!(err.to_string().contains("does not fit in 6"), "{err}");
        let err = sgemm(dense(&a, 2, 3), dense(&a, 3, 2), &mut c, 1).unwrap_err();
        assert!(err.to_string().contains("result"), "{err}");
    }

    /// Many threads at once (as the model's pool calls it) agree with the gemm crate, on a size
    /// where OpenBLAS blocks and packs: its allocator must be the locked one.
    #[test]
    fn concurrent_calls_agree_with_the_gemm_crate() {
        let (m, k, n) = (96, 200, 72);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        let mut want = vec![0.0f32; m * n];
        gemm_crate(&dense(&a, m, k), &dense(&b, k, n), &mut want, n, false).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let mut c = vec![0.0f32; m * n];
                        sgemm(dense(&a, m, k), dense(&b, k, n), &mut c, n).unwrap();
                        // Small integers: both sums are exact.
                        assert_eq!(c, want);
                    }
                });
            }
        });
    }
}
