//! Preference pairs from feedback (d3po.md section 2).
//!
//! Every statement "a is better than b" counts once per rater: an explicit comparison, a best-of
//! pick (the pick against each other image of its group), and thumbs (every up against every
//! down of the group, after averaging each image's votes over raters). A pair is kept when the
//! statements about it do not cancel out: the image with the net preference wins; ties are
//! skipped.

use std::collections::{BTreeMap, BTreeSet};

/// The feedback on one group of images generated for the same prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupFeedback {
    /// Every image of the group, by id.
    pub images: Vec<String>,
    /// `(image, rater, +1 | -1)` thumbs.
    pub votes: Vec<(String, String, i8)>,
    /// `(winner, loser, rater)` explicit comparisons.
    pub comparisons: Vec<(String, String, String)>,
    /// `(rater, image)` best-of picks.
    pub best_of: Vec<(String, String)>,
}

/// "`winner` is preferred over `loser`": both images of one group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PreferencePair {
    /// The preferred image.
    pub winner: String,
    /// The other image.
    pub loser: String,
}

/// The preference pairs a group's feedback implies, in a deterministic order.
pub fn build_pairs(group: &GroupFeedback) -> Vec<PreferencePair> {
    let known: BTreeSet<&str> = group.images.iter().map(String::as_str).collect();
    // net[(a, b)] with a < b: statements "a > b" minus statements "b > a".
    let mut net: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    let mut prefer = |winner: &str, loser: &str| {
        let (Some(w), Some(l)) = (known.get(winner), known.get(loser)) else {
            return;
        };
        if w == l {
            return;
        }
        if w < l {
            *net.entry((*w, *l)).or_default() += 1;
        } else {
            *net.entry((*l, *w)).or_default() -= 1;
        }
    };
    for (winner, loser, _rater) in &group.comparisons {
        prefer(winner, loser);
    }
    for (_rater, pick) in &group.best_of {
        for other in &group.images {
            prefer(pick, other);
        }
    }
    // Thumbs: average each image's votes over raters, then every up beats every down.
    let mut scores: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (image, _rater, vote) in &group.votes {
        let entry = scores.entry(image.as_str()).or_default();
        entry.0 += i64::from(vote.signum());
        entry.1 += 1;
    }
    let ups: Vec<&str> = scores
        .iter()
        .filter(|(_, (sum, _))| *sum > 0)
        .map(|(i, _)| *i)
        .collect();
    let downs: Vec<&str> = scores
        .iter()
        .filter(|(_, (sum, _))| *sum < 0)
        .map(|(i, _)| *i)
        .collect();
    for up in &ups {
        for down in &downs {
            prefer(up, down);
        }
    }
    net.into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|((a, b), n)| {
            let (winner, loser) = if n > 0 { (a, b) } else { (b, a) };
            PreferencePair {
                winner: winner.to_string(),
                loser: loser.to_string(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> String {
        v.to_string()
    }

    fn pairs(g: &GroupFeedback) -> Vec<(String, String)> {
        build_pairs(g)
            .into_iter()
            .map(|p| (p.winner, p.loser))
            .collect()
    }

    #[test]
    fn thumbs_pair_every_up_with_every_down() {
        let g = GroupFeedback {
            images: vec![s("a"), s("b"), s("c"), s("d")],
            votes: vec![
                (s("a"), s("r"), 1),
                (s("b"), s("r"), -1),
                (s("c"), s("r"), -1),
            ],
            ..Default::default()
        };
        assert_eq!(pairs(&g), vec![(s("a"), s("b")), (s("a"), s("c"))]);
    }

    #[test]
    fn raters_are_averaged_and_ties_skipped() {
        // a: +1 -1 = 0 (no opinion); b: +1; c: -1 -1.
        let g = GroupFeedback {
            images: vec![s("a"), s("b"), s("c")],
            votes: vec![
                (s("a"), s("r1"), 1),
                (s("a"), s("r2"), -1),
                (s("b"), s("r1"), 1),
                (s("c"), s("r1"), -1),
                (s("c"), s("r2"), -1),
            ],
            ..Default::default()
        };
        assert_eq!(pairs(&g), vec![(s("b"), s("c"))]);
    }

    #[test]
    fn comparisons_and_best_of_add_up_and_contradictions_cancel() {
        let g = GroupFeedback {
            images: vec![s("a"), s("b"), s("c")],
            comparisons: vec![
                (s("a"), s("b"), s("r1")),
                (s("b"), s("a"), s("r2")),
                (s("c"), s("b"), s("r1")),
            ],
            best_of: vec![(s("r3"), s("c"))],
            ..Default::default()
        };
        // a-b cancel; c beats b (twice) and a (once).
        assert_eq!(pairs(&g), vec![(s("c"), s("a")), (s("c"), s("b"))]);
    }

    #[test]
    fn unknown_images_and_self_comparisons_are_ignored() {
        let g = GroupFeedback {
            images: vec![s("a"), s("b")],
            comparisons: vec![(s("a"), s("zz"), s("r")), (s("a"), s("a"), s("r"))],
            ..Default::default()
        };
        assert!(pairs(&g).is_empty());
    }
}
