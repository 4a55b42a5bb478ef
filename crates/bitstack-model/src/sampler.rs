//! Next-token sampling: greedy, temperature and nucleus (top-p), with a seeded PRNG.

/// A tiny deterministic PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform f64 in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Chooses the next token from logits.
///
/// Temperature 0 (or below) is greedy (argmax, lowest id on ties); otherwise the logits are
/// divided by the temperature, the smallest set of most likely tokens whose probability
/// reaches `top_p` is kept, and one is drawn from it.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: SplitMix64,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler with this temperature, nucleus mass (`top_p` in `(0, 1]`; values outside
    /// are clamped) and seed.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        let top_p = if top_p.is_nan() {
            1.0
        } else {
            top_p.clamp(f32::MIN_POSITIVE, 1.0)
        };
        Self {
            temperature,
            top_p,
            rng: SplitMix64::new(seed),
            candidates: Vec::new(),
        }
    }

    /// The greedy sampler (temperature 0).
    pub fn greedy() -> Self {
        Self::new(0.0, 1.0, 0)
    }

    /// Draws the next token id. `logits` must not be empty.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature.is_nan() || self.temperature <= 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let m = logits
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            return argmax(logits);
        }
        self.candidates.clear();
        let mut z = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - m) * inv_t).exp();
            if p > 0.0 {
                self.candidates.push((p, i as u32));
                z += f64::from(p);
            }
        }
        // Keep the smallest prefix (most likely first, lowest id on ties) whose mass reaches
        // top_p. The order is total, so sorting only as far as that prefix reaches — the
        // next slice chosen by selection, then sorted — gives exactly the full sort's prefix,
        // without sorting the whole vocabulary for every token.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let target = f64::from(self.top_p) * z;
        let len = self.candidates.len();
        let mut mass = 0.0f64;
        let mut keep = len;
        let (mut sorted, mut step) = (0usize, 64usize);
        'prefix: while sorted < len {
            let end = (sorted + step).min(len);
            if end < len {
                self.candidates[sorted..].select_nth_unstable_by(end - sorted - 1, order);
            }
            self.candidates[sorted..end].sort_unstable_by(order);
            for (i, &(p, _)) in self.candidates[sorted..end].iter().enumerate() {
                mass += f64::from(p);
                if mass >= target {
                    keep = sorted + i + 1;
                    break 'prefix;
                }
            }
            sorted = end;
            step = step.saturating_mul(4);
        }
        let kept = &self.candidates[..keep.max(1)];
        let total: f64 = kept.iter().map(|&(p, _)| f64::from(p)).sum();
        let mut r = self.rng.next_f64() * total;
        for &(p, id) in kept {
            r -= f64::from(p);
            if r < 0.0 {
                return id;
            }
        }
        kept.last().map_or(0, |&(_, id)| id)
    }
}

/// Index of the largest logit (first one on ties; NaNs ignored; 0 for an empty slice).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::greedy();
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_p() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let mut a = Sampler::new(1.0, 0.9, 7);
        let mut b = Sampler::new(1.0, 0.9, 7);
        for _ in 0..100 {
            let x = a.sample(&logits);
            assert_eq!(x, b.sample(&logits));
            assert!(x < 2);
        }
        let mut tiny = Sampler::new(1.0, 0.01, 1);
        for _ in 0..20 {
            assert_eq!(tiny.sample(&logits), 0);
        }
    }

    /// The sampler as it was written first (the whole vocabulary sorted for every token):
    /// the oracle for the partial sort.
    fn sample_full_sort(t: f32, top_p: f32, rng: &mut SplitMix64, logits: &[f32]) -> u32 {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut c: Vec<(f32, u32)> = Vec::new();
        let mut z = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let p = ((l - m) * (1.0 / t)).exp();
            if p > 0.0 {
                c.push((p, i as u32));
                z += f64::from(p);
            }
        }
        c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let target = f64::from(top_p) * z;
        let mut mass = 0.0f64;
        let mut keep = c.len();
        for (i, &(p, _)) in c.iter().enumerate() {
            mass += f64::from(p);
            if mass >= target {
                keep = i + 1;
                break;
            }
        }
        let kept = &c[..keep.max(1)];
        let total: f64 = kept.iter().map(|&(p, _)| f64::from(p)).sum();
        let mut r = rng.next_f64() * total;
        for &(p, id) in kept {
            r -= f64::from(p);
            if r < 0.0 {
                return id;
            }
        }
        kept.last().map_or(0, |&(_, id)| id)
    }

    /// Drawing with the partial sort gives the same tokens as sorting everything, over
    /// vocabularies of several sizes, flat and peaked logits, repeated values (ties broken by
    /// id) and nucleus masses from tiny to 1.
    #[test]
    fn partial_sort_draws_the_same_tokens_as_a_full_sort() {
        let mut gen = SplitMix64::new(42);
        for &vocab in &[2usize, 63, 64, 65, 300, 5000] {
            for &(t, top_p) in &[
                (1.0f32, 0.9f32),
                (0.7, 0.95),
                (2.0, 1.0),
                (1.0, 0.01),
                (5.0, 0.999),
            ] {
                for round in 0..4 {
                    let logits: Vec<f32> = (0..vocab)
                        .map(|_| {
                            let u = gen.next_f64() as f32;
                            match round {
                                0 => u * 4.0,
                                1 => (u * 8.0).floor(),
                                2 => -u.ln() * 3.0,
                                _ => u * 0.01,
                            }
                        })
                        .collect();
                    let seed = gen.next_u64();
                    let mut ours = Sampler::new(t, top_p, seed);
                    let mut rng = SplitMix64::new(seed);
                    for _ in 0..5 {
                        assert_eq!(
                            ours.sample(&logits),
                            sample_full_sort(t, top_p, &mut rng, &logits),
                            "vocab {vocab}, t {t}, top_p {top_p}, round {round}"
                        );
                    }
                }
            }
        }
    }
}
