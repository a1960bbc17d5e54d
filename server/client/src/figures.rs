//! The demo's figures: the image grid and the score plot, drawn with the `image` crate and a
//! 5x7 pixel font (no font files to ship).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::demo::{DemoReport, RoundScore};

/// Writes `grid.png` (one row per round, base first) and `scores.png` into `dir`.
pub fn write_figures(report: &DemoReport, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let grid = image_grid(&report.images).map_err(std::io::Error::other)?;
    grid.save(dir.join("grid.png"))
        .map_err(std::io::Error::other)?;
    score_plot(&report.rounds)
        .save(dir.join("scores.png"))
        .map_err(std::io::Error::other)
}

/// Images side by side per row, 4-pixel gutters, on white.
fn image_grid(rows: &[Vec<Vec<u8>>]) -> Result<RgbImage, image::ImageError> {
    let decoded: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|png| image::load_from_memory(png).map(|i| i.to_rgb8()))
                .collect()
        })
        .collect::<Result<_, _>>()?;
    let cell = decoded
        .iter()
        .flatten()
        .map(|i| i.width().max(i.height()))
        .max()
        .unwrap_or(64);
    let columns = decoded.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let gutter = 4;
    let label = 20;
    let mut out = RgbImage::from_pixel(
        label + columns * (cell + gutter) + gutter,
        decoded.len() as u32 * (cell + gutter) + gutter,
        Rgb([255, 255, 255]),
    );
    for (r, row) in decoded.iter().enumerate() {
        let y = gutter + r as u32 * (cell + gutter);
        draw_text(
            &mut out,
            &r.to_string(),
            4,
            y + cell / 2 - 5,
            2,
            Rgb([60, 60, 60]),
        );
        for (c, img) in row.iter().enumerate() {
            let x = label + gutter + c as u32 * (cell + gutter);
            image::imageops::replace(&mut out, img, i64::from(x), i64::from(y));
        }
    }
    Ok(out)
}

/// Live (blue, dots) and base (grey) score per round, with y gridlines labelled.
fn score_plot(rounds: &[RoundScore]) -> RgbImage {
    let (w, h) = (560u32, 340u32);
    let (left, right, top, bottom) = (64u32, 24u32, 20u32, 44u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let values = rounds.iter().flat_map(|r| [r.live, r.base]);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) * 0.15).max(0.01);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let plot_w = f64::from(w - left - right);
    let plot_h = f64::from(h - top - bottom);
    let n = rounds.len().max(2) - 1;
    let px = |i: usize| f64::from(left) + plot_w * i as f64 / n as f64;
    let py = |v: f64| f64::from(top) + plot_h * (1.0 - (v - lo) / (hi - lo));
    let grey = Rgb([200, 200, 200]);
    for k in 0..=4 {
        let v = lo + (hi - lo) * f64::from(k) / 4.0;
        let y = py(v).round() as u32;
        draw_line(
            &mut img,
            (f64::from(left), f64::from(y)),
            (f64::from(w - right), f64::from(y)),
            grey,
            1,
        );
        draw_text(
            &mut img,
            &format!("{v:.3}"),
            4,
            y.saturating_sub(5),
            2,
            Rgb([60, 60, 60]),
        );
    }
    for (i, _) in rounds.iter().enumerate() {
        let x = px(i).round() as u32;
        draw_line(
            &mut img,
            (f64::from(x), f64::from(h - bottom)),
            (f64::from(x), f64::from(h - bottom + 6)),
            Rgb([60, 60, 60]),
            1,
        );
        draw_text(
            &mut img,
            &i.to_string(),
            x.saturating_sub(3),
            h - bottom + 12,
            2,
            Rgb([60, 60, 60]),
        );
    }
    let axis = Rgb([60, 60, 60]);
    draw_line(
        &mut img,
        (f64::from(left), f64::from(top)),
        (f64::from(left), f64::from(h - bottom)),
        axis,
        1,
    );
    draw_line(
        &mut img,
        (f64::from(left), f64::from(h - bottom)),
        (f64::from(w - right), f64::from(h - bottom)),
        axis,
        1,
    );
    let series = |img: &mut RgbImage, value: &dyn Fn(&RoundScore) -> f64, colour: Rgb<u8>| {
        for (i, pair) in rounds.windows(2).enumerate() {
            draw_line(
                img,
                (px(i), py(value(&pair[0]))),
                (px(i + 1), py(value(&pair[1]))),
                colour,
                2,
            );
        }
        for (i, r) in rounds.iter().enumerate() {
            let (x, y) = (px(i).round() as i64, py(value(r)).round() as i64);
            for dy in -3..=3 {
                for dx in -3..=3 {
                    if dx * dx + dy * dy <= 9 {
                        put(img, x + dx, y + dy, colour);
                    }
                }
            }
        }
    };
    series(&mut img, &|r| r.base, Rgb([150, 150, 150]));
    series(&mut img, &|r| r.live, Rgb([30, 90, 220]));
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, colour);
    }
}

fn draw_line(img: &mut RgbImage, from: (f64, f64), to: (f64, f64), colour: Rgb<u8>, width: i64) {
    let steps = ((to.0 - from.0).abs().max((to.1 - from.1).abs()).ceil() as usize).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
        for d in 0..width {
            put(img, x.round() as i64, y.round() as i64 + d, colour);
        }
    }
}

/// 3x5 glyphs of the characters the figures print, one row per 3 bits.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => return None,
    })
}

fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        let x0 = x + i as u32 * 4 * scale;
        for (r, bits) in rows.iter().enumerate() {
            for b in 0..3 {
                if bits & (4 >> b) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                i64::from(x0 + b * scale + dx),
                                i64::from(y + r as u32 * scale + dy),
                                colour,
                            );
                        }
                    }
                }
            }
        }
    }
}
