//! The procedural captioned dataset of coloured shapes (what the embedded model learns to draw)
//! and the evaluator that checks a generated image against its prompt: the colour and the shape
//! of the largest blob.

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Shapes the dataset draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled upward triangle.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// Its word in captions.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Colours of shapes and backgrounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// (220, 30, 30)
    Red,
    /// (30, 180, 40)
    Green,
    /// (30, 60, 220)
    Blue,
    /// (240, 220, 30)
    Yellow,
    /// (140, 40, 180)
    Purple,
    /// (250, 140, 20)
    Orange,
    /// (245, 245, 245)
    White,
    /// (15, 15, 15)
    Black,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// Its word in captions.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// Its RGB value when drawn.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 180, 40],
            Colour::Blue => [30, 60, 220],
            Colour::Yellow => [240, 220, 30],
            Colour::Purple => [140, 40, 180],
            Colour::Orange => [250, 140, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
        }
    }

    /// Its position in [`Colour::ALL`].
    pub fn index(self) -> usize {
        Colour::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// The palette colour nearest to `rgb`.
    pub fn nearest(rgb: [f64; 3]) -> Colour {
        let dist = |c: Colour| {
            let p = c.rgb();
            (0..3)
                .map(|i| (rgb[i] - f64::from(p[i])).powi(2))
                .sum::<f64>()
        };
        Colour::ALL
            .into_iter()
            .min_by(|a, b| dist(*a).total_cmp(&dist(*b)))
            .unwrap_or(Colour::Black)
    }
}

/// Small or large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// About a third of the image across (radius 16-20% of the side).
    Small,
    /// About half the image across (radius 24-30% of the side).
    Large,
}

impl Size {
    /// Its word in captions.
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

/// One picture: a shape on a background.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    /// What is drawn.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Its size.
    pub size: Size,
    /// The background colour (never the shape's).
    pub background: Colour,
    /// Centre, in pixels.
    pub centre: (f64, f64),
    /// Half the shape's extent, in pixels.
    pub radius: f64,
}

impl Scene {
    /// A random scene for an image of `side` pixels.
    pub fn random(rng: &mut impl Rng, side: usize) -> Self {
        let shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
        let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
        let background = loop {
            let c = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
            if c != colour {
                break c;
            }
        };
        let size = if rng.random_bool(0.5) {
            Size::Small
        } else {
            Size::Large
        };
        let s = side as f64;
        let radius = match size {
            Size::Small => s * rng.random_range(0.16..0.20),
            Size::Large => s * rng.random_range(0.24..0.30),
        };
        let margin = radius + 1.0;
        let centre = (
            rng.random_range(margin..s - margin),
            rng.random_range(margin..s - margin),
        );
        Self {
            shape,
            colour,
            size,
            background,
            centre,
            radius,
        }
    }

    /// The caption, in one of a few phrasings chosen by `variant`.
    pub fn caption(&self, variant: usize) -> String {
        let (sz, c, sh, bg) = (
            self.size.word(),
            self.colour.word(),
            self.shape.word(),
            self.background.word(),
        );
        match variant % 4 {
            0 => format!("a {sz} {c} {sh} on a {bg} background"),
            1 => format!("a {c} {sh} on a {bg} background"),
            2 => format!("a {sz} {c} {sh}"),
            _ => format!("a picture of a {sz} {c} {sh} on a {bg} background"),
        }
    }

    /// Whether pixel centre `(x, y)` lies in the shape.
    fn contains(&self, x: f64, y: f64) -> bool {
        let (cx, cy, r) = (self.centre.0, self.centre.1, self.radius);
        match self.shape {
            Shape::Circle => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
            Shape::Square => (x - cx).abs() <= r && (y - cy).abs() <= r,
            Shape::Triangle => {
                // Apex at the top, base at the bottom, as wide as it is tall.
                let t = (y - (cy - r)) / (2.0 * r);
                (0.0..=1.0).contains(&t) && (x - cx).abs() <= t * r
            }
        }
    }

    /// Renders the scene as RGB bytes, `side * side * 3`.
    pub fn render(&self, side: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(side * side * 3);
        for y in 0..side {
            for x in 0..side {
                let inside = self.contains(x as f64 + 0.5, y as f64 + 0.5);
                out.extend_from_slice(&if inside { self.colour } else { self.background }.rgb());
            }
        }
        out
    }
}

/// Whether the scene's combination of shape, colour and background is one the embedded model
/// never sees in training (about one in eleven): the evaluator's held-out captions.
pub fn is_held_out(scene: &Scene) -> bool {
    let shape = Shape::ALL
        .iter()
        .position(|s| *s == scene.shape)
        .unwrap_or(0);
    (shape + 3 * scene.colour.index() + 5 * scene.background.index()).is_multiple_of(11)
}

