//! Hyper-parameters of a checkpoint: one struct for every architecture and format, with per-layer
//! sizes along the elastic axes (llama.cpp's `llama_hparams`), so a sliced checkpoint may differ
//! per layer. Each architecture reads config.json into it through its serde config; GGUF metadata
//! is read and written here through llama.cpp's key names, which every architecture shares.

use crate::error::{Error, Result};
use crate::formats::gguf::{Gguf, Value};
use crate::shape::{Axis, AxisMap, LayerKind, Shape};

/// One layer: its kind and its size along each axis (0 where the axis does not apply).
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub kind: LayerKind,
    pub size: AxisMap<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    pub vocab: usize,
    pub context: usize,
    /// The one size per axis a config states (what [`Shape`] holds); kept for axes no layer has.
    pub size: AxisMap<usize>,
    pub layers: Vec<Layer>,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope_theta: f32,
    pub mamba_groups: usize,
    pub ssm_state: usize,
    pub conv_k: usize,
    pub chunk: usize,
    /// Mamba Δt clamp (`time_step_limit`).
    pub dt_limit: [f32; 2],
    pub experts_per_tok: usize,
    pub expert_groups: usize,
    pub expert_groups_used: usize,
    pub norm_topk: bool,
    pub routed_scale: f32,
    /// Output head tied to the embedding (None: an `lm_head` tensor decides).
    pub tied: Option<bool>,
}

impl HParams {
    /// Every layer sized by `size` along the axes its kind has; the other fields at their
    /// defaults (set by the caller).
    pub fn new(kinds: &[LayerKind], size: AxisMap<usize>) -> HParams {
        let layers = kinds
            .iter()
            .map(|&kind| Layer {
                kind,
                size: size.map(|a, &v| if a.applies(kind) { v } else { 0 }),
            })
            .collect();
        HParams {
            vocab: 0,
            context: 4096,
            size,
            layers,
            kv_heads: 0,
            head_dim: 0,
            eps: 1e-5,
            rope_theta: 10000.0,
            mamba_groups: 1,
            ssm_state: 0,
            conv_k: 4,
            chunk: 128,
            dt_limit: [0.0, f32::INFINITY],
            experts_per_tok: 0,
            expert_groups: 1,
            expert_groups_used: 1,
            norm_topk: true,
            routed_scale: 1.0,
            tied: None,
        }
    }

    pub fn hidden(&self) -> usize {
        self.size[Axis::Hidden]
    }

    pub fn kinds(&self) -> Vec<LayerKind> {
        self.layers.iter().map(|l| l.kind).collect()
    }

    pub fn has(&self, k: LayerKind) -> bool {
        self.layers.iter().any(|l| l.kind == k)
    }

    pub fn shape(&self) -> Shape {
        let s = |a| self.size[a];
        Shape {
            hidden: s(Axis::Hidden),
            layers: self.kinds(),
            heads: s(Axis::Heads),
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn: s(Axis::Ffn),
            moe_ffn: s(Axis::MoeFfn),
            experts: s(Axis::Experts),
            experts_per_tok: self.experts_per_tok,
            expert_groups: self.expert_groups.max(1),
            shared_ffn: s(Axis::SharedFfn),
            mamba_heads: s(Axis::MambaHeads),
            mamba_head_dim: s(Axis::MambaHeadDim),
            mamba_groups: self.mamba_groups,
            ssm_state: self.ssm_state,
        }
    }

    /// The one value of an axis over the layers that have it (configs hold one number);
    /// [`HParams::size`] when no layer has it.
    pub fn uniform(&self, a: Axis) -> Result<usize> {
        let mut vals = self
            .layers
            .iter()
            .filter(|l| a.applies(l.kind))
            .map(|l| l.size[a]);
        let Some(v) = vals.next() else {
            return Ok(self.size[a]);
        };
        if vals.all(|x| x == v) {
            Ok(v)
        } else {
            Err(Error::Input(format!(
                "{a} differs between layers; this format stores one value for all layers (per-layer sizes can be written to GGUF for the feed-forward widths only)"
            )))
        }
    }

