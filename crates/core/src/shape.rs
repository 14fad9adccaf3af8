//! The elastic axes and the parent's dimensions along them (method doc §3).
//!
//! [`Axis`] is the one list of dimensions a budget can cut; [`AxisMap`] holds one value per axis.
//! Axis names appear as strings only where budgets are parsed and printed.

use crate::error::{Error, Result};
use std::ops::{Index, IndexMut};

/// What kind of mixer a layer has (Llama layers are attention + MLP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Mamba,
    Attention,
    Mlp,
    Moe,
    /// Llama-style layer: attention block then gated MLP block.
    Transformer,
}

impl LayerKind {
    pub fn has_attention(self) -> bool {
        matches!(self, LayerKind::Attention | LayerKind::Transformer)
    }
    pub fn has_mlp(self) -> bool {
        matches!(self, LayerKind::Mlp | LayerKind::Transformer)
    }
    pub fn pattern_char(self) -> char {
        match self {
            LayerKind::Mamba => 'M',
            LayerKind::Attention => '*',
            LayerKind::Mlp => '-',
            LayerKind::Moe => 'E',
            LayerKind::Transformer => 'T',
        }
    }
}

/// One elastic axis. Each keeps a prefix of the parent's importance-ordered components.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Axis {
    /// Residual channels (global: indexed across all layers).
    Hidden,
    /// Dense-MLP channels.
    Ffn,
    /// Routed-expert channels.
    MoeFfn,
    /// Routed experts (the same count in every routing group).
    Experts,
    /// Shared-expert channels.
    SharedFfn,
    /// Query heads (the same count in every KV group).
    Heads,
    /// Mamba heads (the same count in every B/C group).
    MambaHeads,
    /// Mamba head channels (the same set in every head).
    MambaHeadDim,
}

impl Axis {
    pub const COUNT: usize = 8;
    /// Every axis, in the order budgets are printed.
    pub const ALL: [Axis; Axis::COUNT] = [
        Axis::Hidden,
        Axis::Ffn,
        Axis::MoeFfn,
        Axis::Experts,
        Axis::SharedFfn,
        Axis::Heads,
        Axis::MambaHeads,
        Axis::MambaHeadDim,
    ];
    /// The axes set per layer (all but `Hidden`).
    pub const LAYER: [Axis; Axis::COUNT - 1] = {
        let mut a = [Axis::Hidden; Axis::COUNT - 1];
        let mut i = 0;
        while i < a.len() {
            a[i] = Axis::ALL[i + 1];
            i += 1;
        }
        a
    };

    pub fn name(self) -> &'static str {
        match self {
            Axis::Hidden => "hidden",
            Axis::Ffn => "ffn",
            Axis::MoeFfn => "moe_ffn",
            Axis::Experts => "experts",
            Axis::SharedFfn => "shared_ffn",
            Axis::Heads => "heads",
            Axis::MambaHeads => "mamba_heads",
            Axis::MambaHeadDim => "mamba_head_dim",
        }
    }

    /// Whether a layer of this kind has the axis (`Hidden`: every layer).
    pub fn applies(self, kind: LayerKind) -> bool {
        match self {
            Axis::Hidden => true,
            Axis::Ffn => kind.has_mlp(),
            Axis::Heads => kind.has_attention(),
            Axis::MoeFfn | Axis::Experts | Axis::SharedFfn => kind == LayerKind::Moe,
            Axis::MambaHeads | Axis::MambaHeadDim => kind == LayerKind::Mamba,
        }
    }

    /// What the groups of a grouped axis are (error messages).
    pub fn groups_name(self) -> &'static str {
        match self {
            Axis::Heads => "KV groups",
            Axis::MambaHeads => "Mamba groups",
            Axis::Experts => "routing groups",
            _ => "groups",
        }
    }

    /// The known names, for error messages.
    pub fn names() -> String {
        Axis::ALL.map(Axis::name).join(", ")
    }
}

impl std::fmt::Display for Axis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Axis {
    type Err = Error;
    fn from_str(s: &str) -> Result<Axis> {
        Axis::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::Budget(format!("unknown axis {s:?} (known: {})", Axis::names())))
    }
}

/// Axes serialize by name (importance files key their scores by it).
impl serde::Serialize for Axis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Axis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Axis, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One value per axis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AxisMap<T>(pub [T; Axis::COUNT]);

impl<T> AxisMap<T> {
    pub fn from_fn(mut f: impl FnMut(Axis) -> T) -> AxisMap<T> {
        AxisMap(Axis::ALL.map(&mut f))
    }
    pub fn iter(&self) -> impl Iterator<Item = (Axis, &T)> {
        Axis::ALL.into_iter().zip(self.0.iter())
    }
    pub fn map<U>(&self, mut f: impl FnMut(Axis, &T) -> U) -> AxisMap<U> {
        AxisMap::from_fn(|a| f(a, &self[a]))
    }
}