/// A random scene whose combination is (`held_out = true`) or is not held out.
pub fn random_scene(rng: &mut impl Rng, side: usize, held_out: bool) -> Scene {
    loop {
        let scene = Scene::random(rng, side);
        if is_held_out(&scene) == held_out {
            return scene;
        }
    }
}

/// `n` captions of held-out combinations (never seen in training), reproducible from `seed`:
/// the prompts of the prompt-accuracy figure.
pub fn held_out_captions(seed: u64, n: usize, side: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| random_scene(&mut rng, side, true).caption(i))
        .collect()
}

/// Whether an image (RGB, `side` x `side`) draws the shape and colour `prompt` asks for: the
/// prompt-accuracy criterion (the background is scored apart).
pub fn draws_prompt(prompt: &str, rgb: &[u8], side: usize) -> bool {
    let spec = parse_prompt(prompt);
    evaluate(rgb, side)
        .is_some_and(|s| Some(s.shape) == spec.shape && Some(s.colour) == spec.colour)
}

/// `n` random scenes with captions, reproducible from `seed`.
pub fn dataset(seed: u64, n: usize, side: usize) -> Vec<(Scene, String)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let scene = Scene::random(&mut rng, side);
            let caption = scene.caption(i);
            (scene, caption)
        })
        .collect()
}

/// What a prompt asks for (the words the evaluator checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptSpec {
    /// The shape named.
    pub shape: Option<Shape>,
    /// The shape's colour (the first colour word before the shape word).
    pub colour: Option<Colour>,
    /// The background colour (a colour word after the shape word).
    pub background: Option<Colour>,
}

/// Reads shape, colour and background out of a caption.
pub fn parse_prompt(prompt: &str) -> PromptSpec {
    let words: Vec<String> = prompt
        .to_lowercase()
        .split(|c: char| !c.is_alphabetic())
        .map(String::from)
        .collect();
    let shape_at = words
        .iter()
        .position(|w| Shape::ALL.iter().any(|s| s.word() == w));
    let colour_of = |w: &str| Colour::ALL.into_iter().find(|c| c.word() == w);
    let shape = shape_at.and_then(|i| Shape::ALL.into_iter().find(|s| s.word() == words[i]));
    let (before, after) = match shape_at {
        Some(i) => (&words[..i], &words[i + 1..]),
        None => (&words[..], &words[..0]),
    };
    PromptSpec {
        shape,
        colour: before.iter().rev().find_map(|w| colour_of(w)),
        background: after.iter().find_map(|w| colour_of(w)),
    }
}

/// What the evaluator sees in an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    /// Colour of the largest blob.
    pub colour: Colour,
    /// Its shape, from how much of its bounding box it fills.
    pub shape: Shape,
    /// Background colour (the most common palette colour on the border).
    pub background: Colour,
    /// The blob's share of the image.
    pub area_fraction: f64,
}

/// A connected region of non-background pixels: pixel count, bounding box, pixels per colour.
struct Blob {
    count: usize,
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
    colours: [usize; 8],
}

