//! The elastic pipeline (method doc §1–§3, §7): rank components by importance, re-order every
//! tensor so nested budgets are prefixes, solve named budgets, and slice budgets out as
//! standalone checkpoints.
//!
//! Both re-ordering and slicing are one operation: every tensor dimension is indexed by an
//! elastic axis ([`Dim`]), and an [`IndexMap`] gives, per axis, the list of parent indices to
//! keep in order — a permutation for elastify, a kept prefix for slice.

// Kernels and solvers index several arrays with one loop variable; signatures are wide.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

pub mod imatrix;
pub mod importance;
pub mod plot;
pub mod quantize;
pub mod rewrite;
pub mod solver;

use elastica_core::budget::{Axis, AxisMap, Budget, Shape};
use elastica_core::error::{Error, Result};
use elastica_core::kernels::{fp, quant};
use elastica_core::model::{Cache, Logits, Model};
use elastica_core::tensor::{DType, Tensor};

pub use elastica_core::models::role::{Dim, Role};

/// Parent indices kept along every axis, per layer; `None` drops a layer.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexMap {
    pub hidden: Vec<usize>,
    pub layers: Vec<Option<LayerMap>>,
}

/// Parent indices kept along every axis of one layer (empty where the layer lacks the axis).
pub type LayerMap = AxisMap<Vec<usize>>;

impl IndexMap {
    /// The identity (every component, natural order).
    pub fn identity(shape: &Shape) -> IndexMap {
        IndexMap::from_budget(shape, &Budget::full(shape))
    }

    /// The components a budget keeps, in parent order (slicing).
    pub fn from_budget(shape: &Shape, b: &Budget) -> IndexMap {
        let layers = b
            .layers
            .iter()
            .map(|lb| {
                lb.keep
                    .then(|| AxisMap::from_fn(|a| shape.kept(a, lb.size(a))))
            })
            .collect();
        IndexMap {
            hidden: shape.kept(Axis::Hidden, b.hidden),
            layers,
        }
    }

    /// New index of a kept layer (layers after dropped ones move up).
    pub fn new_layer(&self, l: usize) -> Option<usize> {
        self.layers.get(l)?.as_ref()?;
        Some(self.layers[..l].iter().filter(|x| x.is_some()).count())
    }

    fn layer(&self, l: usize) -> Result<&LayerMap> {
        self.layers
            .get(l)
            .and_then(|x| x.as_ref())
            .ok_or_else(|| Error::Input(format!("layer {l} is dropped or missing")))
    }

    /// Parent indices along `dim` for a dimension of length `len` in the parent.
    pub fn indices(&self, dim: Dim, len: usize, shape: &Shape) -> Result<Vec<usize>> {
        let di = shape.mamba_heads * shape.mamba_head_dim;
        let gn = shape.mamba_groups * shape.ssm_state;
        let inner = |lm: &LayerMap| -> Vec<usize> {
            lm[Axis::MambaHeads]
                .iter()
                .flat_map(|&h| {
                    lm[Axis::MambaHeadDim]
                        .iter()
                        .map(move |&c| h * shape.mamba_head_dim + c)
                })
                .collect()
        };
        let v = match dim {
            Dim::Whole => (0..len).collect(),
            Dim::Hidden => self.hidden.clone(),
            Dim::Ffn(l) => self.layer(l)?[Axis::Ffn].clone(),
            Dim::MoeFfn(l) => self.layer(l)?[Axis::MoeFfn].clone(),
            Dim::SharedFfn(l) => self.layer(l)?[Axis::SharedFfn].clone(),
            Dim::Experts(l) => self.layer(l)?[Axis::Experts].clone(),
            Dim::QHeads(l) => {
                let d = shape.head_dim;
                self.layer(l)?[Axis::Heads]
                    .iter()
                    .flat_map(|&h| h * d..(h + 1) * d)
                    .collect()
            }
            Dim::MambaHeads(l) => self.layer(l)?[Axis::MambaHeads].clone(),
            Dim::MambaInner(l) => inner(self.layer(l)?),
            Dim::MambaConv(l) => {
                let mut v = inner(self.layer(l)?);
                v.extend(di..di + 2 * gn);
                v
            }
            Dim::MambaInProj(l) => {
                let lm = self.layer(l)?;
                let i = inner(lm);
                let mut v = i.clone();
                v.extend(i.iter().map(|x| x + di));
                v.extend(2 * di..2 * di + 2 * gn);
                v.extend(lm[Axis::MambaHeads].iter().map(|h| h + 2 * di + 2 * gn));
                v
            }
        };
        if let Some(&bad) = v.iter().find(|&&i| i >= len) {
            return Err(Error::Input(format!(
                "index {bad} out of range {len} along {dim:?}"
            )));
        }
        Ok(v)
    }
}

