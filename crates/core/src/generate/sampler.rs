//! Token sampling: greedy, temperature, top-k, top-p, seeded. Buffers are kept between calls so
//! sampling allocates nothing per token.

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: crate::rng::Rng,
    idx: Vec<u32>,
    prob: Vec<f32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = crate::rng::Rng::new(cfg.seed);
        Sampler {
            cfg,
            rng,
            idx: vec![],
            prob: vec![],
        }
    }

    /// A fresh sampler under `cfg`, keeping the buffers.
    pub fn reset(&mut self, cfg: SamplerConfig) {
        self.rng = crate::rng::Rng::new(cfg.seed);
        self.cfg = cfg;
    }

    /// Uniform in [0, 1), 24 bits, from this sampler's seeded stream.
    pub fn draw(&mut self) -> f32 {
        (self.rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Greedy configs (and temperatures whose inverse overflows) take the argmax.
    fn greedy(&self) -> bool {
        self.cfg.temperature <= 0.0 || !(1.0 / self.cfg.temperature).is_finite()
    }

    /// Fills `idx` (best first) and unnormalised `prob` with the tokens `sample` may draw after
    /// top-k, temperature and top-p; returns how many are kept and their total mass.
    fn prepare(&mut self, logits: &[f32]) -> (usize, f32) {
        let inv_t = 1.0 / self.cfg.temperature;
        let n = logits.len();
        self.idx.clear();
        self.idx.extend(0..n as u32);
        let k = if self.cfg.top_k > 0 {
            self.cfg.top_k.min(n)
        } else {
            n
        };
        if k < n {
            self.idx.select_nth_unstable_by(k - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            self.idx.truncate(k);
        }
        self.idx
            .sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let m = logits[self.idx[0] as usize];
        self.prob.clear();
        let mut sum = 0f32;
        for &i in &self.idx {
            let p = ((logits[i as usize] - m) * inv_t).exp();
            self.prob.push(p);
            sum += p;
        }
        // Nucleus: the smallest prefix with mass >= top_p.
        let mut keep = self.prob.len();
        if self.cfg.top_p < 1.0 {
            let mut c = 0f32;
            for (j, p) in self.prob.iter().enumerate() {
                c += p / sum;
                if c >= self.cfg.top_p {
                    keep = j + 1;
                    break;
                }
            }
        }
        (keep, self.prob[..keep].iter().sum())
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.greedy() {
            return argmax(logits);
        }
        let (keep, total) = self.prepare(logits);
        let mut r = self.draw() * total;
        for j in 0..keep {
            r -= self.prob[j];
            if r <= 0.0 {
                return self.idx[j];
            }
        }
        self.idx[keep - 1]
    }

    /// The distribution `sample` draws from, dense over the vocabulary (`out.len()` =
    /// `logits.len()`): one-hot at the argmax when greedy. For speculative sampling.
    pub fn probs(&mut self, logits: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        if self.greedy() {
            out[argmax(logits) as usize] = 1.0;
            return;
        }
        let (keep, total) = self.prepare(logits);
        for j in 0..keep {
            out[self.idx[j] as usize] = self.prob[j] / total;
        }
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn greedy_and_seeded() {
        let l = [0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(SamplerConfig::default()).sample(&l), 1);
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&l)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..50).map(|_| s.sample(&l)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2));
        assert!(a.contains(&1) && a.contains(&2));
        // top_p small keeps only the best
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.1,
            seed: 1,
        });
        assert!((0..20).all(|_| s.sample(&l) == 1));
        // A denormal temperature (1/T = inf) is greedy, not NaN probabilities.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1e-45,
            ..SamplerConfig::default()
        });
        assert_eq!(s.sample(&l), 1);
    }
}
