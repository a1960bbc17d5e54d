//! Finds a static OpenBLAS built with threading (and so with its buffer allocator locked: the
//! model calls it from several threads at once) and links it; without one the crate builds on the
//! gemm crate alone and says so. Static, so the binary needs no library at run time (the
//! distroless image has none).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(imagegen_openblas)");
    println!("cargo::rerun-if-env-changed=IMAGEGEN_OPENBLAS_DIR");
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_none() {
        return;
    }
    match find_openblas() {
        Some(dir) => {
            println!(
                "cargo::rerun-if-changed={}",
                dir.join("libopenblas.a").display()
            );
            println!("cargo::rustc-link-search=native={}", dir.display());
            println!("cargo::rustc-link-lib=static=openblas");
            println!("cargo::rustc-cfg=imagegen_openblas");
        }
        None => println!(
            "cargo::warning=OpenBLAS not found (install libopenblas-pthread-dev, or set \
             IMAGEGEN_OPENBLAS_DIR to the folder of a threaded libopenblas.a): the matrix \
             products use the gemm crate"
        ),
    }
}

fn find_openblas() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("IMAGEGEN_OPENBLAS_DIR") {
        return Some(PathBuf::from(dir)).filter(|d| d.join("libopenblas.a").is_file());
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" {
        return None;
    }
    // Debian's threaded flavours; never its `openblas-serial` one, whose allocator has no lock.
    [
        format!("/usr/lib/{arch}-linux-gnu/openblas-pthread"),
        format!("/usr/lib/{arch}-linux-gnu/openblas-openmp"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|d| Path::new(d).join("libopenblas.a").is_file())
}