/// How one tensor is gathered: which source rows, which columns, and the output format.
pub struct GatherPlan {
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Per-tensor scale the values are encoded under when `dtype` is FP8 or NVFP4.
    pub scale: f32,
    rows: Vec<usize>,
    inner: Vec<usize>,
    src_cols: usize,
    row_copy: bool,
    /// Source blocks of each output row, in order, when they are copied whole.
    blocks: Option<Vec<usize>>,
}

impl GatherPlan {
    /// Plans gathering `t` along its dimensions. Rows are copied as bytes (quantized formats stay
    /// as they are) when the innermost dimension is kept whole or as a block-aligned prefix;
    /// otherwise values are dequantized and re-encoded: floats keep their format, quantized
    /// matrices are re-quantized ([`quant::requant_type`]), anything else becomes F32. `convert`
    /// turns every matrix (2+ dimensions) into that format (block formats: where rows are whole
    /// blocks).
    pub fn new(
        t: &Tensor,
        role: &Role,
        map: &IndexMap,
        shape: &Shape,
        convert: Option<DType>,
    ) -> Result<GatherPlan> {
        let dims = &role.dims;
        let (src_shape, idx): (Vec<usize>, Vec<Vec<usize>>) = if role.flat {
            let n = t.numel();
            (vec![n], vec![map.indices(dims[0], n, shape)?])
        } else {
            if dims.len() != t.shape.len() {
                return Err(Error::Tensor {
                    name: t.name.clone(),
                    msg: format!(
                        "has {} dimensions, its role has {}",
                        t.shape.len(),
                        dims.len()
                    ),
                });
            }
            let idx = dims
                .iter()
                .zip(&t.shape)
                .map(|(&d, &n)| map.indices(d, n, shape))
                .collect::<Result<Vec<_>>>()?;
            (t.shape.clone(), idx)
        };
        let cols = *src_shape.last().unwrap();
        let inner = idx.last().unwrap().clone();
        let bl = t.dtype.block_len();
        let prefix = inner.iter().enumerate().all(|(i, &x)| i == x);
        let row_copy = prefix && (inner.len() == cols || inner.len() % bl == 0) && !role.flat;
        let mut out_shape: Vec<usize> = idx.iter().map(|v| v.len()).collect();
        if role.flat && t.shape.len() == 2 {
            let lead = t.shape[0];
            out_shape = vec![lead, out_shape[0] / lead.max(1)];
        }
        let matrix = out_shape.iter().filter(|&&d| d > 1).count() >= 2;
        // Outer index tuples in row-major order -> source row numbers.
        let src_rows = &src_shape[..src_shape.len() - 1];
        let mut rows: Vec<usize> = vec![0];
        for (d, ix) in idx[..idx.len() - 1].iter().enumerate() {
            let mut next = Vec::with_capacity(rows.len() * ix.len());
            for &r in &rows {
                for &i in ix {
                    next.push(r * src_rows[d] + i);
                }
            }
            rows = next;
        }
        let bl_fits = |d: DType| idx.last().unwrap().len().is_multiple_of(d.block_len());
        // A block format applies to the matrices whose rows are whole blocks (not conv taps).
        let want = convert.filter(|w| matrix && bl_fits(*w));
        // Kept columns that are whole blocks of a block format (or single FP8 bytes) are copied
        // block by block: scales go with their blocks, nothing is re-quantized.
        let keep = want.is_none_or(|w| w == t.dtype);
        let whole_blocks = inner.len().is_multiple_of(bl)
            && inner
                .chunks(bl)
                .all(|c| c[0] % bl == 0 && c.iter().enumerate().all(|(i, &x)| x == c[0] + i));
        let blocks = (!row_copy
            && keep
            && !role.flat
            && (t.dtype.is_quantized() || t.dtype.is_scaled())
            && whole_blocks)
            .then(|| inner.chunks(bl).map(|c| c[0] / bl).collect::<Vec<_>>());
        let (dtype, row_copy) = if (row_copy && keep) || blocks.is_some() {
            (t.dtype, row_copy && keep)
        } else {
            let requant = quant::requant_type(t.dtype);
            let fits = bl_fits;
            let dt = match want {
                Some(w) => w,
                None if matches!(t.dtype, DType::F16 | DType::BF16 | DType::F32) => t.dtype,
                // Quantized matrices are re-quantized (K-quants into Q8_0); others become F32.
                None if matrix && quant::can_quantize(requant) && fits(requant) => requant,
                None => DType::F32,
            };
            let scaled = dt.is_scaled() && fits(dt);
            if dt.is_quantized() && !scaled && !(quant::can_quantize(dt) && fits(dt)) {
                return Err(Error::Tensor {
                    name: t.name.clone(),
                    msg: format!(
                        "cannot write {dt} here (quantizers: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, in whole blocks of 32 values)"
                    ),
                });
            }
            (dt, false)
        };
        Ok(GatherPlan {
            shape: out_shape,
            dtype,
            scale: 1.0,
            rows,
            inner,
            src_cols: cols,
            row_copy,
            blocks,
        })
    }

