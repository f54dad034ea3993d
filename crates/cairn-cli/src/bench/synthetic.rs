//! A transformer-like training state: weights drawn from N(0, 0.02) plus
//! Adam's `exp_avg` (N(0, 1e-3)) and `exp_avg_sq` (its square: positive and
//! small) of the same shapes, generated deterministically from a seed, in
//! one of three precisions ([`Precision`]): all fp32, all bf16, or mixed
//! (bf16 weights with fp32 master weights and Adam moments).

use cairn::DType;
use cairn::SaveState;

/// One synthetic tensor.
pub struct SynthTensor {
    /// Name, e.g. `model.layers.3.mlp.up_proj.weight.exp_avg`.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Storage of the values: fp32 values, or bf16 values packed two per
    /// slot (see [`SynthTensor::bytes`]).
    pub data: Vec<f32>,
    /// Which parameter group it belongs to (weight and its Adam states
    /// share one).
    pub group: usize,
    /// Element type: F32 or BF16.
    pub dtype: DType,
}

impl SynthTensor {
    /// Bytes of the tensor.
    fn byte_len(&self) -> usize {
        self.shape.iter().product::<u64>() as usize * self.dtype.size()
    }

    /// The values as little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        let n = self.byte_len().min(self.data.len() * 4);
        // SAFETY: f32 has no padding and any bit pattern is a valid u8;
        // n is within the allocation.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, n) }
    }

    /// Mutable byte view.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.byte_len().min(self.data.len() * 4);
        // SAFETY: as above; every byte pattern is a valid f32.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, n) }
    }

    /// Length of [`SynthTensor::data`] for the tensor's shape and dtype.
    fn storage_len(&self) -> usize {
        let n = self.shape.iter().product::<u64>() as usize;
        if self.dtype == DType::BF16 {
            n.div_ceil(2)
        } else {
            n
        }
    }

    /// Fill the tensor's storage with values from `rng` scaled by `std`
    /// (squared where `square`), in its dtype (bf16: rounded to nearest
    /// even). BF16 values are drawn a block at a time into `scratch`; the
    /// draws are the same as for one slice of the whole length (blocks of
    /// an even length end on a pair).
    fn fill_values(&mut self, rng: &mut Rng, std: f32, square: bool, scratch: &mut Vec<f32>) {
        let draw = |rng: &mut Rng, out: &mut [f32]| {
            rng.fill_normal(out, std);
            if square {
                for x in out.iter_mut() {
                    *x *= *x;
                }
            }
        };
        if self.dtype != DType::BF16 {
            draw(rng, &mut self.data);
            return;
        }
        const BLOCK: usize = 1 << 16;
        let n = self.shape.iter().product::<u64>() as usize;
        let out = self.bytes_mut();
        for start in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - start);
            scratch.resize(len, 0.0);
            draw(rng, scratch);
            for (i, v) in scratch.iter().enumerate() {
                let b = v.to_bits();
                let r = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
                let at = 2 * (start + i);
                out[at..at + 2].copy_from_slice(&r.to_le_bytes());
            }
        }
    }
}

/// The precision of a synthetic training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 weights and Adam moments.
    #[default]
    Fp32,
    /// bf16 weights and Adam moments.
    Bf16,
    /// bf16 weights, with fp32 master weights and Adam moments (the usual
    /// mixed-precision state).
    Mixed,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "mixed" => Ok(Precision::Mixed),
            _ => Err(format!("{s:?}: expected fp32, bf16 or mixed")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Mixed => "mixed",
        })
    }
}

impl Precision {
    /// Bytes of state per parameter.
    fn bytes_per_param(self) -> u64 {
        match self {
            Precision::Fp32 => 12,
            Precision::Bf16 => 6,
            Precision::Mixed => 14,
        }
    }

