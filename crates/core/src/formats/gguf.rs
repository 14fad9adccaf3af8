//! GGUF (v2/v3) reader: metadata, tensor directory, memory-mapped data. Every count and offset
//! is checked against the file size before anything is allocated from it.

use super::TensorMap;
use super::safetensors::mmap;
use crate::error::{Error, Result};
use crate::tensor::{Buf, DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64).or(match *self {
                Value::I32(v) => Some(v as f64),
                Value::I64(v) => Some(v as f64),
                _ => None,
            }),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
}

pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    /// Metadata keys in file order (writers keep it).
    pub kv_order: Vec<String>,
    pub tensors: TensorMap,
    /// Tensor names in file order (for writers that want to keep it).
    pub order: Vec<String>,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::format(
            self.path,
            format!(
                "truncated or corrupt GGUF: {what} at byte {} runs past the end ({} bytes)",
                self.pos,
                self.b.len()
            ),
        )
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.b.len() - self.pos {
            return Err(self.err(what));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(Error::format(
                self.path,
                format!(
                    "corrupt GGUF: {what} claims a string of {n} bytes, past the end of the file"
                ),
            ));
        }
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| Error::format(self.path, format!("corrupt GGUF: {what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.path,
                        format!("corrupt GGUF: {what} nests arrays too deeply"),
                    ));
                }
                let ety = self.u32(what)?;
                let n = self.u64(what)?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(Error::format(
                            self.path,
                            format!("corrupt GGUF: {what} has unknown array element type {ety}"),
                        ));
                    }
                };
                if n.checked_mul(min)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(Error::format(
                        self.path,
                        format!(
                            "corrupt GGUF: {what} claims {n} array elements, past the end of the file"
                        ),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => {
                return Err(Error::format(
                    self.path,
                    format!("corrupt GGUF: {what} has unknown value type {ty}"),
                ));
            }
        })
    }
}

pub fn ggml_type(t: u32) -> Option<DType> {
    Some(match t {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        30 => DType::BF16,
        40 => DType::Nvfp4,
        _ => return None,
    })
}

