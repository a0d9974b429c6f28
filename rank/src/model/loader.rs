//! Slice-only loading of safetensors checkpoints (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`).
//!
//! Files are mmap'd and the header is parsed and validated here (lengths, dtype names, offsets in
//! range and not overlapping, shape × dtype size = byte length), so a corrupt file is a clear
//! error naming the file and tensor rather than a panic. A rank then copies out only its shard: a
//! row slice of a row-major `[rows, cols]` tensor is one contiguous byte range, a column slice is
//! one short range per row. Every copied byte is counted in [`Checkpoint::bytes_read`].

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::{Advice, Mmap};
use serde_json::Value;

use crate::checkpoint::exists_or_cause;

/// Element type named in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    BF16,
    F16,
    /// A valid safetensors dtype this runtime cannot use (its name and element size).
    Other(&'static str, usize),
}

impl StDtype {
    fn parse(name: &str) -> Option<StDtype> {
        const OTHERS: &[(&str, usize)] = &[
            ("BOOL", 1),
            ("U8", 1),
            ("I8", 1),
            ("F8_E5M2", 1),
            ("F8_E4M3", 1),
            ("I16", 2),
            ("U16", 2),
            ("I32", 4),
            ("U32", 4),
            ("F64", 8),
            ("I64", 8),
            ("U64", 8),
        ];
        match name {
            "F32" => Some(StDtype::F32),
            "BF16" => Some(StDtype::BF16),
            "F16" => Some(StDtype::F16),
            _ => OTHERS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(n, s)| StDtype::Other(n, s)),
        }
    }
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::BF16 | StDtype::F16 => 2,
            StDtype::Other(_, s) => s,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::BF16 => "BF16",
            StDtype::F16 => "F16",
            StDtype::Other(n, _) => n,
        }
    }
}

/// In-memory format of the weight matrices (`--dtype`); compute is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// bf16 stays bf16, f32 stays f32, f16 becomes f32 (no f16 kernels; bf16 would lose bits).
    #[default]
    Auto,
    F32,
    Bf16,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 3] = [WeightDtype::Auto, WeightDtype::F32, WeightDtype::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<WeightDtype, String> {
        WeightDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("'{s}' is not a weight dtype (auto, f32, bf16)"))
    }
}

/// A weight matrix's elements, in the format [`WeightDtype`] chose.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

impl Weights {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Weights::F32(v) => v.len() * 4,
            Weights::BF16(v) => v.len() * 2,
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub bytes: Range<usize>,
}

/// The bytes of a safetensors file: mapped from disk, or compiled into the binary (the bundled
/// model, which must load with no file around).
enum Bytes {
    Map(Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Static(b) => b,
        }
    }
}

impl Bytes {
    /// Read-ahead hint for a mapping; static bytes are already in memory.
    fn will_need(&self, range: &Range<usize>) {
        if let Bytes::Map(m) = self {
            let _ = m.advise_range(Advice::WillNeed, range.start, range.len());
        }
    }
}

/// One mmap'd (or static) safetensors file and its validated header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    map: Bytes,
    pub tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = crate::checkpoint::open_regular(path)?;
        // SAFETY: the mapping is read-only and private to this process. Like every mmap-based
        // checkpoint loader we rely on the file not being truncated or rewritten while the rank
        // runs (that would be a user error; the worst case is SIGBUS, not silent corruption of
        // our own memory beyond the copied weights).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot mmap {}", path.display()))?;
        // Each rank touches only its slices: no read-ahead into other ranks' bytes.
        let _ = map.advise(Advice::Random);
        let tensors = parse_header(&map).with_context(|| format!("{}", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Bytes::Map(map),
            tensors,
        })
    }

    /// A safetensors file held in static memory; `path` names it in errors.
    pub fn from_static(path: &Path, bytes: &'static [u8]) -> Result<SafetensorsFile> {
        let tensors = parse_header(bytes).with_context(|| format!("{}", path.display()))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map: Bytes::Static(bytes),
            tensors,
        })
    }
}

