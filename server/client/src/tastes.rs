//! What the scripted users of the demo and the learning benchmark like, as scores of an image.

use imagegen_shapes::{self as shapes, Colour};

/// What the scripted user likes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taste {
    /// Lighter pictures: the score is the mean of every pixel's channels, over 255.
    Brighter,
    /// Shapes that fill more of the picture: the score is the largest blob's share of the image.
    LargerShapes,
    /// Red, orange and yellow: the score is the share of pixels nearest to one of them.
    WarmColours,
}

impl Taste {
    /// The user's score of an RGB image (`side` x `side`), in [0, 1].
    pub fn score(self, rgb: &[u8], side: usize) -> f64 {
        match self {
            Taste::Brighter => {
                rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / (rgb.len().max(1) as f64 * 255.0)
            }
            Taste::LargerShapes => shapes::evaluate(rgb, side).map_or(0.0, |s| s.area_fraction),
            Taste::WarmColours => {
                let warm = rgb
                    .chunks(3)
                    .filter(|p| {
                        matches!(
                            Colour::nearest([p[0], p[1], p[2]].map(f64::from)),
                            Colour::Red | Colour::Orange | Colour::Yellow
                        )
                    })
                    .count();
                warm as f64 / (rgb.len() / 3).max(1) as f64
            }
        }
    }

    /// The taste's name in tables and figures.
    pub fn name(self) -> &'static str {
        match self {
            Taste::Brighter => "brighter",
            Taste::LargerShapes => "larger shapes",
            Taste::WarmColours => "warm colours",
        }
    }

    /// Prompts the scripted user asks for and rates (three in four of [`Taste::prompts`]).
    pub fn training_prompts(self) -> Vec<String> {
        self.prompts()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 4 != 0)
            .map(|(_, p)| p)
            .collect()
    }

    /// Prompts only ever evaluated, never rated (one in four of [`Taste::prompts`]).
    pub fn evaluation_prompts(self) -> Vec<String> {
        self.prompts().into_iter().step_by(4).collect()
    }

    /// Prompts that leave room for the taste (no size words, or no colour words).
    pub(crate) fn prompts(self) -> Vec<String> {
        let mut out = Vec::new();
        for shape in shapes::Shape::ALL {
            for colour in Colour::ALL {
                out.push(match self {
                    Taste::Brighter | Taste::LargerShapes => {
                        format!("a {} {}", colour.word(), shape.word())
                    }
                    Taste::WarmColours => {
                        format!("a {} on a {} background", shape.word(), colour.word())
                    }
                });
            }
        }
        if self == Taste::WarmColours {
            // Warm backgrounds would score without any learning.
            out.retain(|p| !["red", "orange", "yellow"].iter().any(|w| p.contains(w)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagegen_shapes::{Scene, Shape, Size};

    fn scene(colour: Colour, radius: f64) -> Vec<u8> {
        Scene {
            shape: Shape::Square,
            colour,
            size: Size::Large,
            background: Colour::Blue,
            centre: (32.0, 32.0),
            radius,
        }
        .render(64)
    }

    #[test]
    fn tastes_score_what_they_say() {
        // A square of half-side 8 covers 16 x 16 = 256 of 4096 pixels (pixel centres inside).
        let small = Taste::LargerShapes.score(&scene(Colour::Red, 8.0), 64);
        assert!((small - 256.0 / 4096.0).abs() < 0.01, "{small}");
        let large = Taste::LargerShapes.score(&scene(Colour::Red, 16.0), 64);
        assert!(large > 3.5 * small);
        let warm = Taste::WarmColours.score(&scene(Colour::Orange, 16.0), 64);
        let cold = Taste::WarmColours.score(&scene(Colour::Green, 16.0), 64);
        assert!((warm - 1024.0 / 4096.0).abs() < 0.02, "{warm}");
        assert_eq!(cold, 0.0);
        // 1024 orange (250, 140, 20) pixels on blue (30, 60, 220): channel sums 410 and 310.
        let bright = Taste::Brighter.score(&scene(Colour::Orange, 16.0), 64);
        let expected = (1024.0 * 410.0 + 3072.0 * 310.0) / (4096.0 * 3.0 * 255.0);
        assert!((bright - expected).abs() < 1e-12, "{bright} vs {expected}");
    }

    #[test]
    fn evaluation_prompts_are_never_rated() {
        for taste in [Taste::Brighter, Taste::LargerShapes, Taste::WarmColours] {
            let (train, eval) = (taste.training_prompts(), taste.evaluation_prompts());
            assert!(
                eval.len() >= 3 && train.len() >= 2 * eval.len(),
                "{taste:?}"
            );
            assert!(eval.iter().all(|p| !train.contains(p)), "{taste:?}");
        }
    }

    #[test]
    fn prompts_leave_the_taste_open() {
        assert!(
            Taste::LargerShapes
                .prompts()
                .iter()
                .all(|p| !p.contains("large") && !p.contains("small"))
        );
        for p in Taste::WarmColours.prompts() {
            assert!(
                !["red", "orange", "yellow"].iter().any(|w| p.contains(w)),
                "{p}"
            );
        }
    }
}