    /// The gathered bytes. `w`: a weight per source column for the error a re-quantized row
    /// minimises (see [`quant::quantize_row_best`]), permuted with the columns.
    pub fn run(&self, t: &Tensor, w: Option<&[f32]>) -> Vec<u8> {
        let cols = self.src_cols;
        let rb = t.dtype.row_bytes(cols).unwrap();
        let src = t.bytes();
        // Bytes are copied only from a tensor in the planned format (trained values come as F32).
        if self.row_copy && t.dtype == self.dtype {
            let nb = t.dtype.row_bytes(self.inner.len()).unwrap();
            let mut out = Vec::with_capacity(self.rows.len() * nb);
            for &r in &self.rows {
                out.extend_from_slice(&src[r * rb..r * rb + nb]);
            }
            return out;
        }
        if let Some(bs) = self.blocks.as_ref().filter(|_| t.dtype == self.dtype) {
            let bb = t.dtype.block_bytes();
            let mut out = Vec::with_capacity(self.rows.len() * bs.len() * bb);
            for &r in &self.rows {
                for &b in bs {
                    out.extend_from_slice(&src[r * rb + b * bb..r * rb + (b + 1) * bb]);
                }
            }
            return out;
        }
        let mut full = vec![0f32; cols];
        let mut vals = Vec::with_capacity(self.inner.len());
        let mut out = Vec::with_capacity(self.rows.len() * self.inner.len() * 4);
        let w: Option<Vec<f32>> = w
            .filter(|w| w.len() == cols && self.dtype.is_quantized())
            .map(|w| self.inner.iter().map(|&i| w[i]).collect());
        for &r in &self.rows {
            quant::dequant_row(t.dtype, &src[r * rb..(r + 1) * rb], 0, &mut full);
            vals.clear();
            vals.extend(self.inner.iter().map(|&i| full[i] * t.scale));
            match (self.dtype, &w) {
                (DType::F8E4M3, _) => fp::quantize_fp8(&vals, self.scale, &mut out),
                (DType::Nvfp4, _) => fp::quantize_nvfp4(&vals, self.scale, &mut out),
                (_, Some(w)) => quant::quantize_row_best(self.dtype, &vals, Some(w), &mut out),
                (_, None) => encode(&vals, self.dtype, &mut out),
            }
        }
        out
    }
}

/// f32 values to little-endian bytes of a float format, or to quantized blocks.
pub fn encode(v: &[f32], dt: DType, out: &mut Vec<u8>) {
    match dt {
        DType::F32 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::F16 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        DType::BF16 => v
            .iter()
            .for_each(|x| out.extend_from_slice(&quant::f32_to_bf16(*x).to_le_bytes())),
        other => quant::quantize_row_best(other, v, None, out),
    }
}