/// Parses and validates the header of a safetensors file held in `buf`.
pub fn parse_header(buf: &[u8]) -> Result<HashMap<String, TensorInfo>> {
    let file_len = buf.len();
    if file_len < 8 {
        bail!("truncated: {file_len} bytes, too short for the 8-byte header length");
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > (file_len - 8) as u64 {
        bail!("header length {n} runs past the end of the file ({file_len} bytes): truncated or not a safetensors file");
    }
    let n = n as usize;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let header: Value =
        serde_json::from_slice(&buf[8..data_start]).context("header is not valid JSON")?;
    let Value::Object(header) = header else {
        bail!("header is not a JSON object");
    };
    let mut tensors = HashMap::new();
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let info =
            parse_entry(entry, data_start, data_len).with_context(|| format!("tensor {name}"))?;
        tensors.insert(name.clone(), info);
    }
    // Offsets must not overlap (zero-length tensors may share a position).
    let mut by_start: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
    by_start.sort_by_key(|(_, t)| (t.bytes.start, t.bytes.end));
    for w in by_start.windows(2) {
        let ((a, ta), (b, tb)) = (w[0], w[1]);
        if ta.bytes.end > tb.bytes.start && !ta.bytes.is_empty() && !tb.bytes.is_empty() {
            bail!(
                "tensors {a} (data bytes {}..{}) and {b} (data bytes {}..{}) overlap",
                ta.bytes.start - data_start,
                ta.bytes.end - data_start,
                tb.bytes.start - data_start,
                tb.bytes.end - data_start
            );
        }
    }
    Ok(tensors)
}

fn parse_entry(entry: &Value, data_start: usize, data_len: usize) -> Result<TensorInfo> {
    let dtype_name = entry
        .get("dtype")
        .and_then(Value::as_str)
        .context("missing or non-string \"dtype\"")?;
    let dtype =
        StDtype::parse(dtype_name).with_context(|| format!("unknown dtype {dtype_name:?}"))?;
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .context("missing or non-list \"shape\"")?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .context("shape entries must be non-negative integers")
        })
        .collect::<Result<Vec<usize>>>()?;
    let offs = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .context("missing \"data_offsets\" [begin, end]")?;
    let (Some(begin), Some(end)) = (offs[0].as_u64(), offs[1].as_u64()) else {
        bail!("data_offsets must be two non-negative integers");
    };
    if begin > end {
        bail!("data_offsets [{begin}, {end}] are reversed");
    }
    if end > data_len as u64 {
        bail!("data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes): file truncated?");
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    let want = numel.checked_mul(dtype.size()).context("shape overflows")?;
    if (end - begin) as usize != want {
        bail!(
            "shape {shape:?} of {} needs {want} bytes but data_offsets [{begin}, {end}] hold {}",
            dtype.name(),
            end - begin
        );
    }
    Ok(TensorInfo {
        dtype,
        shape,
        bytes: data_start + begin as usize..data_start + end as usize,
    })
}

/// Which part of a `[rows, cols]` tensor (1-D tensors are `[n, 1]`) to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slice {
    All,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// A checkpoint directory: every safetensors file mapped, and where each tensor lives.