    /// Per layer: the dense or routed-expert feed-forward width (GGUF `feed_forward_length`).
    fn ffn_per_layer(&self) -> Vec<usize> {
        let f = |l: &Layer| match l.kind {
            LayerKind::Moe => l.size[Axis::MoeFfn],
            _ => l.size[Axis::Ffn],
        };
        self.layers.iter().map(f).collect()
    }

    /// Reads GGUF metadata (`{arch}.*` keys) for the given layer kinds. `required`: keys the
    /// architecture cannot do without (the others default as llama.cpp defaults them).
    pub fn from_gguf(g: &Gguf, kinds: Vec<LayerKind>, required: &[&str]) -> Result<HParams> {
        let arch = g.str("general.architecture")?;
        let key = |k: &str| format!("{arch}.{k}");
        for k in required {
            g.u64(&key(k))?;
        }
        let uo = |k: &str, d: usize| {
            g.get(&key(k))
                .and_then(|v| v.as_u64())
                .map_or(d, |v| v as usize)
        };
        let fo = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let n = kinds.len();
        let arr = |k: &str| g.per_layer(&key(k), n).unwrap_or_else(|_| vec![0; n]);
        let (heads, kv, ff) = (
            arr("attention.head_count"),
            arr("attention.head_count_kv"),
            arr("feed_forward_length"),
        );
        // The first layer of a kind gives the model-wide value.
        let first = |k: fn(LayerKind) -> bool, a: &[u64]| {
            kinds
                .iter()
                .zip(a)
                .find(|(x, _)| k(**x))
                .map_or(0, |(_, v)| *v as usize)
        };
        let hidden = uo("embedding_length", 0);
        let h = match first(LayerKind::has_attention, &heads) {
            0 => heads.iter().copied().max().unwrap_or(0) as usize,
            h => h,
        };
        let (inner, mh) = (uo("ssm.inner_size", 0), uo("ssm.time_step_rank", 0));
        let mut size = AxisMap::default();
        size[Axis::Hidden] = hidden;
        size[Axis::Heads] = h;
        size[Axis::Ffn] = first(LayerKind::has_mlp, &ff);
        size[Axis::MoeFfn] = uo("expert_feed_forward_length", 0);
        size[Axis::Experts] = uo("expert_count", 0);
        size[Axis::SharedFfn] = if uo("expert_shared_count", 1) > 0 {
            uo("expert_shared_feed_forward_length", 0)
        } else {
            0
        };
        size[Axis::MambaHeads] = mh;
        size[Axis::MambaHeadDim] = inner.checked_div(mh).unwrap_or(0);
        let mut hp = HParams::new(&kinds, size);
        // Per-layer sizes where the metadata gives them per layer.
        for (i, l) in hp.layers.iter_mut().enumerate() {
            match l.kind {
                LayerKind::Moe if ff[i] > 0 => l.size[Axis::MoeFfn] = ff[i] as usize,
                k if k.has_mlp() && ff[i] > 0 => l.size[Axis::Ffn] = ff[i] as usize,
                _ => {}
            }
            if l.kind.has_attention() && heads[i] > 0 {
                l.size[Axis::Heads] = heads[i] as usize;
            }
        }
        hp.vocab = g.tensors.get("token_embd.weight")?.shape[0];
        hp.context = uo("context_length", 4096);
        hp.kv_heads = match first(LayerKind::has_attention, &kv) {
            0 => h,
            k => k,
        };
        hp.head_dim = uo("attention.key_length", hidden.checked_div(h).unwrap_or(0));
        hp.eps = fo("attention.layer_norm_rms_epsilon")
            .or(fo("attention.layer_norm_epsilon"))
            .unwrap_or(1e-5) as f32;
        hp.rope_theta = fo("rope.freq_base").unwrap_or(10000.0) as f32;
        hp.mamba_groups = uo("ssm.group_count", 1);
        hp.ssm_state = uo("ssm.state_size", 0);
        hp.conv_k = uo("ssm.conv_kernel", 4);
        hp.experts_per_tok = uo("expert_used_count", 0);
        hp.expert_groups = uo("expert_group_count", 1).max(1);
        hp.expert_groups_used = uo("expert_group_used_count", 1).max(1);
        hp.norm_topk = g
            .get(&key("expert_weights_norm"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        hp.routed_scale = fo("expert_weights_scale").unwrap_or(1.0) as f32;
        Ok(hp)
    }

    /// GGUF metadata under `arch` (llama.cpp's converter keys) but the `unused` ones. Per-layer
    /// arrays where layers differ; zeros mark layers without the axis, as llama.cpp reads hybrids.
    pub fn gguf_meta(&self, arch: &str, unused: &[&str]) -> Result<Vec<(String, Value)>> {
        let k = |s: &str| format!("{arch}.{s}");
        let u = |x: usize| Value::U32(x as u32);
        let f = |x: f32| Value::F32(x);
        let kv: Vec<usize> = self
            .layers
            .iter()
            .map(|l| self.kv_heads * l.kind.has_attention() as usize)
            .collect();
        let heads = match self.uniform(Axis::Heads) {
            Ok(h) => u(h),
            Err(_) => u32_or_array(
                &self
                    .layers
                    .iter()
                    .map(|l| l.size[Axis::Heads])
                    .collect::<Vec<_>>(),
            ),
        };
        let mut v = vec![
            (k("block_count"), u(self.layers.len())),
            (k("context_length"), u(self.context)),
            (k("embedding_length"), u(self.hidden())),
            (
                k("feed_forward_length"),
                u32_or_array(&self.ffn_per_layer()),
            ),
            (k("attention.head_count"), heads),
            (k("attention.head_count_kv"), u32_or_array(&kv)),
            (k("attention.layer_norm_rms_epsilon"), f(self.eps)),
            (k("attention.layer_norm_epsilon"), f(self.eps)),
            (k("attention.key_length"), u(self.head_dim)),
            (k("attention.value_length"), u(self.head_dim)),
            (k("rope.dimension_count"), u(self.head_dim)),
            (k("rope.freq_base"), f(self.rope_theta)),
            (k("vocab_size"), u(self.vocab)),
        ];
        if self.has(LayerKind::Mamba) {
            let mh = self.uniform(Axis::MambaHeads)?;
            let inner = mh * self.uniform(Axis::MambaHeadDim)?;
            v.extend([
                (k("ssm.conv_kernel"), u(self.conv_k)),
                (k("ssm.state_size"), u(self.ssm_state)),
                (k("ssm.group_count"), u(self.mamba_groups)),
                (k("ssm.inner_size"), u(inner)),
                (k("ssm.time_step_rank"), u(mh)),
            ]);
        }
        if self.has(LayerKind::Moe) {
            let shared = self.uniform(Axis::SharedFfn)?;
            v.extend([
                (k("expert_count"), u(self.uniform(Axis::Experts)?)),
                (k("expert_used_count"), u(self.experts_per_tok)),
                (k("expert_group_count"), u(self.expert_groups)),
                (k("expert_group_used_count"), u(self.expert_groups_used)),
                (
                    k("expert_feed_forward_length"),
                    u(self.uniform(Axis::MoeFfn)?),
                ),
                (k("expert_shared_feed_forward_length"), u(shared)),
                (k("expert_shared_count"), u((shared > 0) as usize)),
                (k("expert_weights_norm"), Value::Bool(self.norm_topk)),
                (k("expert_weights_scale"), f(self.routed_scale)),
            ]);
        }
        v.retain(|(key, _)| !unused.iter().any(|u| *key == k(u)));
        Ok(v)
    }
}

/// One u32, or an array of them when the layers differ.
pub fn u32_or_array(v: &[usize]) -> Value {
    if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() {
        Value::U32(v[0] as u32)
    } else {
        Value::Array(v.iter().map(|&x| Value::U32(x as u32)).collect())
    }
}
