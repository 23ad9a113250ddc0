//! Widening a trained U-Net without changing what it computes (Net2WiderNet, Chen et al. 2016),
//! so that a wider network starts training where a narrower one left off instead of from
//! random weights: on a CPU that is the difference between hours and days.
//!
//! Every channel space (the output of one conv + batch norm + ReLU unit) grows from `c` to
//! `c'` channels: the first `c` are the old ones, each new one copies an old channel (its
//! incoming kernel and its batch-norm parameters and statistics), so its activations equal the
//! original's. Every consumer of that space (the next convolution, the decoder's skip
//! concatenation, the 1x1 head) then splits each old incoming weight among the copies with
//! random fractions that sum to one. The sum over copies is the old weight, so the output is
//! unchanged; because the fractions differ, the copies receive different gradients and can
//! diverge while training (equal halves would keep them identical for ever).

use super::{ModelConfig, ModelError, UNet};
use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use std::collections::HashMap;

/// How the channels of one space map to the old ones: `source[j]` is the old channel that new
/// channel `j` copies.
#[derive(Clone, Debug)]
struct ChannelMap {
    source: Vec<usize>,
    copies: Vec<usize>,
}

impl ChannelMap {
    fn identity(c: usize) -> Self {
        Self {
            source: (0..c).collect(),
            copies: vec![1; c],
        }
    }