/// A map of the present axes, keyed by name.
impl<T: serde::Serialize> serde::Serialize for AxisMap<Option<T>> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.iter().filter_map(|(a, v)| Some((a, v.as_ref()?))))
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for AxisMap<Option<T>> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut m = std::collections::BTreeMap::<Axis, T>::deserialize(d)?;
        Ok(AxisMap::from_fn(|a| m.remove(&a)))
    }
}

impl<T> Index<Axis> for AxisMap<T> {
    type Output = T;
    fn index(&self, a: Axis) -> &T {
        &self.0[a as usize]
    }
}

impl<T> IndexMut<Axis> for AxisMap<T> {
    fn index_mut(&mut self, a: Axis) -> &mut T {
        &mut self.0[a as usize]
    }
}

/// The parent's dimensions along every elastic axis (what a budget is resolved against), and
/// the fixed sizes that shape the axes' groups.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: Vec<LayerKind>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub moe_ffn: usize,
    pub experts: usize,
    pub experts_per_tok: usize,
    pub expert_groups: usize,
    pub shared_ffn: usize,
    pub mamba_heads: usize,
    pub mamba_head_dim: usize,
    pub mamba_groups: usize,
    pub ssm_state: usize,
}

impl Shape {
    /// The parent's size along an axis.
    pub fn size(&self, a: Axis) -> usize {
        match a {
            Axis::Hidden => self.hidden,
            Axis::Ffn => self.ffn,
            Axis::MoeFfn => self.moe_ffn,
            Axis::Experts => self.experts,
            Axis::SharedFfn => self.shared_ffn,
            Axis::Heads => self.heads,
            Axis::MambaHeads => self.mamba_heads,
            Axis::MambaHeadDim => self.mamba_head_dim,
        }
    }
    /// The parent indices a budget of `k` keeps along an axis: the same prefix of every group.
    pub fn kept(&self, a: Axis, k: usize) -> Vec<usize> {
        let g = self.groups(a);
        let per = self.size(a) / g;
        (0..g).flat_map(|i| i * per..i * per + k / g).collect()
    }
    /// The number of groups an axis is cut evenly across (1 where ungrouped).
    pub fn groups(&self, a: Axis) -> usize {
        match a {
            Axis::Heads => self.kv_heads.max(1),
            Axis::MambaHeads => self.mamba_groups.max(1),
            Axis::Experts => self.expert_groups.max(1),
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip_and_index() {
        for (i, a) in Axis::ALL.into_iter().enumerate() {
            assert_eq!(a as usize, i);
            assert_eq!(a.name().parse::<Axis>().unwrap(), a);
        }
        assert_eq!(&Axis::ALL[1..], &Axis::LAYER[..]);
        let e = "bogus".parse::<Axis>().unwrap_err().to_string();
        assert!(
            e.contains("unknown axis") && e.contains("mamba_head_dim"),
            "{e}"
        );
        let mut m = AxisMap::<usize>::default();
        m[Axis::Heads] = 3;
        assert_eq!(m.iter().filter(|(_, v)| **v == 3).count(), 1);
        assert_eq!(
            m.map(|a, v| (a == Axis::Heads) as usize * v)[Axis::Heads],
            3
        );
    }

    #[test]
    fn serializes_by_name_and_keeps_group_prefixes() {
        let mut m = AxisMap::<Option<u8>>::default();
        m[Axis::MambaHeadDim] = Some(3);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"mamba_head_dim":3}"#);
        assert_eq!(serde_json::from_str::<AxisMap<Option<u8>>>(&j).unwrap(), m);
        let e = serde_json::from_str::<AxisMap<Option<u8>>>(r#"{"colour":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown axis"), "{e}");
        let s = Shape {
            hidden: 8,
            layers: vec![LayerKind::Attention],
            heads: 6,
            kv_heads: 2,
            head_dim: 4,
            ffn: 0,
            moe_ffn: 0,
            experts: 0,
            experts_per_tok: 0,
            expert_groups: 0,
            shared_ffn: 0,
            mamba_heads: 0,
            mamba_head_dim: 0,
            mamba_groups: 0,
            ssm_state: 0,
        };
        assert_eq!(s.kept(Axis::Heads, 4), vec![0, 1, 3, 4]);
        assert_eq!(s.kept(Axis::Hidden, 3), vec![0, 1, 2]);
        assert_eq!(s.kept(Axis::Experts, 0), Vec::<usize>::new());
    }
}