/// Parses `f32`, `f16`, `bf16`, or a block format elastica can quantize into (`q8_0`, `q5_1`,
/// `q5_0`, `q4_1`, `q4_0`; GGUF outputs only).
pub fn parse_float_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        "q8_0" => Ok(DType::Q8_0),
        "q5_1" => Ok(DType::Q5_1),
        "q5_0" => Ok(DType::Q5_0),
        "q4_1" => Ok(DType::Q4_1),
        "q4_0" => Ok(DType::Q4_0),
        other => Err(Error::Input(format!(
            "--dtype {other:?}: use f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0"
        ))),
    }
}

/// Logits of the written slice at `path` against the parent's budget view on fixed random token
/// sequences: max |Δ| / max |logit|.
pub fn verify_slice(
    parent: &elastica_core::model::Model,
    b: &Budget,
    path: &std::path::Path,
) -> Result<f32> {
    let slice = elastica_core::models::load(path)?;
    let seqs = probe_tokens(parent.vocab, 2, 24);
    Ok(logit_diff(parent, b, &slice, &slice.full_budget(), &seqs)?.max_rel)
}

/// Fixed pseudo-random token sequences for function checks.
pub fn probe_tokens(vocab: usize, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut s = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// How far two models' logits are apart over all positions of some sequences.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LogitDiff {
    /// max |Δ| / max |logit|.
    pub max_rel: f32,
    /// RMS of Δ / RMS of the logits.
    pub rms_rel: f32,
    /// Fraction of positions where both pick the same top token.
    pub top1: f32,
}

/// How far two (model, budget) pairs' logits are apart over all positions of the sequences, in
/// exact mode (f32 activations), so formats that round activations differently (a Q4_1 parent and
/// its F32 re-ordering) compare on the function alone.
pub fn logit_diff(
    a: &elastica_core::model::Model,
    ba: &Budget,
    b: &elastica_core::model::Model,
    bb: &Budget,
    seqs: &[Vec<u32>],
) -> Result<LogitDiff> {
    let prev = elastica_core::kernels::gemm::set_exact(true);
    let r = diff(a, ba, b, bb, seqs);
    elastica_core::kernels::gemm::set_exact(prev);
    r
}

fn diff(a: &Model, ba: &Budget, b: &Model, bb: &Budget, seqs: &[Vec<u32>]) -> Result<LogitDiff> {
    let (mut md, mut mx) = (0f32, 0f32);
    let (mut sd, mut sx, mut same, mut n) = (0f64, 0f64, 0usize, 0usize);
    let mut finite = true;
    let argmax = elastica_core::generate::sampler::argmax;
    for s in seqs {
        let mut ca = Cache::new(a, s.len());
        let la = a.forward(s, ba, &mut ca, Logits::All)?.to_vec();
        let mut cb = Cache::new(b, s.len());
        let lb = b.forward(s, bb, &mut cb, Logits::All)?;
        if la.len() != lb.len() {
            return Err(Error::Input(
                "the two models have different vocabularies".into(),
            ));
        }
        for (x, y) in la.iter().zip(lb) {
            finite &= x.is_finite() && y.is_finite();
            md = md.max((x - y).abs());
            mx = mx.max(x.abs());
            sd += ((x - y) as f64).powi(2);
            sx += (*x as f64).powi(2);
        }
        let v = a.vocab;
        for (ra, rb) in la.chunks(v).zip(lb.chunks(v)) {
            same += (argmax(ra) == argmax(rb)) as usize;
            n += 1;
        }
    }
    let max_rel = md / mx.max(f32::MIN_POSITIVE);
    Ok(LogitDiff {
        // NaN anywhere makes the comparison fail rather than pass.
        max_rel: if finite { max_rel } else { f32::INFINITY },
        rms_rel: (sd / sx.max(f64::MIN_POSITIVE)).sqrt() as f32,
        top1: same as f32 / n.max(1) as f32,
    })
}
