//! Training the classifier's head with candle-nn: full-batch AdamW on class-weighted cross-entropy, from
//! weights drawn with a seeded generator, so the same data and seed give the same head. Then calibration
//! on the validation split: a softmax temperature that minimizes its log-loss, and the threshold on the
//! probability of harm with the most recall whose false-positive rate stays within the target.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use ferroserve_model::embed::Budget;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::head::{Head, softmax};
use crate::eval::Example;
use crate::normalize::normalize;
use crate::semantic::EmbedService;

/// The classes of a training set: `allow`, then every category of its harmful examples, sorted.
pub fn classes_of(examples: &[Example]) -> Vec<String> {
    let mut harms: Vec<String> = examples
        .iter()
        .filter(|e| e.label == "block")
        .map(|e| e.category.clone())
        .collect();
    harms.sort();
    harms.dedup();
    std::iter::once("allow".to_string()).chain(harms).collect()
}

/// Embeds examples as the filter will see them (normalized, within the encoder budget the filter will
/// run), with their class indices; a harmful example of a category not in `classes` is an error naming it.
pub fn embed_examples(
    service: &EmbedService,
    examples: &[Example],
    classes: &[String],
    layout: super::features::Layout,
    budget: Budget,
) -> Result<Labelled, String> {
    let y = examples
        .iter()
        .map(|e| {
            if e.label != "block" {
                return Ok(0);
            }
            classes
                .iter()
                .position(|c| *c == e.category)
                .ok_or_else(|| format!("category `{}` is not among the classes {classes:?}", e.category))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let texts: Vec<String> = examples.iter().map(|e| normalize(&e.text)).collect();
    let mut x = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(256) {
        let vectors = service.embed_many_with(chunk, budget)?;
        x.extend(vectors.into_iter().zip(chunk).map(|(v, t)| layout.features(v, t)));
    }
    Ok(Labelled { x, y })
}

/// SHA-256 over the examples' labels, categories and texts, in order: what the weights were trained on.
pub fn data_sha256(examples: &[Example]) -> String {
    let mut all = Vec::new();
    for e in examples {
        for field in [&e.label, &e.category, &e.text] {
            all.extend_from_slice(field.as_bytes());
            all.push(0);
        }
    }
    super::sha256_hex(&all)
}

/// Embeddings and their class indices (0 is `allow`).
#[derive(Debug, Clone, Default)]
pub struct Labelled {
    /// Unit-length sentence embeddings.
    pub x: Vec<Vec<f32>>,
    /// Class of each.
    pub y: Vec<usize>,
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Seeds the initial weights.
    pub seed: u64,
    /// Hidden units.
    pub hidden: usize,
    /// Full passes over the training data.
    pub epochs: usize,
    /// AdamW's learning rate.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// The validation false-positive rate the threshold must stay within.
    pub target_fpr: f64,
    /// Share of hidden units dropped in each training pass (masks drawn from the seeded generator).
    pub dropout: f32,
    /// Probability mass spread from the true class over all classes, so no output learns certainty.
    pub label_smoothing: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            seed: 7,
            hidden: 256,
            epochs: 600,
            learning_rate: 3e-3,
            weight_decay: 1e-2,
            target_fpr: 0.04,
            dropout: 0.6,
            label_smoothing: 0.1,
        }
    }
}

/// A trained, calibrated head.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The weights.
    pub head: Head,
    /// The softmax temperature.
    pub temperature: f32,
    /// The block threshold on the probability of harm.
    pub threshold: f32,
    /// Recall of harmful validation texts at that threshold.
    pub val_recall: f64,
    /// False-positive rate on benign validation texts at that threshold.
    pub val_fpr: f64,
    /// The training loss after the last epoch.
    pub final_loss: f32,
}

/// Uniform Glorot initialization from the seeded generator.
fn glorot(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    let limit = (6.0 / (rows + cols) as f32).sqrt();
    (0..rows * cols).map(|_| rng.random_range(-limit..limit)).collect()
}