pub fn ggml_type_id(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q4K => 12,
        DType::Q5K => 13,
        DType::Q6K => 14,
        DType::BF16 => 30,
        DType::Nvfp4 => 40,
        // llama.cpp has no FP8 type; writers refuse it before this point.
        DType::F8E4M3 => u32::MAX,
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let map = mmap(path)?;
        let mut c = Cursor {
            b: &map[..],
            pos: 0,
            path,
        };
        let magic = c
            .take(4, "magic")
            .map_err(|_| Error::format(path, "not a GGUF file (too short for the magic)"))?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!("not a GGUF file (bad magic {:02x?})", magic),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                format!("unsupported GGUF version {version} (2 and 3 are supported)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each key-value pair takes at least 8+4+1 bytes, each tensor info at least 8+4+8+4+8.
        if n_kv
            .checked_mul(13)
            .is_none_or(|b| b > c.remaining() as u64)
        {
            return Err(Error::format(
                path,
                format!("corrupt GGUF: metadata count {n_kv} is past the end of the file"),
            ));
        }
        if n_tensors
            .checked_mul(32)
            .is_none_or(|b| b > c.remaining() as u64)
        {
            return Err(Error::format(
                path,
                format!("corrupt GGUF: tensor count {n_tensors} is past the end of the file"),
            ));
        }
        let mut meta = BTreeMap::new();
        let mut kv_order = Vec::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of {key}"))?;
            let v = c.value(ty, &format!("metadata {key}"), 0)?;
            if meta.insert(key.clone(), v).is_some() {
                return Err(Error::format(
                    path,
                    format!("metadata key {key} appears twice"),
                ));
            }
            kv_order.push(key);
        }
        struct Info {
            name: String,
            dims: Vec<usize>,
            ty: DType,
            off: u64,
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let nd = c.u32(&format!("dims of {name}"))?;
            if nd == 0 || nd > 4 {
                return Err(Error::format(
                    path,
                    format!("tensor {name}: {nd} dimensions (1 to 4 are valid)"),
                ));
            }
            let mut dims = Vec::new();
            for _ in 0..nd {
                let d = c.u64(&format!("dims of {name}"))?;
                if d == 0 || d > (1 << 40) {
                    return Err(Error::format(
                        path,
                        format!("tensor {name}: invalid dimension {d}"),
                    ));
                }
                dims.push(d as usize);
            }
            let t = c.u32(&format!("type of {name}"))?;
            let ty = ggml_type(t).ok_or_else(|| {
                Error::format(path, format!("tensor {name}: unsupported ggml type {t}"))
            })?;
            let off = c.u64(&format!("offset of {name}"))?;
            infos.push(Info {
                name,
                dims,
                ty,
                off,
            });
        }
        let align = match meta.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| Error::format(path, "general.alignment is not a power of two"))?
                as usize,
            None => 32,
        };
        let data_start = c.pos.next_multiple_of(align);
        let file_len = map.len();
        let mut tensors = BTreeMap::new();
        let mut order = Vec::new();
        let mut spans: Vec<(usize, usize, String)> = Vec::new();
        for info in infos {
            // GGUF dims are innermost first; torch order is the reverse.
            let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
            let cols = shape[shape.len() - 1];
            let rows = shape[..shape.len() - 1]
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = info
                .ty
                .row_bytes(cols)
                .and_then(|rb| rows.and_then(|r| rb.checked_mul(r)))
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!(
                            "tensor {}: shape {:?} does not fit {} blocks",
                            info.name, shape, info.ty
                        ),
                    )
                })?;
            let off = (data_start as u64).checked_add(info.off);
            let end = off.and_then(|o| o.checked_add(len as u64));
            match (off, end) {
                (Some(o), Some(e)) if e <= file_len as u64 => {
                    spans.push((o as usize, e as usize, info.name.clone()))
                }
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                            "tensor {}: data at offset {} + {} bytes runs past the end of the file ({} bytes)",
                            info.name, info.off, len, file_len
                        ),
                    ));
                }
            }
            if info.off % align as u64 != 0 {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {}: offset {} is not aligned to {align}",
                        info.name, info.off
                    ),
                ));
            }
            let t = Tensor::new(
                &info.name,
                info.ty,
                shape,
                Buf::Mapped {
                    map: map.clone(),
                    off: (data_start as u64 + info.off) as usize,
                    len,
                },
            )
            .map_err(|e| Error::format(path, e.to_string()))?;
            if tensors.insert(info.name.clone(), t).is_some() {
                return Err(Error::format(
                    path,
                    format!("tensor {} appears twice", info.name),
                ));
            }
            order.push(info.name);
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::format(
                    path,
                    format!("tensors {} and {} overlap", w[0].2, w[1].2),
                ));
            }
        }
        nvfp4_from_ggml(path, &mut tensors, &mut order)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            version,
            meta,
            kv_order,
            tensors: TensorMap {
                source: path.to_path_buf(),
                tensors,
            },
            order,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.meta.get(key).and_then(|v| v.as_u64()).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata {key} is missing or not an integer"),
            )
        })
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.meta.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata {key} is missing or not a number"),
            )
        })
    }
    pub fn str(&self, key: &str) -> Result<&str> {
        self.meta.get(key).and_then(|v| v.as_str()).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata {key} is missing or not a string"),
            )
        })
    }
    /// An integer that may be given per layer as an array (llama.cpp's per-layer hparams).
    pub fn per_layer(&self, key: &str, n_layers: usize) -> Result<Vec<u64>> {
        match self.meta.get(key) {
            Some(Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(Error::format(
                        &self.path,
                        format!(
                            "metadata {key} has {} entries for {n_layers} layers",
                            a.len()
                        ),
                    ));
                }
                a.iter()
                    .map(|v| {
                        v.as_u64().ok_or_else(|| {
                            Error::format(&self.path, format!("metadata {key} holds a non-integer"))
                        })
                    })
                    .collect()
            }
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    Error::format(&self.path, format!("metadata {key} is not an integer"))
                })?;
                Ok(vec![x; n_layers])
            }
            None => Err(Error::format(
                &self.path,
                format!("metadata {key} is missing"),
            )),
        }
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.push(*x as u8),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(*x as u8),
        Value::Str(s) => put_str(w, s),
        Value::Array(a) => {
            // An empty array is written as strings (tokenizer lists are the ones that can be empty).
            let ety = a.first().map_or(8, type_id);
            w.extend_from_slice(&ety.to_le_bytes());
            w.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(w, x);
            }
        }
        Value::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
    }
}