pub struct Checkpoint {
    pub dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    location: HashMap<String, usize>,
    bytes_read: u64,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if exists_or_cause(&index_path)? {
            let text = crate::checkpoint::read_text(&index_path)?;
            let index: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| format!("{}: no \"weight_map\" object", index_path.display()))?;
            let mut file_idx: BTreeMap<&str, usize> = BTreeMap::new();
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort_unstable();
            names.dedup();
            for shard in names {
                if shard.contains('/') || shard.contains("..") {
                    bail!(
                        "{}: shard name {shard:?} is not a file name",
                        index_path.display()
                    );
                }
                let path = dir.join(shard);
                if !exists_or_cause(&path)? {
                    bail!(
                        "{} names shard {shard}, which is missing from {}",
                        index_path.display(),
                        dir.display()
                    );
                }
                file_idx.insert(shard, files.len());
                files.push(SafetensorsFile::open(&path)?);
            }
            for (tensor, shard) in map {
                let shard = shard.as_str().with_context(|| {
                    format!(
                        "{}: weight_map[{tensor:?}] is not a file name",
                        index_path.display()
                    )
                })?;
                let i = file_idx[shard];
                if !files[i].tensors.contains_key(tensor) {
                    bail!(
                        "{} places tensor {tensor} in {shard}, but {shard} does not contain it",
                        index_path.display()
                    );
                }
                location.insert(tensor.clone(), i);
            }
        } else if exists_or_cause(&single)? {
            let f = SafetensorsFile::open(&single)?;
            for name in f.tensors.keys() {
                location.insert(name.clone(), 0);
            }
            files.push(f);
        } else {
            bail!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            );
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            location,
            bytes_read: 0,
        })
    }

    /// A single-file checkpoint whose model.safetensors is `bytes` (the bundled model).
    pub fn from_static(dir: &Path, bytes: &'static [u8]) -> Result<Checkpoint> {
        let f = SafetensorsFile::from_static(&dir.join("model.safetensors"), bytes)?;
        let location = f.tensors.keys().map(|n| (n.clone(), 0)).collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files: vec![f],
            location,
            bytes_read: 0,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// Bytes copied out of the mappings so far (the sum of the loaded slices).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Sum of the data bytes of every tensor in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.tensors.values())
            .map(|t| t.bytes.len() as u64)
            .sum()
    }

    fn lookup(&self, name: &str, shape: &[usize]) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let Some(&i) = self.location.get(name) else {
            bail!(
                "tensor {name} (expected shape {shape:?}) is missing from the checkpoint in {}",
                self.dir.display()
            );
        };
        let f = &self.files[i];
        let t = &f.tensors[name];
        if t.shape != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {shape:?}",
                f.path.display(),
                t.shape
            );
        }
        if matches!(t.dtype, StDtype::Other(..)) {
            bail!(
                "tensor {name} in {} has dtype {}, which is not supported (F32, BF16 or F16)",
                f.path.display(),
                t.dtype.name()
            );
        }
        Ok((f, t))
    }

    /// Loads `slice` of tensor `name`, which must have shape `shape` (1-D or 2-D), stored as `want`.
    pub fn load(
        &mut self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        want: WeightDtype,
    ) -> Result<Weights> {
        let (f, t) = self.lookup(name, shape)?;
        let (rows, cols) = match *shape {
            [n] => (n, 1),
            [r, c] => (r, c),
            _ => bail!("tensor {name}: only 1-D and 2-D tensors can be sliced"),
        };
        let es = t.dtype.size();
        let row_bytes = cols * es;
        let mut chunks: Vec<Range<usize>> = Vec::new();
        match &slice {
            Slice::All => chunks.push(t.bytes.clone()),
            Slice::Rows(r) => {
                assert!(r.end <= rows, "{name}: rows {r:?} of {rows}");
                let s = t.bytes.start + r.start * row_bytes;
                chunks.push(s..s + r.len() * row_bytes);
            }
            Slice::Cols(c) => {
                assert!(c.end <= cols, "{name}: cols {c:?} of {cols}");
                for row in 0..rows {
                    let s = t.bytes.start + row * row_bytes + c.start * es;
                    chunks.push(s..s + c.len() * es);
                }
            }
        }
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        if let (Slice::All | Slice::Rows(_), Some(c)) = (&slice, chunks.first()) {
            f.map.will_need(c);
        }
        let n = total / es;
        let out = match (t.dtype, want) {
            (StDtype::BF16, WeightDtype::Auto | WeightDtype::Bf16) => {
                let mut v = try_vec(n, &format!("loading tensor {name}"))?;
                for c in &chunks {
                    v.extend(
                        f.map[c.clone()]
                            .chunks_exact(2)
                            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
                    );
                }
                Weights::BF16(v)
            }
            (src, WeightDtype::Bf16) => {
                let mut v = try_vec(n, &format!("loading tensor {name}"))?;
                for c in &chunks {
                    v.extend(to_f32(src, &f.map[c.clone()]).map(bf16::from_f32));
                }
                Weights::BF16(v)
            }
            (src, WeightDtype::Auto | WeightDtype::F32) => {
                let mut v = try_vec(n, &format!("loading tensor {name}"))?;
                for c in &chunks {
                    v.extend(to_f32(src, &f.map[c.clone()]));
                }
                Weights::F32(v)
            }
        };
        self.bytes_read += total as u64;
        Ok(out)
    }

    /// Loads `slice` of tensor `name` as f32 (norm weights and biases).
    pub fn load_f32(&mut self, name: &str, shape: &[usize], slice: Slice) -> Result<Vec<f32>> {
        match self.load(name, shape, slice, WeightDtype::F32)? {
            Weights::F32(v) => Ok(v),
            Weights::BF16(_) => unreachable!("F32 requested"),
        }
    }
}

/// An empty vector with room for `n` elements, or an error naming `what` and the bytes when
/// the memory is not there (instead of aborting the process).
pub fn try_vec<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        anyhow::anyhow!(
            "{what}: cannot allocate {} bytes",
            n.saturating_mul(std::mem::size_of::<T>())
        )
    })?;
    Ok(v)
}

