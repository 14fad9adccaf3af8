//! Tensors as typed views of bytes: memory-mapped from a checkpoint, or owned when a loader had
//! to transform them (small tensors only). Shapes are in torch order, outermost first.

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
    /// FP8 E4M3 (OCP "fn": no infinities, max 448), one byte per value; the tensor's `scale`
    /// multiplies every value (ModelOpt's per-tensor `weight_scale`).
    F8E4M3,
    /// NVFP4: blocks of 16 E2M1 values with an E4M3 block scale (`[scale][8 bytes]`, value i in
    /// the low nibble of byte i and value i + 8 in its high nibble, as ggml's `block_nvfp4`
    /// sub-blocks); the tensor's `scale` is ModelOpt's `weight_scale_2`.
    Nvfp4,
}

impl DType {
    /// Elements per quantization block (1 for plain floats).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 => 1,
            DType::Nvfp4 => 16,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => 256,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
            DType::F8E4M3 => 1,
            DType::Nvfp4 => 9,
        }
    }
    /// Bytes of a row of `cols` elements, or None if `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if !cols.is_multiple_of(self.block_len()) {
            return None;
        }
        (cols / self.block_len()).checked_mul(self.block_bytes())
    }
    /// A block format (its values need more than a cast).
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }
    /// FP8 or NVFP4: values carry the tensor's per-tensor scale (ModelOpt's formats).
    pub fn is_scaled(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::Nvfp4)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
            DType::F8E4M3 => "F8_E4M3",
            DType::Nvfp4 => "NVFP4",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Backing bytes of a tensor.
#[derive(Clone)]
pub enum Buf {
    Mapped {
        map: Arc<Mmap>,
        off: usize,
        len: usize,
    },
    Owned(Arc<Vec<u8>>),
}

impl Buf {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buf::Mapped { map, off, len } => &map[*off..*off + *len],
            Buf::Owned(v) => v,
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub buf: Buf,
    /// Per-tensor factor of every stored value: 1 except for FP8 (`weight_scale`) and NVFP4
    /// (`weight_scale_2`). A scalar, never sliced (method doc §6).
    pub scale: f32,
    /// ModelOpt's static activation scale of this weight's input (`input_scale`), carried
    /// through slicing for engines that quantize activations; elastica's kernels do not use it.
    pub input_scale: Option<f32>,
    /// The matrix re-laid in column panels, one per nested budget level ([`Tensor::relay`]):
    /// products read these instead of `buf`, which stays the checkpoint's bytes (embedding
    /// lookups, export).
    pub panels: Option<Arc<[Panel]>>,
}

/// `len` bytes of anonymous memory, in transparent huge pages where the OS gives them: decode
/// streams the weights, and the checkpoint's own pages are often huge ones (the page cache's
/// large folios), so 4 KiB pages here cost TLB misses a sliced file does not pay. None when the
/// OS refuses the mapping.
fn anon(len: usize) -> Option<memmap2::MmapMut> {
    let map = memmap2::MmapMut::map_anon(len.max(1)).ok()?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Some(map)
}

/// One column panel of a re-laid matrix: the parent columns `cols`, in this order, stored as a
/// [rows, width] tensor of their own, so that any prefix of rows is one contiguous read.
#[derive(Clone, Debug)]
pub struct Panel {
    pub cols: Vec<Range<usize>>,
    pub t: Tensor,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {:?}", self.name, self.dtype, self.shape)
    }
}

