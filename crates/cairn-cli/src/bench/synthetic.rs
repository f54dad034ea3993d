//! A transformer-like training state: fp32 weights drawn from N(0, 0.02)
//! plus Adam's `exp_avg` and `exp_avg_sq` of the same shapes, generated
//! deterministically from a seed.

use cairn::DType;
use cairn::SaveState;

/// One synthetic tensor.
pub struct SynthTensor {
    /// Name, e.g. `model.layers.3.mlp.up_proj.weight.exp_avg`.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Values.
    pub data: Vec<f32>,
    /// Which parameter group it belongs to (weight and its Adam states
    /// share one).
    pub group: usize,
}

impl SynthTensor {
    /// The values as little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: f32 has no padding and any bit pattern is a valid u8.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * 4) }
    }

    /// Mutable byte view.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; every byte pattern is a valid f32.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, self.data.len() * 4)
        }
    }
}

/// A whole synthetic training state.
pub struct SyntheticState {
    /// Tensors: weights, then their Adam states.
    pub tensors: Vec<SynthTensor>,
    /// Stand-in RNG state blob.
    pub rng_state: Vec<u8>,
    /// Stand-in data-loader position blob.
    pub loader_state: Vec<u8>,
    /// Seed it was generated from.
    pub seed: u64,
}

/// xoshiro256++: a small, fast, well-distributed generator.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E3779B97F4A7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Fill with N(0, std) by Box-Muller.
    fn fill_normal(&mut self, out: &mut [f32], std: f32) {
        let mut it = out.chunks_exact_mut(2);
        for pair in &mut it {
            let r = self.next_u64();
            let u1 = ((r >> 40) as f32 + 1.0) * (1.0 / 16_777_217.0);
            let u2 = ((r & 0xFF_FFFF) as f32) * (1.0 / 16_777_216.0);
            let m = (-2.0 * u1.ln()).sqrt() * std;
            let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
            pair[0] = m * c;
            pair[1] = m * s;
        }
        for x in it.into_remainder() {
            *x = (self.next_u64() as f32 / u64::MAX as f32 - 0.5) * std;
        }
    }
}