fn to_vec(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1::<f32>()
}

/// Trains a head on `train` with `classes` outputs and calibrates it on `val`.
pub fn fit(classes: usize, train: &Labelled, val: &Labelled, o: &TrainOptions) -> candle_core::Result<Trained> {
    let dev = Device::Cpu;
    let inputs = train.x.first().map_or(0, Vec::len);
    let n = train.x.len();
    let mut rng = StdRng::seed_from_u64(o.seed);
    let w1 = Var::from_vec(glorot(&mut rng, o.hidden, inputs), (o.hidden, inputs), &dev)?;
    let b1 = Var::zeros(o.hidden, DType::F32, &dev)?;
    let w2 = Var::from_vec(glorot(&mut rng, classes, o.hidden), (classes, o.hidden), &dev)?;
    let b2 = Var::zeros(classes, DType::F32, &dev)?;
    let x = Tensor::from_vec(train.x.concat(), (n, inputs), &dev)?;
    // Smoothed one-hot targets, each row weighted so that every class weighs the same in the loss however
    // many examples it has.
    let mut counts = vec![0usize; classes];
    train.y.iter().for_each(|&c| counts[c] += 1);
    let eps = o.label_smoothing / classes as f32;
    let mut targets = vec![eps; n * classes];
    for (i, &c) in train.y.iter().enumerate() {
        let w = n as f32 / (classes * counts[c].max(1)) as f32;
        targets[i * classes..(i + 1) * classes].iter_mut().for_each(|t| *t *= w);
        targets[i * classes + c] = w * (1.0 - o.label_smoothing + eps);
    }
    let targets = Tensor::from_vec(targets, (n, classes), &dev)?;
    let mut opt = AdamW::new(
        vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()],
        ParamsAdamW {
            lr: o.learning_rate,
            weight_decay: o.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let keep = 1.0 - o.dropout;
    let mut final_loss = f32::NAN;
    for _ in 0..o.epochs {
        let mask: Vec<f32> = (0..n * o.hidden)
            .map(|_| if rng.random::<f32>() < keep { 1.0 / keep } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (n, o.hidden), &dev)?;
        let h = x.matmul(&w1.t()?)?.broadcast_add(&b1)?.relu()?.mul(&mask)?;
        let logits = h.matmul(&w2.t()?)?.broadcast_add(&b2)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let loss = (logp.mul(&targets)?.sum_all()?.neg()? / n as f64)?;
        opt.backward_step(&loss)?;
        final_loss = loss.to_scalar::<f32>()?;
    }
    let head = Head {
        inputs,
        hidden: o.hidden,
        outputs: classes,
        w1: to_vec(&w1)?,
        b1: to_vec(&b1)?,
        w2: to_vec(&w2)?,
        b2: to_vec(&b2)?,
    };
    let logits: Vec<Vec<f32>> = val.x.iter().map(|v| head.logits(v)).collect();
    let temperature = fit_temperature(&logits, &val.y);
    let harm: Vec<f32> = logits.iter().map(|l| 1.0 - softmax(l, temperature)[0]).collect();
    let (threshold, val_recall, val_fpr) = pick_threshold(&harm, &val.y, o.target_fpr);
    Ok(Trained {
        head,
        temperature,
        threshold,
        val_recall,
        val_fpr,
        final_loss,
    })
}

/// The temperature in [0.25, 4] (steps of 0.05) with the least validation log-loss.
fn fit_temperature(logits: &[Vec<f32>], y: &[usize]) -> f32 {
    let nll = |t: f32| -> f32 {
        logits
            .iter()
            .zip(y)
            .map(|(l, &c)| -softmax(l, t)[c].max(1e-12).ln())
            .sum()
    };
    (5..=80)
        .map(|i| i as f32 * 0.05)
        .min_by(|a, b| nll(*a).total_cmp(&nll(*b)))
        .unwrap_or(1.0)
}

/// Recall and false-positive rate of blocking at `t`.
fn rates(harm: &[f32], y: &[usize], t: f32) -> (f64, f64) {
    let (mut tp, mut pos, mut fp, mut neg) = (0u32, 0u32, 0u32, 0u32);
    for (&h, &c) in harm.iter().zip(y) {
        let blocked = h >= t;
        if c == 0 {
            neg += 1;
            fp += u32::from(blocked);
        } else {
            pos += 1;
            tp += u32::from(blocked);
        }
    }
    (
        f64::from(tp) / f64::from(pos.max(1)),
        f64::from(fp) / f64::from(neg.max(1)),
    )
}

/// Of the thresholds from 0.05 to 0.999 (steps of 0.01, finer above 0.95) whose false-positive rate is within `target`, those with
/// the most recall; the middle one of them, so that neither side of the choice is on a knife's edge.
/// Returns the threshold, its recall and its false-positive rate.
pub fn pick_threshold(harm: &[f32], y: &[usize], target: f64) -> (f32, f64, f64) {
    let coarse = (5..95).map(|i| i as f32 / 100.0);
    let fine = (950..1000).map(|i| i as f32 / 1000.0);
    let grid: Vec<(f32, f64, f64)> = coarse
        .chain(fine)
        .map(|t| {
            let (r, f) = rates(harm, y, t);
            (t, r, f)
        })
        .collect();
    let feasible: Vec<&(f32, f64, f64)> = grid.iter().filter(|g| g.2 <= target).collect();
    let Some(best) = feasible.iter().map(|g| g.1).max_by(f64::total_cmp) else {
        return grid[grid.len() - 1];
    };
    let tied: Vec<&&(f32, f64, f64)> = feasible.iter().filter(|g| g.1 == best).collect();
    **tied[tied.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two separable clusters per class in 8 dimensions, from a seeded generator.
    fn clusters(seed: u64, per_class: usize) -> Labelled {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Labelled::default();
        for c in 0..3 {
            for _ in 0..per_class {
                let mut v: Vec<f32> = (0..8).map(|_| rng.random_range(-0.3..0.3)).collect();
                v[c] += 1.0;
                out.x.push(v);
                out.y.push(c);
            }
        }
        out
    }

    #[test]
    fn training_is_deterministic_for_a_seed_and_separates_what_is_separable() {
        let (train, val) = (clusters(1, 40), clusters(2, 20));
        let o = TrainOptions {
            hidden: 16,
            epochs: 150,
            learning_rate: 1e-2,
            ..TrainOptions::default()
        };
        let a = fit(3, &train, &val, &o).unwrap();
        let b = fit(3, &train, &val, &o).unwrap();
        assert_eq!(a.head, b.head, "same data and seed, same weights");
        let c = fit(3, &train, &val, &TrainOptions { seed: 8, ..o }).unwrap();
        assert_ne!(a.head, c.head, "the seed matters");
        assert!(a.val_recall > 0.95 && a.val_fpr <= 0.03, "{a:?}");
    }

    #[test]
    fn the_threshold_keeps_the_false_positive_rate_within_the_target() {
        // Benign texts score 0.1..0.5, harmful ones 0.3..0.9: no threshold is perfect.
        let harm: Vec<f32> = (0..50)
            .map(|i| 0.1 + 0.008 * i as f32)
            .chain((0..50).map(|i| 0.3 + 0.012 * i as f32))
            .collect();
        let y: Vec<usize> = [0; 50].into_iter().chain([1; 50]).collect();
        let (t, recall, fpr) = pick_threshold(&harm, &y, 0.04);
        assert!(fpr <= 0.04, "{t} {recall} {fpr}");
        let (r_lower, f_lower) = rates(&harm, &y, t - 0.02);
        assert!(
            f_lower > 0.04 || r_lower <= recall,
            "a lower threshold within the target would recall more"
        );
    }
}