impl Tensor {
    /// Builds a tensor after checking that the byte length matches dtype and shape.
    pub fn new(name: &str, dtype: DType, shape: Vec<usize>, buf: Buf) -> Result<Tensor> {
        let cols = *shape.last().unwrap_or(&1);
        let rows: usize = shape
            .iter()
            .rev()
            .skip(1)
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::Tensor {
                name: name.into(),
                msg: format!("shape {shape:?} overflows"),
            })?;
        let rb = dtype.row_bytes(cols).ok_or_else(|| Error::Tensor {
            name: name.into(),
            msg: format!(
                "innermost dimension {cols} is not a multiple of the {dtype} block size {}",
                dtype.block_len()
            ),
        })?;
        let want = rb.checked_mul(rows);
        let have = buf.bytes().len();
        if want != Some(have) {
            return Err(Error::Tensor {
                name: name.into(),
                msg: format!(
                    "{dtype} {shape:?} needs {} bytes but the file holds {have}",
                    want.map_or("too many".into(), |w| w.to_string())
                ),
            });
        }
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape,
            buf,
            scale: 1.0,
            input_scale: None,
            panels: None,
        })
    }

    pub fn from_f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Tensor {
        let mut v = Vec::with_capacity(data.len() * 4);
        for x in data {
            v.extend_from_slice(&x.to_le_bytes());
        }
        Tensor::new(name, DType::F32, shape, Buf::Owned(Arc::new(v)))
            .expect("consistent f32 tensor")
    }

    /// The same tensor with per-tensor scale `s` (FP8, NVFP4).
    pub fn with_scale(mut self, s: f32) -> Tensor {
        self.scale = s;
        self
    }

    pub fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn rows(&self) -> usize {
        self.shape.iter().rev().skip(1).product()
    }
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols()).unwrap()
    }
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// Checks the shape against what the model config implies.
    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::Tensor {
                name: self.name.clone(),
                msg: format!(
                    "shape {:?} does not match the config, which implies {:?}",
                    self.shape, want
                ),
            });
        }
        Ok(())
    }

    /// Row `r` of the outermost dimension as a tensor of one dimension less (a view, no copy).
    pub fn index(&self, r: usize) -> Tensor {
        let inner: usize = self.shape[1..].iter().product();
        let bytes = self.dtype.row_bytes(self.cols()).unwrap() * (inner / self.cols());
        let buf = match &self.buf {
            Buf::Mapped { map, off, .. } => Buf::Mapped {
                map: map.clone(),
                off: off + r * bytes,
                len: bytes,
            },
            Buf::Owned(v) => Buf::Owned(Arc::new(v[r * bytes..(r + 1) * bytes].to_vec())),
        };
        Tensor {
            name: format!("{}[{r}]", self.name),
            dtype: self.dtype,
            shape: self.shape[1..].to_vec(),
            buf,
            scale: self.scale,
            input_scale: self.input_scale,
            panels: None,
        }
    }

    /// This matrix split into column panels by nested column sets (the columns each budget's
    /// products read): panel j holds the columns whose smallest set is the j-th smallest (in
    /// ascending order), the last one the columns no set reads. A budget whose columns are the
    /// j smallest panels then reads, for any prefix of rows, j contiguous runs of bytes: a view
    /// decodes like its sliced copy, whose rows are panel 0's. None where there is only one
    /// panel or more than `gemv::MAX_OPERANDS`, or a cut splits a quantization block (then
    /// products read `buf` as before).
    pub fn relay(&self, sets: &[Vec<Range<usize>>]) -> Option<Vec<Panel>> {
        let (rows, cols) = (self.rows(), self.cols());
        let (bl, bb) = (self.dtype.block_len(), self.dtype.block_bytes());
        let mut sets: Vec<&Vec<Range<usize>>> = sets.iter().collect();
        sets.sort_by_key(|s| s.iter().map(|r| r.len()).sum::<usize>());
        let mut level = vec![sets.len(); cols];
        for (j, s) in sets.iter().enumerate().rev() {
            for r in s.iter() {
                level[r.start.min(cols)..r.end.min(cols)].fill(j);
            }
        }
        let mut runs: Vec<Vec<Range<usize>>> = vec![Vec::new(); sets.len() + 1];
        let mut a = 0;
        for c in 1..=cols {
            if c == cols || level[c] != level[a] {
                if !a.is_multiple_of(bl) || !c.is_multiple_of(bl) {
                    return None;
                }
                runs[level[a]].push(a..c);
                a = c;
            }
        }
        runs.retain(|r| !r.is_empty());
        if runs.len() < 2 || runs.len() > crate::kernels::gemv::MAX_OPERANDS {
            return None;
        }
        let (src, stride) = (self.bytes(), self.row_bytes());
        let panels = runs.into_iter().map(|cols| {
            let width: usize = cols.iter().map(|r| r.len()).sum();
            let len = rows * width / bl * bb;
            let mut map = anon(len)?;
            let mut at = 0;
            for r in 0..rows {
                for c in &cols {
                    let (from, n) = (r * stride + c.start / bl * bb, c.len() / bl * bb);
                    map[at..at + n].copy_from_slice(&src[from..from + n]);
                    at += n;
                }
            }
            let map = Arc::new(map.make_read_only().ok()?);
            let buf = Buf::Mapped { map, off: 0, len };
            let mut t = Tensor::new(&self.name, self.dtype, vec![rows, width], buf)
                .expect("a panel's bytes match its shape");
            t.scale = self.scale;
            t.input_scale = self.input_scale;
            Some(Panel { cols, t })
        });
        panels.collect()
    }

    /// Lets the kernel drop this tensor's pages from the process once a streaming pass (slice,
    /// elastify) is done with it, so peak memory stays near one tensor, not the model.
    pub fn release(&self) {
        #[cfg(unix)]
        if let Buf::Mapped { map, off, len } = &self.buf {
            // Safety: a read-only shared file mapping; dropped pages are re-read from the file.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *off, *len)
            };
        }
    }
}
