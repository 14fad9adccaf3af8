//! The elastic manifest: the named budgets an elastic checkpoint offers.
//!
//! Stored as JSON, in one of three places (first found wins):
//! - the `"elastic"` object of an HF folder's `config.json`,
//! - a side file `elastic.json` in the HF folder, or `MODEL.gguf.elastic.json` beside a GGUF file,
//! - the GGUF string metadata key `elastica.manifest`.
//!
//! ```json
//! { "format": "elastica.manifest/1",
//!   "parent": "hidden=576,ffn=1536,heads=9",
//!   "budgets": [ {"name": "full", "spec": "hidden=576,ffn=1536,heads=9"},
//!                {"name": "half", "spec": "hidden=384,ffn=768,heads=6", "target": "params:0.5"} ],
//!   "layer_order": [0, 29, 1, ...] }
//! ```
//! `parent` is the explicit spec of the model the manifest was made for (checked on load);
//! `spec` strings use the `--budget` syntax; budgets are listed largest first and must nest.
//! `layer_order` (optional) ranks layers by importance for depth budgets. `mass` (optional, written
//! by elastify) maps each knob (an axis name or `depth`) to the importance fraction its first `k`
//! components keep, for k = 0..=size, averaged over the layers: what [`crate::target`] resolves
//! budgets between the named ones with.

use crate::budget::{Budget, BudgetSpec, Shape};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "elastica.manifest/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NamedBudget {
    pub name: String,
    pub spec: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub parent: String,
    pub budgets: Vec<NamedBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_order: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mass: Option<std::collections::BTreeMap<String, Vec<f32>>>,
}

impl Manifest {
    pub fn from_json(v: &serde_json::Value, origin: &str) -> Result<Manifest> {
        let m: Manifest = serde_json::from_value(v.clone()).map_err(|e| {
            Error::config(
                format!("{origin} manifest"),
                format!("invalid elastic manifest: {e}"),
            )
        })?;
        if m.format != FORMAT {
            return Err(Error::config(
                format!("{origin} manifest.format"),
                format!("{:?} is not {FORMAT:?}", m.format),
            ));
        }
        Ok(m)
    }

    /// Checks the manifest against the model: same parent shape, valid and nested budgets.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        let full = Budget::full(shape);
        let parent: BudgetSpec = self.parent.parse()?;
        let pb = parent.resolve(shape).map_err(|e| {
            Error::config("manifest.parent", format!("made for another model: {e}"))
        })?;
        if pb.hidden != full.hidden || pb.layers != full.layers {
            return Err(Error::config(
                "manifest.parent",
                format!(
                    "made for a model of shape {:?}, this one is {:?}",
                    self.parent,
                    full.spec(shape)
                ),
            ));
        }
        let mut prev: Option<(String, Budget)> = None;
        let mut names = std::collections::BTreeSet::new();
        for nb in &self.budgets {
            if !names.insert(nb.name.clone()) {
                return Err(Error::config(
                    "manifest.budgets",
                    format!("name {:?} appears twice", nb.name),
                ));
            }
            if nb.name.contains('=') || nb.name.contains(',') || nb.name.is_empty() {
                return Err(Error::config(
                    "manifest.budgets",
                    format!("name {:?} must be non-empty without '=' or ','", nb.name),
                ));
            }
            let b = nb
                .spec
                .parse::<BudgetSpec>()
                .and_then(|s| s.resolve(shape))
                .map_err(|e| {
                    Error::config(format!("manifest budget {:?}", nb.name), e.to_string())
                })?;
            if let Some((pn, pbud)) = &prev
                && !b.nested_in(pbud)
            {
                return Err(Error::config(
                    format!("manifest budget {:?}", nb.name),
                    format!(
                        "is not nested in the larger budget {pn:?} (every axis must be at most its size)"
                    ),
                ));
            }
            prev = Some((nb.name.clone(), b));
        }
        for (k, curve) in self.mass.iter().flatten() {
            let n = match k.as_str() {
                "depth" => Some(shape.layers.len()),
                _ => k.parse().ok().map(|a| shape.size(a)),
            };
            let bad = |msg: String| Err(Error::config(format!("manifest.mass.{k}"), msg));
            match n {
                None => return bad(format!("{k:?} is not an axis or depth")),
                Some(n) if curve.len() != n + 1 => {
                    return bad(format!(
                        "has {} values, the model's {k} needs {}",
                        curve.len(),
                        n + 1
                    ));
                }
                _ if curve.iter().any(|x| !(0.0..=1.0).contains(x)) => {
                    return bad("values must be fractions in [0, 1]".into());
                }
                _ => {}
            }
        }
        if let Some(order) = &self.layer_order {
            let mut seen = vec![false; shape.layers.len()];
            for &l in order {
                if l >= seen.len() || std::mem::replace(&mut seen[l], true) {
                    return Err(Error::config(
                        "manifest.layer_order",
                        "must be a permutation of the layer indices",
                    ));
                }
            }
        }
        Ok(())
    }
}