/// NVFP4 tensors (ggml super-blocks) → elastica's blocks, with llama.cpp's per-tensor `.scale`
/// (one value, or one per expert: they must agree) and `.input_scale` folded in.
fn nvfp4_from_ggml(
    path: &Path,
    tensors: &mut BTreeMap<String, Tensor>,
    order: &mut Vec<String>,
) -> Result<()> {
    use crate::kernels::quant::ToF32;
    let names: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| t.dtype == DType::Nvfp4)
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        let t = &tensors[&name];
        let (rows, cols) = (t.rows(), t.cols());
        if cols % 64 != 0 {
            return Err(Error::format(
                path,
                format!("tensor {name}: NVFP4 rows of {cols} values are not whole 64-value blocks"),
            ));
        }
        let blocks = super::modelopt::from_ggml(t.bytes(), rows, cols);
        let mut nt = Tensor::new(
            &name,
            DType::Nvfp4,
            t.shape.clone(),
            Buf::Owned(Arc::new(blocks)),
        )
        .map_err(|e| Error::format(path, e.to_string()))?;
        let base = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        let mut one = |suffix: &str| -> Result<Option<f32>> {
            let sn = format!("{base}{suffix}");
            let Some(st) = tensors.remove(&sn) else {
                return Ok(None);
            };
            order.retain(|n| n != &sn);
            let v = st.to_f32();
            let first = *v
                .first()
                .ok_or_else(|| Error::format(path, format!("tensor {sn} is empty")))?;
            if v.iter().any(|&x| x != first) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {sn}: per-expert scales differ ({} values); elastica reads one scale per tensor",
                        v.len()
                    ),
                ));
            }
            if !(first.is_finite() && first > 0.0) {
                return Err(Error::format(
                    path,
                    format!("tensor {sn} is {first}, expected a positive finite scale"),
                ));
            }
            Ok(Some(first))
        };
        nt.scale = one(".scale")?.unwrap_or(1.0);
        nt.input_scale = one(".input_scale")?;
        tensors.insert(name, nt);
    }
    Ok(())
}

/// Writes a GGUF v3 file: metadata in the given order, tensor directory, then each tensor's
/// bytes from `data(i)`, aligned to 32 bytes.
pub fn write(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[super::OutTensor],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    const ALIGN: usize = 32;
    // NVFP4 weights take llama.cpp's `.scale` (and `.input_scale`) companions, F32 [1].
    let mut all: Vec<super::OutTensor> = vec![];
    let mut src: Vec<(usize, u8)> = vec![]; // (tensor, 0 = its bytes, 1 = scale, 2 = input scale)
    for (i, t) in tensors.iter().enumerate() {
        match t.dtype {
            DType::F8E4M3 => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {}: GGUF has no FP8 type (llama.cpp's converter dequantizes FP8); write HF (ModelOpt) or use NVFP4",
                        t.name
                    ),
                ));
            }
            DType::Nvfp4 if t.cols() % 64 != 0 => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor {}: {} values per row; GGUF's NVFP4 (GGML_TYPE_NVFP4) needs whole 64-value blocks (write HF, which needs 16)",
                        t.name,
                        t.cols()
                    ),
                ));
            }
            _ => {}
        }
        all.push(t.clone());
        src.push((i, 0));
        if t.dtype == DType::Nvfp4 {
            // One value, or one per expert of a stack (llama.cpp's shapes {1} and {n_expert}).
            let n = if t.shape.len() == 3 { t.shape[0] } else { 1 };
            if t.scale != 1.0 {
                all.push(super::OutTensor::new(
                    t.companion(".scale"),
                    DType::F32,
                    vec![n],
                ));
                src.push((i, 1));
            }
            if t.input_scale.is_some() {
                all.push(super::OutTensor::new(
                    t.companion(".input_scale"),
                    DType::F32,
                    vec![n],
                ));
                src.push((i, 2));
            }
        }
    }
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(all.len() as u64).to_le_bytes());
    let meta: Vec<&(String, Value)> = meta
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .collect();
    h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut h, k);
        h.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut h, v);
    }
    let mut off = 0usize;
    for t in &all {
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        h.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        h.extend_from_slice(&(off as u64).to_le_bytes());
        off = (off + t.nbytes()).next_multiple_of(ALIGN);
    }
    while h.len() % ALIGN != 0 {
        h.push(0);
    }
    let data = |j: usize| -> Result<Vec<u8>> {
        let (i, part) = src[j];
        let t = &tensors[i];
        Ok(match part {
            0 if t.dtype == DType::Nvfp4 => {
                let b = data(i)?;
                if b.len() != t.nbytes() {
                    return Ok(b); // write_body names the tensor and the sizes
                }
                super::modelopt::to_ggml(&b, t.rows(), t.cols())
            }
            0 => data(i)?,
            1 => t.scale.to_le_bytes().repeat(all[j].numel()),
            _ => t
                .input_scale
                .unwrap_or(1.0)
                .to_le_bytes()
                .repeat(all[j].numel()),
        })
    };
    super::write_body(path, &h, &all, ALIGN, data, |_, b| vec![b])
}
