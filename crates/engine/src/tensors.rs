//! safetensors files that carry their provenance in their metadata, written
//! whole or region by region, and read back memory-mapped.

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// A named u8/i16/f32 array for safetensors.
pub struct NamedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NamedTensor {
    pub fn new(name: &str, dtype: safetensors::Dtype, shape: Vec<usize>, data: Vec<u8>) -> Self {
        NamedTensor { name: name.into(), dtype, shape, data }
    }
    pub fn u8(name: &str, shape: Vec<usize>, data: Vec<u8>) -> Self {
        NamedTensor { name: name.into(), dtype: safetensors::Dtype::U8, shape, data }
    }
    pub fn f32(name: &str, shape: Vec<usize>, data: &[f32]) -> Self {
        NamedTensor { name: name.into(), dtype: safetensors::Dtype::F32, shape, data: data.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
}

/// Write tensors with one metadata entry (`liverseg`: sorted JSON), since
/// safetensors serialises a metadata map in hash order and several entries
/// would make the bytes differ from run to run. The file's blake3 is taken
/// from the bytes on their way out (see `hash::note_written`).
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor], provenance: &[(String, String)]) -> Result<()> {
    use std::io::Write;
    let specs: Vec<(&str, safetensors::Dtype, Vec<usize>)> = tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.clone())).collect();
    for (t, (_, dtype, shape)) in tensors.iter().zip(&specs) {
        if t.data.len() != shape.iter().product::<usize>() * dtype.size() {
            return Err(anyhow!("tensor {}: {} bytes for shape {shape:?} of {dtype:?}", t.name, t.data.len()));
        }
    }
    let (head, regions) = safetensors_layout(path, &specs, provenance)?;
    let mut order: Vec<(u64, &NamedTensor)> = tensors.iter().map(|t| (regions[t.name.as_str()].0, t)).collect();
    order.sort_by_key(|o| o.0);
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    for part in std::iter::once(&head[..]).chain(order.iter().map(|(_, t)| &t.data[..])) {
        hasher.update(part);
        file.write_all(part).with_context(|| format!("cannot write {}", path.display()))?;
    }
    drop(file);
    super::hash::note_written(path, hasher.finalize())
}

/// Write tensors with metadata entries of their own (`safe_open(...).metadata()`
/// in Python returns them as a dict), laid out deterministically: tensors in
/// name order, the header's keys sorted, padded to 8 bytes as the format asks.
pub fn write_with_metadata(path: &Path, tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    use std::io::Write;
    let mut order: Vec<&NamedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut offset = 0usize;
    for t in &order {
        if t.data.len() != t.shape.iter().product::<usize>() * t.dtype.size() {
            return Err(anyhow!("tensor {}: {} bytes for shape {:?} of {:?}", t.name, t.data.len(), t.shape, t.dtype));
        }
        let dtype = serde_json::to_value(t.dtype)?;
        header.insert(t.name.clone(), serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}));
        offset += t.data.len();
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut hasher = blake3::Hasher::new();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    let len = (head.len() as u64).to_le_bytes();
    for part in [&len[..], &head[..]].into_iter().chain(order.iter().map(|t| &t.data[..])) {
        hasher.update(part);
        file.write_all(part).with_context(|| format!("cannot write {}", path.display()))?;
    }
    file.flush().with_context(|| format!("cannot write {}", path.display()))?;
    drop(file);
    super::hash::note_written(path, hasher.finalize())
}

/// The metadata entries of a safetensors file.
pub fn metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(|| format!("{}: not a safetensors file (too short)", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(anyhow!("{}: not a safetensors file (header of {n} bytes)", path.display()));
    }
    let mut head = vec![0u8; n as usize];
    file.read_exact(&mut head).with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&head).with_context(|| format!("{}: safetensors header is not JSON", path.display()))?;
    Ok(json.get("__metadata__").and_then(|m| serde_json::from_value(m.clone()).ok()).unwrap_or_default())
}