    /// `old` channels grown to `new`: the old ones first, then copies drawn evenly (each old
    /// channel is copied at most once more than any other) in a seeded random order.
    fn grow(old: usize, new: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Self {
        let mut source: Vec<usize> = (0..old).collect();
        while source.len() < new {
            let mut round: Vec<usize> = (0..old).collect();
            round.shuffle(rng);
            source.extend(round.into_iter().take(new - source.len()));
        }
        let mut copies = vec![0; old];
        for &s in &source {
            copies[s] += 1;
        }
        Self { source, copies }
    }

    /// Two spaces side by side (the decoder's `[upsampled, skip]` concatenation).
    fn concat(a: &Self, b: &Self) -> Self {
        let offset = a.copies.len();
        Self {
            source: a
                .source
                .iter()
                .copied()
                .chain(b.source.iter().map(|s| s + offset))
                .collect(),
            copies: a.copies.iter().chain(&b.copies).copied().collect(),
        }
    }

    fn len(&self) -> usize {
        self.source.len()
    }
}

/// Per element, the share of an old weight that each copy of its input channel takes: random
/// in `[0.5, 1.5] / copies`, normalised over the copies so that they sum to exactly one.
fn shares(
    map: &ChannelMap,
    rows: usize,
    taps: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<f32> {
    let cin = map.len();
    let mut share = vec![0f32; rows * cin * taps];
    let mut total = vec![0f32; rows * map.copies.len() * taps];
    for o in 0..rows {
        for (j, &s) in map.source.iter().enumerate() {
            for t in 0..taps {
                let v = if map.copies[s] == 1 {
                    1.0
                } else {
                    rng.random_range(0.5f32..1.5)
                };
                share[(o * cin + j) * taps + t] = v;
                total[(o * map.copies.len() + s) * taps + t] += v;
            }
        }
    }
    for o in 0..rows {
        for (j, &s) in map.source.iter().enumerate() {
            for t in 0..taps {
                share[(o * cin + j) * taps + t] /= total[(o * map.copies.len() + s) * taps + t];
            }
        }
    }
    share
}

/// `old` `(rows, cin_old, taps)` weights -> `(out.len(), input.len(), taps)`: rows copied by
/// `out`, input channels split among their copies by `input`.
fn remap(
    old: &[f32],
    cin_old: usize,
    taps: usize,
    out: &ChannelMap,
    input: &ChannelMap,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<f32> {
    let rows = out.len();
    let cin = input.len();
    let share = shares(input, rows, taps, rng);
    let mut w = vec![0f32; rows * cin * taps];
    for (o, &so) in out.source.iter().enumerate() {
        for (j, &sj) in input.source.iter().enumerate() {
            for t in 0..taps {
                let i = (o * cin + j) * taps + t;
                w[i] = old[(so * cin_old + sj) * taps + t] * share[i];
            }
        }
    }
    w
}

/// The same network with `base_channels` channels at its first level (and twice as many at
/// each level below), computing the same heatmaps. `seed` draws which channels are copied and
/// how their weights are shared. The card records where the network came from.
pub fn widen(net: &UNet, base_channels: usize, seed: u64) -> Result<UNet, ModelError> {
    let old_cfg = &net.config;
    if base_channels < old_cfg.base_channels {
        return Err(ModelError::Config(format!(
            "cannot widen {} base channels to fewer ({base_channels})",
            old_cfg.base_channels
        )));
    }
    let cfg = ModelConfig {
        base_channels,
        card: serde_json::json!({
            "widened_from": { "base_channels": old_cfg.base_channels, "seed": seed, "card": old_cfg.card },
        }),
        ..old_cfg.clone()
    };
    let wide = UNet::unseeded(cfg.clone(), net.device())?;
    let old = net.tensors();
    let get = |name: &str| -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        let t = old.get(name).ok_or_else(|| {
            ModelError::Config(format!("{name} missing (not a trainable network?)"))
        })?;
        Ok((t.flatten_all()?.to_vec1::<f32>()?, t.dims().to_vec()))
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out: HashMap<String, Vec<f32>> = HashMap::new();
    // One unit: its conv reads `input`, its outputs grow as `grown` (returned).
    let mut unit = |prefix: &str,
                    level: usize,
                    input: &ChannelMap,
                    out: &mut HashMap<String, Vec<f32>>|
     -> Result<ChannelMap, ModelError> {
        let grown = ChannelMap::grow(old_cfg.channels(level), cfg.channels(level), &mut rng);
        let (w, dims) = get(&format!("{prefix}.conv.weight"))?;
        let taps = dims[2] * dims[3];
        out.insert(
            format!("{prefix}.conv.weight"),
            remap(&w, dims[1], taps, &grown, input, &mut rng),
        );
        for p in ["weight", "bias", "running_mean", "running_var"] {
            let (v, _) = get(&format!("{prefix}.bn.{p}"))?;
            out.insert(
                format!("{prefix}.bn.{p}"),
                grown.source.iter().map(|&s| v[s]).collect(),
            );
        }
        Ok(grown)
    };
    let mut skips = Vec::with_capacity(cfg.depth);
    let mut h = ChannelMap::identity(1);
    for i in 0..cfg.depth {
        let a = unit(&format!("enc{i}.0"), i, &h, &mut out)?;
        h = unit(&format!("enc{i}.1"), i, &a, &mut out)?;
        skips.push(h.clone());
    }
    for j in (0..cfg.depth - 1).rev() {
        let cat = ChannelMap::concat(&h, &skips[j]);
        let a = unit(&format!("dec{j}.0"), j, &cat, &mut out)?;
        h = unit(&format!("dec{j}.1"), j, &a, &mut out)?;
    }
    let (w, dims) = get("head.weight")?;
    let rows = ChannelMap::identity(dims[0]);
    out.insert(
        "head.weight".into(),
        remap(&w, dims[1], 1, &rows, &h, &mut rng),
    );
    out.insert("head.bias".into(), get("head.bias")?.0);

    wide.set_vars(|name, var| {
        let v = out.remove(name).ok_or_else(|| {
            ModelError::Config(format!("widening does not know the tensor {name}"))
        })?;
        Ok::<_, ModelError>(Tensor::from_vec(v, var.dims(), net.device())?)
    })?;
    Ok(wide)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grown_maps_keep_the_old_channels_and_copy_evenly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let m = ChannelMap::grow(4, 10, &mut rng);
        assert_eq!(&m.source[..4], &[0, 1, 2, 3]);
        assert_eq!(m.copies.iter().sum::<usize>(), 10);
        // 10 over 4: every old channel 2 or 3 times.
        assert!(
            m.copies.iter().all(|&c| (2..=3).contains(&c)),
            "{:?}",
            m.copies
        );
    }

    #[test]
    fn shares_of_the_copies_sum_to_one_and_differ() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let m = ChannelMap::grow(3, 5, &mut rng);
        let s = shares(&m, 2, 9, &mut rng);
        for o in 0..2 {
            for old in 0..3 {
                for t in 0..9 {
                    let parts: Vec<f32> = (0..5)
                        .filter(|&j| m.source[j] == old)
                        .map(|j| s[(o * 5 + j) * 9 + t])
                        .collect();
                    let sum: f32 = parts.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-6, "{parts:?}");
                    if parts.len() > 1 {
                        assert!(parts.windows(2).any(|p| p[0] != p[1]), "{parts:?}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;
    use candle_core::Device;

    /// A small network with every parameter and statistic random, batch norm included (a
    /// fresh network's unit scales and zero means would hide a wrongly copied statistic).
    fn random_net(base: usize) -> UNet {
        let cfg = ModelConfig {
            depth: 3,
            base_channels: base,
            input_size: 32,
            ..ModelConfig::default()
        };
        let net = UNet::with_seed(cfg, &Device::Cpu, 5).expect("network");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let data = net.vars.data().lock().expect("vars");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            if var.dims().len() > 1 {
                continue;
            }
            let (lo, hi) = if name.ends_with("running_var") || name.ends_with("bn.weight") {
                (0.5f32, 2.0)
            } else {
                (-0.5, 0.5)
            };
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(lo..hi))
                .collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).expect("t"))
                .expect("set");
        }
        drop(data);
        net
    }

    fn input(b: usize) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let v: Vec<f32> = (0..b * 32 * 32)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        Tensor::from_vec(v, (b, 1, 32, 32), &Device::Cpu).expect("input")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }

    #[test]
    fn a_widened_network_computes_the_same_heatmaps() {
        let net = random_net(4);
        let wide = widen(&net, 7, 11).expect("widen");
        assert_eq!(wide.config.base_channels, 7);
        assert_eq!(wide.config.channels(2), 28);
        assert!(wide.parameter_count() > 2 * net.parameter_count());
        let x = input(3);
        let scale = net
            .forward(&x, false)
            .and_then(|y| y.abs())
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.max(0))
            .and_then(|y| y.to_scalar::<f32>())
            .expect("scale");
        // Inference (running statistics), the fused inference network and training mode
        // (batch statistics) all agree with the narrow network.
        let tol = 1e-4 * scale.max(1.0);
        let d_eval = max_diff(
            &net.forward(&x, false).expect("narrow"),
            &wide.forward(&x, false).expect("wide"),
        );
        assert!(
            d_eval < tol,
            "inference differs by {d_eval} (scale {scale})"
        );
        let d_fused = max_diff(
            &net.fused()
                .and_then(|n| Ok(n.forward(&x, false)?))
                .expect("narrow"),
            &wide
                .fused()
                .and_then(|n| Ok(n.forward(&x, false)?))
                .expect("wide"),
        );
        assert!(d_fused < tol, "fused inference differs by {d_fused}");
        let d_train = max_diff(
            &net.forward(&x, true).expect("narrow"),
            &wide.forward(&x, true).expect("wide"),
        );
        assert!(d_train < tol, "training forward differs by {d_train}");
    }

    #[test]
    fn the_copies_get_different_gradients() {
        // Equal shares would give a channel and its copy the same gradient for ever.
        let wide = widen(&random_net(2), 4, 1).expect("widen");
        let x = input(2);
        let loss = wide
            .forward(&x, true)
            .and_then(|y| y.sqr())
            .and_then(|y| y.sum_all())
            .expect("loss");
        let grads = loss.backward().expect("backward");
        let data = wide.vars.data().lock().expect("vars");
        let w = &data["enc1.0.conv.weight"];
        let g = grads.get(w.as_tensor()).expect("gradient");
        let rows: Vec<Vec<f32>> = (0..8)
            .map(|o| {
                g.get(o)
                    .and_then(|r| r.flatten_all()?.to_vec1())
                    .expect("row")
            })
            .collect();
        // Level 1 grew from 4 to 8 channels: no two rows have the same gradient.
        for a in 0..8 {
            for b in a + 1..8 {
                assert_ne!(rows[a], rows[b], "rows {a} and {b}");
            }
        }
    }

    #[test]
    fn narrowing_is_refused() {
        let err = widen(&random_net(4), 3, 0).err().expect("refused");
        assert!(err.to_string().contains("fewer"), "{err}");
    }
}
