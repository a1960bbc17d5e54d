//! The demo's figures: the image grid and the score plot, drawn with the `image` crate and a
//! 3x5 pixel font (no font files to ship).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::demo::{DemoReport, RoundScore};

/// Writes `grid.png` (one row per round, base first) and `scores.png` into `dir`.
pub fn write_figures(report: &DemoReport, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let rows: Vec<String> = report
        .rounds
        .iter()
        .map(|r| match (r.round, r.published) {
            (0, _) => "base".to_string(),
            (k, true) => format!("round {k}"),
            (k, false) => format!("round {k} (refused)"),
        })
        .collect();
    let grid = image_grid(&report.images, &rows, &report.columns).map_err(std::io::Error::other)?;
    grid.save(dir.join("grid.png"))
        .map_err(std::io::Error::other)?;
    score_plot(report)
        .save(dir.join("scores.png"))
        .map_err(std::io::Error::other)
}

const INK: Rgb<u8> = Rgb([60, 60, 60]);
const LIVE: Rgb<u8> = Rgb([30, 90, 220]);
const BASE: Rgb<u8> = Rgb([150, 150, 150]);

/// Images side by side per row, 4-pixel gutters, on white; rows labelled on the left (`rows`),
/// columns on top (`columns`, the held-out prompt of each column).
fn image_grid(
    images: &[Vec<Vec<u8>>],
    rows: &[String],
    columns: &[String],
) -> Result<RgbImage, image::ImageError> {
    let decoded: Vec<Vec<RgbImage>> = images
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
    let count = decoded.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let gutter = 4;
    // The longest row label ("round 12 (refused)") wraps its note onto a second line.
    let label = 8 * 8 + 8;
    let header = 14;
    let mut out = RgbImage::from_pixel(
        label + count * (cell + gutter) + gutter,
        header + decoded.len() as u32 * (cell + gutter) + gutter,
        Rgb([255, 255, 255]),
    );
    for (c, name) in columns.iter().take(count as usize).enumerate() {
        let x = label + gutter + c as u32 * (cell + gutter);
        // 4 px per glyph: what fits over the image itself, without the article.
        let name = name.strip_prefix("a ").unwrap_or(name);
        let fits: String = name.chars().take((cell / 4) as usize).collect();
        draw_text(&mut out, &fits, x, 4, 1, INK);
    }
    for (r, row) in decoded.iter().enumerate() {
        let y = header + gutter + r as u32 * (cell + gutter);
        let name = rows.get(r).map_or("", String::as_str);
        let (first, note) = name.split_once(" (").unwrap_or((name, ""));
        draw_text(&mut out, first, 4, y + cell / 2 - 10, 2, INK);
        if !note.is_empty() {
            draw_text(
                &mut out,
                note.trim_end_matches(')'),
                4,
                y + cell / 2 + 4,
                2,
                INK,
            );
        }
        for (c, img) in row.iter().enumerate() {
            let x = label + gutter + c as u32 * (cell + gutter);
            image::imageops::replace(&mut out, img, i64::from(x), i64::from(y));
        }
    }
    Ok(out)
}

/// Live (blue) and base (grey) score per round, with a title (taste, labels), axis labels,
/// labelled y gridlines and a legend.
fn score_plot(report: &DemoReport) -> RgbImage {
    let rounds = &report.rounds;
    let (w, h) = (600u32, 380u32);
    let (left, right, top, bottom) = (72u32, 24u32, 44u32, 64u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let labels = rounds.last().map_or(0, |r| r.labels);
    draw_text(
        &mut img,
        &format!("{}: live vs base, {labels} labels", report.taste.name()),
        left,
        10,
        2,
        INK,
    );
    let values = rounds.iter().flat_map(|r| [r.live, r.base]);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((hi - lo) * 0.15).max(0.01);
    let (lo, hi) = ((lo - pad).max(0.0), hi + pad);
    let plot_w = f64::from(w - left - right);
    let plot_h = f64::from(h - top - bottom);
    let n = rounds.len().max(2) - 1;
    let px = |i: usize| f64::from(left) + plot_w * i as f64 / n as f64;
    let py = |v: f64| f64::from(top) + plot_h * (1.0 - (v - lo) / (hi - lo));
    for k in 0..=4 {
        let v = lo + (hi - lo) * f64::from(k) / 4.0;
        let y = py(v).round() as u32;
        draw_line(
            &mut img,
            (f64::from(left), f64::from(y)),
            (f64::from(w - right), f64::from(y)),
            Rgb([220, 220, 220]),
            1,
        );
        draw_text(
            &mut img,
            &format!("{v:.3}"),
            16,
            y.saturating_sub(5),
            2,
            INK,
        );
    }
    for (i, r) in rounds.iter().enumerate() {
        let x = px(i).round() as u32;
        draw_line(
            &mut img,
            (f64::from(x), f64::from(h - bottom)),
            (f64::from(x), f64::from(h - bottom + 6)),
            INK,
            1,
        );
        let tick = r.round.to_string();
        draw_text(
            &mut img,
            &tick,
            x.saturating_sub(2 * tick.len() as u32),
            h - bottom + 10,
            2,
            INK,
        );
        let spent = format!("{}", r.labels);
        draw_text(
            &mut img,
            &spent,
            x.saturating_sub(2 * spent.len() as u32),
            h - bottom + 24,
            1,
            INK,
        );
    }
    draw_text(
        &mut img,
        "round (labels spent)",
        left + (w - left - right) / 2 - 80,
        h - 18,
        2,
        INK,
    );
    draw_text(&mut img, "score", 16, top - 16, 2, INK);
    for (a, b) in [
        ((left, top), (left, h - bottom)),
        ((left, h - bottom), (w - right, h - bottom)),
    ] {
        draw_line(
            &mut img,
            (f64::from(a.0), f64::from(a.1)),
            (f64::from(b.0), f64::from(b.1)),
            INK,
            1,
        );
    }
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
            dot(
                img,
                px(i).round() as i64,
                py(value(r)).round() as i64,
                colour,
            );
        }
    };
    series(&mut img, &|r| r.base, BASE);
    series(&mut img, &|r| r.live, LIVE);
    // Legend, top right inside the plot.
    let lx = w - right - 96;
    for (k, (name, colour)) in [("live", LIVE), ("base", BASE)].into_iter().enumerate() {
        let y = top + 8 + 16 * k as u32;
        draw_line(
            &mut img,
            (f64::from(lx), f64::from(y + 4)),
            (f64::from(lx + 24), f64::from(y + 4)),
            colour,
            2,
        );
        dot(&mut img, i64::from(lx + 12), i64::from(y + 5), colour);
        draw_text(&mut img, name, lx + 32, y, 2, INK);
    }
    img
}

fn dot(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    for dy in -3..=3 {
        for dx in -3..=3 {
            if dx * dx + dy * dy <= 9 {
                put(img, x + dx, y + dy, colour);
            }
        }
    }
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

/// 3x5 glyphs (one row per 3 bits) of digits, letters (drawn as capitals) and the punctuation
/// the figures print.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c.to_ascii_uppercase() {
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
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '%' => [5, 1, 2, 4, 5],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
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