fn mix(seed: u64, name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    seed ^ u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Shapes of the model's parameters for a state of about `target` bytes
/// (weights + two Adam states, fp32).
fn param_shapes(target: u64) -> Vec<(String, Vec<u64>)> {
    let params = (target / 12).max(64);
    let d: u64 = match params {
        p if p >= 40_000_000 => 1024,
        p if p >= 5_000_000 => 512,
        p if p >= 600_000 => 256,
        _ => 64,
    };
    let per_layer = 12 * d * d + 13 * d;
    let layers = ((params as f64 * 0.85) as u64 / per_layer).clamp(1, 96);
    let vocab = (params.saturating_sub(layers * per_layer + d) / d).max(16);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![d]),
            ("input_layernorm.bias", vec![d]),
            ("self_attn.q_proj.weight", vec![d, d]),
            ("self_attn.q_proj.bias", vec![d]),
            ("self_attn.k_proj.weight", vec![d, d]),
            ("self_attn.k_proj.bias", vec![d]),
            ("self_attn.v_proj.weight", vec![d, d]),
            ("self_attn.v_proj.bias", vec![d]),
            ("self_attn.o_proj.weight", vec![d, d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("post_attention_layernorm.bias", vec![d]),
            ("mlp.up_proj.weight", vec![4 * d, d]),
            ("mlp.up_proj.bias", vec![4 * d]),
            ("mlp.down_proj.weight", vec![d, 4 * d]),
            ("mlp.down_proj.bias", vec![d]),
        ] {
            v.push((format!("{p}.{n}"), s));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    v
}

impl SyntheticState {
    /// Generate a state of about `target` bytes from `seed`, on all cores.
    pub fn generate(target: u64, seed: u64) -> Self {
        let mut tensors = Vec::new();
        for (group, (name, shape)) in param_shapes(target).into_iter().enumerate() {
            let n: u64 = shape.iter().product();
            for suffix in ["", ".exp_avg", ".exp_avg_sq"] {
                let full = if suffix.is_empty() {
                    name.clone()
                } else {
                    format!("optimizer.{name}{suffix}")
                };
                tensors.push(SynthTensor {
                    name: full,
                    shape: shape.clone(),
                    data: Vec::with_capacity(n as usize),
                    group,
                });
            }
        }
        let mut s = SyntheticState {
            tensors,
            rng_state: Vec::new(),
            loader_state: Vec::new(),
            seed,
        };
        let all: Vec<usize> = (0..s.tensors.len()).collect();
        s.fill(&all, seed);
        let mut r = Rng::new(seed);
        s.rng_state = (0..5056).map(|_| r.next_u64() as u8).collect();
        // Fixed width, so every seed gives the same number of bytes.
        s.loader_state = format!(
            "{{\"epoch\":3,\"sample\":{:06},\"seed\":{seed:020}}}",
            r.next_u64() % 1_000_000
        )
        .into_bytes();
        s
    }

    /// (Re)fill tensors `which` with values derived from `seed`.
    fn fill(&mut self, which: &[usize], seed: u64) {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut refs: Vec<&mut SynthTensor> = self
            .tensors
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which.contains(i))
            .map(|(_, t)| t)
            .collect();
        let mut buckets: Vec<Vec<&mut SynthTensor>> = (0..threads).map(|_| Vec::new()).collect();
        let mut loads = vec![0u64; threads];
        refs.sort_by_key(|t| std::cmp::Reverse(t.shape.iter().product::<u64>()));
        for t in refs.drain(..) {
            let i = (0..threads).min_by_key(|&i| loads[i]).unwrap_or(0);
            loads[i] += t.shape.iter().product::<u64>();
            buckets[i].push(t);
        }
        std::thread::scope(|sc| {
            for bucket in buckets {
                sc.spawn(move || {
                    for t in bucket {
                        let n = t.shape.iter().product::<u64>() as usize;
                        t.data.resize(n, 0.0);
                        let mut rng = Rng::new(mix(seed, &t.name));
                        if t.name.ends_with(".exp_avg_sq") {
                            rng.fill_normal(&mut t.data, 1e-3);
                            for x in t.data.iter_mut() {
                                *x *= *x;
                            }
                        } else if t.name.ends_with(".exp_avg") {
                            rng.fill_normal(&mut t.data, 1e-3);
                        } else {
                            rng.fill_normal(&mut t.data, 0.02);
                        }
                    }
                });
            }
        });
    }

    /// Change about `fraction` of the bytes: whole parameter groups (a
    /// weight and its Adam states) get new values. Returns the bytes
    /// changed.
    pub fn perturb(&mut self, fraction: f64, seed: u64) -> u64 {
        let total = self.logical_bytes() as f64;
        let groups = self.tensors.iter().map(|t| t.group).max().unwrap_or(0) + 1;
        let mut order: Vec<usize> = (0..groups).collect();
        let mut r = Rng::new(seed);
        for i in (1..order.len()).rev() {
            order.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut chosen = Vec::new();
        let mut changed = 0u64;
        for g in order {
            if changed as f64 >= total * fraction {
                break;
            }
            let gb: u64 = self
                .tensors
                .iter()
                .filter(|t| t.group == g)
                .map(|t| t.bytes().len() as u64)
                .sum();
            if (changed + gb) as f64 > total * fraction * 1.5 {
                continue;
            }
            changed += gb;
            chosen.extend(
                self.tensors
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| t.group == g)
                    .map(|(i, _)| i),
            );
        }
        self.fill(&chosen, seed);
        changed
    }

    /// Bytes of tensors and blobs.
    pub fn logical_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.bytes().len() as u64)
            .sum::<u64>()
            + (self.rng_state.len() + self.loader_state.len()) as u64
    }

    /// A [`SaveState`] borrowing this state.
    pub fn as_save_state(&self) -> SaveState<'_> {
        let mut s = SaveState::new();
        for t in &self.tensors {
            s = s.tensor(t.name.clone(), DType::F32, &t.shape, t.bytes());
        }
        s.blob("rng_state", &self.rng_state)
            .blob("dataloader", &self.loader_state)
            .metadata(serde_json::json!({"seed": self.seed, "optimizer": "adamw", "lr": 3e-4}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_determinism() {
        let a = SyntheticState::generate(8 << 20, 1);
        let b = SyntheticState::generate(8 << 20, 1);
        let got = a.logical_bytes() as f64;
        assert!((got / (8u64 << 20) as f64 - 1.0).abs() < 0.3, "{got}");
        assert!(a.tensors.len() >= 45);
        assert!(a
            .tensors
            .iter()
            .zip(&b.tensors)
            .all(|(x, y)| x.data == y.data));
        for seed in [0, 9, 1 << 40, u64::MAX] {
            let other = SyntheticState::generate(8 << 20, seed);
            assert_eq!(other.logical_bytes(), a.logical_bytes(), "seed {seed}");
        }
        let mut c = SyntheticState::generate(8 << 20, 1);
        let changed = c.perturb(0.1, 99) as f64 / got;
        assert!((0.05..0.2).contains(&changed), "{changed}");
    }
}