fn to_f32(src: StDtype, bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    let w = src.size();
    bytes.chunks_exact(w).map(move |b| match src {
        StDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        StDtype::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        StDtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        StDtype::Other(..) => unreachable!("rejected in lookup"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a safetensors file by hand (so tests can also write broken ones).
    pub fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        std::fs::write(path, b).unwrap();
    }

    fn tmpdir(tag: &str) -> crate::tests::TmpDir {
        crate::tests::tmpdir(&format!("loader-{tag}"))
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn slices_rows_cols_and_counts_bytes() {
        let d = tmpdir("slices");
        let m: Vec<f32> = (0..12).map(|i| i as f32).collect(); // [3, 4]
        let hdr = r#"{"m":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},"__metadata__":{"format":"pt"}}"#;
        write_raw(&d.join("model.safetensors"), hdr, &f32_bytes(&m));
        let mut ck = Checkpoint::open(&d).unwrap();
        let r = ck
            .load("m", &[3, 4], Slice::Rows(1..3), WeightDtype::Auto)
            .unwrap();
        assert_eq!(r, Weights::F32((4..12).map(|i| i as f32).collect()));
        assert_eq!(ck.bytes_read(), 32);
        let c = ck
            .load("m", &[3, 4], Slice::Cols(1..3), WeightDtype::Bf16)
            .unwrap();
        assert_eq!(
            c,
            Weights::BF16(
                [1., 2., 5., 6., 9., 10.]
                    .iter()
                    .map(|v| bf16::from_f32(*v))
                    .collect()
            )
        );
        assert_eq!(ck.bytes_read(), 32 + 24);
    }

    fn open_err(tag: &str, header: &str, data: &[u8]) -> String {
        let d = tmpdir(tag);
        write_raw(&d.join("model.safetensors"), header, data);
        let e = match Checkpoint::open(&d) {
            Ok(_) => String::from("opened"),
            Err(e) => format!("{e:#}"),
        };
        e
    }

    #[test]
    fn corrupt_headers_are_clear_errors() {
        let e = open_err(
            "dtype",
            r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        );
        assert!(
            e.contains("model.safetensors: tensor a: unknown dtype \"Q4\""),
            "{e}"
        );
        let e = open_err(
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        );
        assert!(
            e.contains("tensors a (data bytes 0..8) and b (data bytes 4..12) overlap"),
            "{e}"
        );
        let e = open_err(
            "range",
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        );
        assert!(
            e.contains("tensor a: data_offsets [0, 16] run past the end of the data (8 bytes)"),
            "{e}"
        );
        let e = open_err(
            "shape",
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(
            e.contains("tensor a: shape [3] of F32 needs 12 bytes"),
            "{e}"
        );
        // A header length past the end of the file.
        let d = tmpdir("trunc");
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(d.join("model.safetensors"), b).unwrap();
        let e = format!("{:#}", Checkpoint::open(&d).err().unwrap());
        assert!(
            e.contains("header length 1000 runs past the end of the file (10 bytes)"),
            "{e}"
        );
        std::fs::write(d.join("model.safetensors"), [1u8, 2]).unwrap();
        let e = format!("{:#}", Checkpoint::open(&d).err().unwrap());
        assert!(e.contains("truncated: 2 bytes"), "{e}");
    }

    #[test]
    fn wrong_shape_dtype_missing_tensor() {
        let d = tmpdir("wrong");
        let hdr = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"i":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#;
        write_raw(&d.join("model.safetensors"), hdr, &[0; 24]);
        let mut ck = Checkpoint::open(&d).unwrap();
        let e = format!(
            "{:#}",
            ck.load("a", &[4, 1], Slice::All, WeightDtype::Auto)
                .unwrap_err()
        );
        assert!(
            e.contains("tensor a in ") && e.contains("has shape [2, 2], expected [4, 1]"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            ck.load("i", &[1], Slice::All, WeightDtype::Auto)
                .unwrap_err()
        );
        assert!(
            e.contains("tensor i in ") && e.contains("has dtype I64, which is not supported"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            ck.load("z", &[7], Slice::All, WeightDtype::Auto)
                .unwrap_err()
        );
        assert!(
            e.contains("tensor z (expected shape [7]) is missing"),
            "{e}"
        );
    }

    #[test]
    fn index_with_missing_shard() {
        let d = tmpdir("index");
        write_raw(
            &d.join("model-00001-of-00002.safetensors"),
            r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]}}"#,
            &half::f16::from_f32(1.5).to_le_bytes(),
        );
        let idx = r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#;
        std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
        let mut ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.load_f32("a", &[1], Slice::All).unwrap(), vec![1.5]);
        let idx = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
        std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
        let e = format!("{:#}", Checkpoint::open(&d).err().unwrap());
        assert!(
            e.contains("names shard model-00002-of-00002.safetensors, which is missing"),
            "{e}"
        );
        let gone = d.join("no-such-model");
        let e = format!("{:#}", Checkpoint::open(&gone).err().unwrap());
        assert!(e.contains("no-such-model does not exist"), "{e}");
    }

    /// Before try_vec this aborted the process ("memory allocation of N bytes failed").
    #[test]
    fn an_allocation_too_large_is_an_error_with_its_size() {
        let e = format!("{:#}", try_vec::<f32>(1 << 61, "tensor w").err().unwrap());
        assert_eq!(
            e,
            format!("tensor w: cannot allocate {} bytes", 1usize << 63)
        );
    }
}
