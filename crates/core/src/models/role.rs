//! How each dimension of a checkpoint tensor relates to the elastic axes (method doc §3): the
//! architectures' name tables give every tensor a [`Role`]; the elastic pipeline gathers along it.

/// What indexes one dimension of a checkpoint tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// Not elastic (vocabulary, K/V rows, conv taps...): kept whole, in order.
    Whole,
    /// Residual channels.
    Hidden,
    Ffn(usize),
    MoeFfn(usize),
    SharedFfn(usize),
    /// Routed experts (router rows, correction bias, stacked expert dimension).
    Experts(usize),
    /// Query heads × head_dim (q_proj rows, o_proj columns).
    QHeads(usize),
    /// Mamba in_proj rows: z | x | B | C | dt.
    MambaInProj(usize),
    /// Mamba conv channels: x | B | C.
    MambaConv(usize),
    /// Mamba d_inner (heads × head channels): gated-norm weight, out_proj columns.
    MambaInner(usize),
    /// Per-head Mamba vectors (dt_bias, A_log, D).
    MambaHeads(usize),
}

/// How a checkpoint tensor relates to the elastic axes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// The layer the tensor belongs to (dropped with it, renumbered in its name).
    pub layer: Option<usize>,
    /// Routed expert whose index is part of the tensor name (hub layout `experts.{e}.`).
    pub expert: Option<usize>,
    /// One entry per dimension, torch order.
    pub dims: Vec<Dim>,
    /// Index the flattened tensor by `dims[0]` and keep the leading dimension's count
    /// (GGUF's `ssm_norm` stored as [groups, d_inner/groups]).
    pub flat: bool,
}

impl Role {
    pub fn new(layer: Option<usize>, dims: Vec<Dim>) -> Role {
        Role {
            layer,
            expert: None,
            dims,
            flat: false,
        }
    }
}

impl Dim {
    /// The same axis bound to layer `l` (name tables write layer-bound axes with layer 0).
    pub fn at(self, l: usize) -> Dim {
        use Dim::*;
        match self {
            Whole | Hidden => self,
            Ffn(_) => Ffn(l),
            MoeFfn(_) => MoeFfn(l),
            SharedFfn(_) => SharedFfn(l),
            Experts(_) => Experts(l),
            QHeads(_) => QHeads(l),
            MambaInProj(_) => MambaInProj(l),
            MambaConv(_) => MambaConv(l),
            MambaInner(_) => MambaInner(l),
            MambaHeads(_) => MambaHeads(l),
        }
    }
}

/// One tensor of an architecture in both layouts, with its elastic axes (llama.cpp's
/// per-architecture name tables). Layer tensors are named after their `layers.{i}.` / `blk.{i}.`
/// prefix.
pub struct TensorName {
    /// HF names: the one written first, then other spellings read.
    pub hf: &'static [&'static str],
    /// GGUF name ("" where llama.cpp has none).
    pub gguf: &'static str,
    /// The axes of each dimension (HF layout, torch order).
    pub dims: &'static [Dim],
    /// The GGUF layout's axes where they differ (empty: the same).
    pub gguf_dims: &'static [Dim],
    /// GGUF stores it reshaped: gather the flattened tensor ([`Role::flat`]).
    pub gguf_flat: bool,
}

/// A table entry whose layouts have the same axes.
pub const fn t(
    hf: &'static [&'static str],
    gguf: &'static str,
    dims: &'static [Dim],
) -> TensorName {
    TensorName {
        hf,
        gguf,
        dims,
        gguf_dims: &[],
        gguf_flat: false,
    }
}

impl TensorName {
    /// The table entry of a tensor name (after the layer prefix, if any) in either layout.
    pub fn find<'a>(table: &'a [TensorName], name: &str) -> Option<(&'a TensorName, bool)> {
        table.iter().find_map(|t| {
            let gguf = t.gguf == name;
            (gguf || t.hf.contains(&name)).then_some((t, gguf))
        })
    }

    /// The role of a checkpoint tensor by a table: None for names the table does not hold.
    pub fn role(table: &[TensorName], name: &str) -> Option<Role> {
        let (layer, rest) = match super::split_layer(name) {
            Some((l, rest)) => (Some(l), rest),
            None => (None, name),
        };
        let (t, gguf) = TensorName::find(table, rest)?;
        let dims = if gguf && !t.gguf_dims.is_empty() {
            t.gguf_dims
        } else {
            t.dims
        };
        Some(Role {
            layer,
            expert: None,
            dims: dims.iter().map(|d| d.at(layer.unwrap_or(0))).collect(),
            flat: gguf && t.gguf_flat,
        })
    }

    /// The GGUF name of an HF name (unchanged when the table has none).
    pub fn gguf_of<'a>(table: &[TensorName], hf: &'a str) -> &'a str {
        match TensorName::find(table, hf) {
            Some((t, _)) if !t.gguf.is_empty() => t.gguf,
            _ => hf,
        }
    }
}
