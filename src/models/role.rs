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