/// The header of a safetensors file (length prefix included) and where each
/// tensor's bytes go: name -> (file offset, length). safetensors itself lays
/// the header out, from the lengths alone.
fn safetensors_layout(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>)], provenance: &[(String, String)]) -> Result<(Vec<u8>, BTreeMap<String, (u64, u64)>)> {
    let holders: Vec<(String, Placeholder)> =
        tensors.iter().map(|(name, dtype, shape)| (name.to_string(), Placeholder(*dtype, shape.clone(), shape.iter().product::<usize>() * dtype.size()))).collect();
    let meta: BTreeMap<&str, &str> = provenance.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let meta = std::collections::HashMap::from([("liverseg".to_owned(), serde_json::to_string(&meta)?)]);
    let head = safetensors::tensor::serialize(holders.iter().map(|(n, h)| (n.clone(), h)), &Some(meta)).map_err(|e| anyhow!("cannot lay out {}: {e:?}", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&head[8..]).context("safetensors header")?;
    let start = head.len() as u64;
    let mut regions = BTreeMap::new();
    for (name, ..) in tensors {
        let off = &json[*name]["data_offsets"];
        let (a, b) = (off[0].as_u64().unwrap_or(0), off[1].as_u64().unwrap_or(0));
        regions.insert(name.to_string(), (start + a, b - a));
    }
    Ok((head, regions))
}

/// A safetensors file written region by region, from any number of threads,
/// so a stage can stream a dataset-sized tensor to disk without holding it in
/// memory. The bytes equal `write_safetensors` of the same tensors.
pub struct TensorFileWriter {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// name -> (absolute file offset, byte length, bytes written so far)
    regions: BTreeMap<String, (u64, u64, std::sync::atomic::AtomicU64)>,
}

/// Header-only stand-in for a tensor: safetensors lays out the header from
/// the lengths alone, and the data is written later by region.
struct Placeholder(safetensors::Dtype, Vec<usize>, usize);

impl safetensors::tensor::View for &Placeholder {
    fn dtype(&self) -> safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.2
    }
}

impl TensorFileWriter {
    /// Create `path` with the header for `tensors` (name, dtype, shape).
    pub fn create(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>)], provenance: &[(String, String)]) -> Result<Self> {
        let (head, layout) = safetensors_layout(path, tensors, provenance)?;
        let end = layout.values().map(|(a, n)| a + n).max().unwrap_or(head.len() as u64);
        let regions = layout.into_iter().map(|(name, (a, n))| (name, (a, n, std::sync::atomic::AtomicU64::new(0)))).collect();
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        use std::os::unix::fs::FileExt;
        file.write_all_at(&head, 0).and_then(|_| file.set_len(end)).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(TensorFileWriter { path: path.to_path_buf(), file, regions })
    }

    /// Write `bytes` at byte `offset` within tensor `name`.
    pub fn write_at(&self, name: &str, offset: usize, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let (start, len, written) = self.regions.get(name).ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        if offset as u64 + bytes.len() as u64 > *len {
            return Err(anyhow!("{}: write past the end of tensor `{name}`", self.path.display()));
        }
        self.file.write_all_at(bytes, start + offset as u64).with_context(|| format!("cannot write {}", self.path.display()))?;
        written.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Check that every tensor was written in full (regions never overlap in
    /// our callers, so byte counts suffice).
    pub fn finish(self) -> Result<()> {
        for (name, (_, len, written)) in &self.regions {
            let w = written.load(std::sync::atomic::Ordering::Relaxed);
            if w != *len {
                return Err(anyhow!("{}: tensor `{name}` got {w} of its {len} bytes", self.path.display()));
            }
        }
        Ok(())
    }
}

/// Tensors read back from a safetensors file, memory-mapped: normalise reads
/// every case of ingest this way, and a copy into fresh memory cost as much
/// as the resize. Store files are write-once (built aside, renamed into
/// place, never modified), which is what makes mapping them safe.
pub struct TensorFile {
    bytes: memmap2::Mmap,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        // SAFETY: see the type's comment; the file is not changed while mapped.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot read {}", path.display()))?;
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))?;
        Ok(TensorFile { bytes })
    }

    /// (shape, raw little-endian bytes, dtype) of tensor `name`.
    pub fn get(&self, name: &str) -> Result<(Vec<usize>, &[u8], safetensors::Dtype)> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| anyhow!("{e:?}"))?;
        let t = st.tensor(name).map_err(|_| anyhow!("no tensor `{name}`"))?;
        let (shape, dtype) = (t.shape().to_vec(), t.dtype());
        // Borrow from our own buffer rather than the temporary view.
        let start = t.data().as_ptr() as usize - self.bytes.as_ptr() as usize;
        Ok((shape, &self.bytes[start..start + t.data().len()], dtype))
    }

    /// Shape and bytes of a U8 tensor, borrowed from the file.
    pub fn u8_ref(&self, name: &str) -> Result<(Vec<usize>, &[u8])> {
        let (shape, data, dtype) = self.get(name)?;
        if dtype != safetensors::Dtype::U8 {
            return Err(anyhow!("tensor `{name}` is {dtype:?}, expected U8"));
        }
        Ok((shape, data))
    }

    pub fn u8(&self, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
        self.u8_ref(name).map(|(shape, data)| (shape, data.to_vec()))
    }

    pub fn i16(&self, name: &str) -> Result<(Vec<usize>, Vec<i16>)> {
        let (shape, data, dtype) = self.get(name)?;
        if dtype != safetensors::Dtype::I16 {
            return Err(anyhow!("tensor `{name}` is {dtype:?}, expected I16"));
        }
        Ok((shape, data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect()))
    }

    pub fn dtype(&self, name: &str) -> Result<safetensors::Dtype> {
        Ok(self.get(name)?.2)
    }
}