    /// The tensors of each parameter: name suffix and dtype.
    fn members(self) -> &'static [(&'static str, DType)] {
        match self {
            Precision::Fp32 => &[
                ("", DType::F32),
                (".exp_avg", DType::F32),
                (".exp_avg_sq", DType::F32),
            ],
            Precision::Bf16 => &[
                ("", DType::BF16),
                (".exp_avg", DType::BF16),
                (".exp_avg_sq", DType::BF16),
            ],
            Precision::Mixed => &[
                ("", DType::BF16),
                (".master", DType::F32),
                (".exp_avg", DType::F32),
                (".exp_avg_sq", DType::F32),
            ],
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
/// at `bytes_per_param`.
fn param_shapes(target: u64, bytes_per_param: u64) -> Vec<(String, Vec<u64>)> {
    let params = (target / bytes_per_param).max(64);
    let mut d: u64 = match params {
        p if p >= 40_000_000 => 1024,
        p if p >= 5_000_000 => 512,
        p if p >= 600_000 => 256,
        _ => 64,
    };
    // A width whose one layer overshoots the layers' share would make a
    // state larger than asked (8 MiB of fp32 made 9.1 MiB): narrow it.
    let layer = |d: u64| 12 * d * d + 13 * d;
    while d > 64 && layer(d) as f64 > params as f64 * 0.85 {
        d /= 2;
    }
    let per_layer = layer(d);
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
    /// Generate an fp32 state of about `target` bytes from `seed`, on all
    /// cores.
    pub fn generate(target: u64, seed: u64) -> Self {
        Self::generate_with(target, seed, Precision::Fp32)
    }

    /// Generate a state of about `target` bytes in `precision` from
    /// `seed`, on all cores.
    pub fn generate_with(target: u64, seed: u64, precision: Precision) -> Self {
        let mut tensors = Vec::new();
        let shapes = param_shapes(target, precision.bytes_per_param());
        for (group, (name, shape)) in shapes.into_iter().enumerate() {
            for &(suffix, dtype) in precision.members() {
                let full = if suffix.is_empty() {
                    name.clone()
                } else {
                    format!("optimizer.{name}{suffix}")
                };
                tensors.push(SynthTensor {
                    name: full,
                    shape: shape.clone(),
                    data: Vec::new(),
                    group,
                    dtype,
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
        // Storage is allocated here, by the calling thread, and refilled
        // in place: memory allocated by the fill threads would be kept by
        // their malloc arenas once freed, and each new state would take
        // more of it (a bench's RSS grew by most of a state per iteration).
        for &i in which {
            let t = &mut self.tensors[i];
            let len = t.storage_len();
            if t.data.len() != len {
                t.data = vec![0f32; len];
            }
        }
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
                    let mut scratch = Vec::new();
                    for t in bucket {
                        // A master weight holds the same values as its
                        // weight (before rounding to bf16).
                        let key = t.name.strip_suffix(".master").map_or(t.name.as_str(), |w| {
                            w.strip_prefix("optimizer.").unwrap_or(w)
                        });
                        let mut rng = Rng::new(mix(seed, key));
                        let (std, square) = if t.name.ends_with(".exp_avg_sq") {
                            (1e-3, true)
                        } else if t.name.ends_with(".exp_avg") {
                            (1e-3, false)
                        } else {
                            (0.02, false)
                        };
                        t.fill_values(&mut rng, std, square, &mut scratch);
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
            s = s.tensor(t.name.clone(), t.dtype, &t.shape, t.bytes());
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
        assert!((got / (8u64 << 20) as f64 - 1.0).abs() < 0.01, "{got}");
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
        let before: Vec<*const f32> = c.tensors.iter().map(|t| t.data.as_ptr()).collect();
        let changed = c.perturb(0.1, 99) as f64 / got;
        assert!((0.05..0.2).contains(&changed), "{changed}");
        // Changed tensors are refilled in place, in the storage the calling
        // thread allocated (see `fill`).
        assert!(c
            .tensors
            .iter()
            .zip(&before)
            .all(|(t, &p)| t.data.as_ptr() == p));
        assert!(c
            .tensors
            .iter()
            .zip(&a.tensors)
            .any(|(x, y)| x.data != y.data));
    }

    #[test]
    fn a_state_is_the_size_asked_for() {
        // Shapes only: every size from 1 MiB up comes within 1% of the
        // request, in every precision.
        for p in [Precision::Fp32, Precision::Bf16, Precision::Mixed] {
            let mut target = 1u64 << 20;
            while target <= 8 << 30 {
                for t in [target, target + target / 3] {
                    let got: u64 = param_shapes(t, p.bytes_per_param())
                        .iter()
                        .map(|(_, s)| s.iter().product::<u64>())
                        .sum::<u64>()
                        * p.bytes_per_param();
                    let r = got as f64 / t as f64;
                    assert!((r - 1.0).abs() < 0.01, "{p} {t}: {got} ({r:.3})");
                }
                target *= 2;
            }
        }
    }

    #[test]
    fn precisions() {
        for p in [Precision::Bf16, Precision::Mixed] {
            let s = SyntheticState::generate_with(8 << 20, 1, p);
            let got = s.logical_bytes() as f64;
            assert!((got / (8u64 << 20) as f64 - 1.0).abs() < 0.01, "{p} {got}");
            let bf16: Vec<&SynthTensor> = s
                .tensors
                .iter()
                .filter(|t| t.dtype == DType::BF16)
                .collect();
            assert!(!bf16.is_empty(), "{p}");
            for t in &bf16 {
                let n: u64 = t.shape.iter().product();
                assert_eq!(t.bytes().len() as u64, 2 * n, "{}", t.name);
            }
            // bf16 weights of N(0, 0.02): the high bytes are not all equal
            // and the values are finite and small.
            let w = bf16[0].bytes();
            let vals: Vec<f32> = w
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect();
            assert!(vals.iter().all(|v| v.is_finite() && v.abs() < 0.5));
            assert!(vals.iter().any(|v| *v != vals[0]));
        }
        let m = SyntheticState::generate_with(8 << 20, 1, Precision::Mixed);
        assert!(m
            .tensors
            .iter()
            .any(|t| t.name.ends_with(".master") && t.dtype == DType::F32));
    }
}