/// Finds the largest blob that is not the background and classifies its colour and shape.
///
/// The figure is every pixel whose nearest palette colour is not the background's, whatever
/// colour it is nearest to: an anti-aliased or slightly noisy edge (red over blue reads as
/// purple) stays part of the shape instead of breaking it up, and the figure's colour is the
/// most common one among its pixels.
pub fn evaluate(rgb: &[u8], side: usize) -> Option<Seen> {
    if rgb.len() != side * side * 3 || side < 4 {
        return None;
    }
    // Each pixel's nearest palette colour, as its index in `Colour::ALL`.
    let label: Vec<usize> = rgb
        .chunks(3)
        .map(|p| Colour::nearest([f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]).index())
        .collect();
    let mut border_counts = [0usize; 8];
    for i in 0..side {
        for (x, y) in [(i, 0), (i, side - 1), (0, i), (side - 1, i)] {
            border_counts[label[y * side + x]] += 1;
        }
    }
    let background = (0..8).max_by_key(|&i| border_counts[i]).unwrap_or(0);
    // Connected components of non-background pixels (4-neighbourhood).
    let mut seen = vec![false; side * side];
    let mut best: Option<Blob> = None;
    for start in 0..side * side {
        if seen[start] || label[start] == background {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let (mut count, mut x0, mut x1, mut y0, mut y1) = (0, side, 0, side, 0);
        let mut colours = [0usize; 8];
        while let Some(p) = stack.pop() {
            count += 1;
            let (x, y) = (p % side, p / side);
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            colours[label[p]] += 1;
            let mut visit = |q: usize| {
                if !seen[q] && label[q] != background {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < side {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - side);
            }
            if y + 1 < side {
                visit(p + side);
            }
        }
        if best.as_ref().is_none_or(|b| count > b.count) {
            best = Some(Blob {
                count,
                x0,
                x1,
                y0,
                y1,
                colours,
            });
        }
    }
    let Blob {
        count,
        x0,
        x1,
        y0,
        y1,
        colours,
    } = best?;
    let colour_index = (0..8).max_by_key(|&i| colours[i]).unwrap_or(0);
    let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let fill = count as f64 / bbox;
    // Filled fraction of the bounding box: square 1, circle pi/4 = 0.785, triangle 1/2.
    let shape = if fill > 0.89 {
        Shape::Square
    } else if fill > 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    };
    Some(Seen {
        colour: Colour::ALL[colour_index],
        shape,
        background: Colour::ALL[background],
        area_fraction: count as f64 / (side * side) as f64,
    })
}

/// Whether an image shows what its prompt asks (shape and colour; background when named).
pub fn matches_prompt(prompt: &str, rgb: &[u8], side: usize) -> bool {
    let spec = parse_prompt(prompt);
    let Some(seen) = evaluate(rgb, side) else {
        return false;
    };
    spec.shape.is_none_or(|s| s == seen.shape)
        && spec.colour.is_none_or(|c| c == seen.colour)
        && spec.background.is_none_or(|b| b == seen.background)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_evaluator_recognises_every_rendered_scene() {
        let data = dataset(1, 600, 64);
        let correct = data
            .iter()
            .filter(|(scene, caption)| matches_prompt(caption, &scene.render(64), 64))
            .count();
        eprintln!("evaluator: {correct}/600 rendered scenes recognised");
        // Small triangles are only a few dozen pixels: allow a handful of misreadings.
        assert!(correct >= 590, "{correct}/600 rendered scenes recognised");
    }

    #[test]
    fn captions_parse_back_to_their_scene() {
        for (scene, caption) in dataset(2, 100, 64) {
            let spec = parse_prompt(&caption);
            assert_eq!(spec.shape, Some(scene.shape), "{caption}");
            assert_eq!(spec.colour, Some(scene.colour), "{caption}");
            if caption.contains("background") {
                assert_eq!(spec.background, Some(scene.background), "{caption}");
            }
        }
        assert_eq!(
            parse_prompt("a small red circle on a blue background").background,
            Some(Colour::Blue)
        );
        assert_eq!(parse_prompt("something else").shape, None);
    }

    #[test]
    fn mismatches_and_noise_are_rejected() {
        let scene = Scene {
            shape: Shape::Circle,
            colour: Colour::Red,
            size: Size::Large,
            background: Colour::Blue,
            centre: (32.0, 32.0),
            radius: 18.0,
        };
        let img = scene.render(64);
        assert!(matches_prompt(
            "a red circle on a blue background",
            &img,
            64
        ));
        assert!(!matches_prompt("a red square", &img, 64));
        assert!(!matches_prompt("a green circle", &img, 64));
        assert!(!matches_prompt(
            "a red circle on a white background",
            &img,
            64
        ));
        assert!(!matches_prompt("a red circle", &img[..30], 64));
        let seen = evaluate(&img, 64).unwrap();
        assert!((seen.area_fraction - std::f64::consts::PI * 18.0 * 18.0 / 4096.0).abs() < 0.02);
    }

    #[test]
    fn held_out_combinations_cover_every_word_but_are_few() {
        let mut held = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for background in Colour::ALL.into_iter().filter(|b| *b != colour) {
                    let scene = Scene {
                        shape,
                        colour,
                        size: Size::Large,
                        background,
                        centre: (32.0, 32.0),
                        radius: 16.0,
                    };
                    if is_held_out(&scene) {
                        held.push(scene);
                    }
                }
            }
        }
        // 168 combinations in all.
        assert!((10..=20).contains(&held.len()), "{} held out", held.len());
        for shape in Shape::ALL {
            assert!(held.iter().any(|s| s.shape == shape));
        }
        for colour in Colour::ALL {
            assert!(held.iter().any(|s| s.colour == colour));
            assert!(held.iter().any(|s| s.background == colour));
        }
        let mut rng = StdRng::seed_from_u64(4);
        assert!(is_held_out(&random_scene(&mut rng, 64, true)));
        assert!(!is_held_out(&random_scene(&mut rng, 64, false)));
    }

    #[test]
    fn the_dataset_is_reproducible_and_covers_the_vocabulary() {
        let a = dataset(3, 400, 64);
        let b = dataset(3, 400, 64);
        assert_eq!(
            a.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(),
            b.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>()
        );
        for shape in Shape::ALL {
            assert!(a.iter().any(|(s, _)| s.shape == shape));
        }
        for colour in Colour::ALL {
            assert!(
                a.iter().any(|(s, _)| s.colour == colour)
                    && a.iter().any(|(s, _)| s.background == colour)
            );
        }
        assert!(a.iter().all(|(s, _)| s.colour != s.background));
    }
}
