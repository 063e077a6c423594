//! Parquet tables (polars) that carry their provenance in the file's
//! key-value metadata.

use anyhow::{Context, Result};
use polars::prelude::{DataFrame, KeyValueMetadata, ParquetCompression, ParquetReader, ParquetWriter, SerReader};
use std::collections::BTreeMap;
use std::path::Path;

pub fn write_parquet(path: &Path, df: &mut DataFrame, provenance: &[(String, String)]) -> Result<()> {
    // Buffered: the writer issues one small write per page header and value run.
    let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    // One chunk per column makes one row group. Writing the batch directly
    // skips polars' regrouping of chunks, whose first use costs ~6 ms (it
    // zero-fills an 8 MiB buffer) in every process.
    df.rechunk_mut();
    let mut writer = ParquetWriter::new(file)
        .with_compression(ParquetCompression::Uncompressed)
        .with_key_value_metadata(Some(KeyValueMetadata::from_static(footer_metadata(df, provenance))))
        .batched(df.schema())
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer.write_batch(df).and_then(|_| writer.finish()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The footer's key-value pairs: the provenance, and the Arrow schema with
/// the provenance as its metadata too. pyarrow and other Arrow readers take a
/// table's schema metadata from `ARROW:schema` alone when it is present, so
/// without this `read_table(f).schema.metadata` would be empty.
fn footer_metadata(df: &DataFrame, provenance: &[(String, String)]) -> Vec<(String, String)> {
    use base64::Engine;
    use polars::prelude::{CompatLevel, SchemaExt};
    use polars_arrow::io::ipc::write::{default_ipc_fields, schema_to_bytes};
    let mut pairs = provenance.to_vec();
    let schema = df.schema().to_arrow(CompatLevel::newest());
    // Nested columns need polars' own IPC field conversion; let it write the schema then.
    if schema.iter_values().any(|f| f.dtype.is_nested()) {
        return pairs;
    }
    let metadata = provenance.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect();
    let message = schema_to_bytes(&schema, &default_ipc_fields(schema.iter_values()), Some(&metadata));
    // Arrow's legacy IPC framing: continuation marker, then the length.
    let mut framed = Vec::with_capacity(message.len() + 8);
    framed.extend_from_slice(&[0xff; 4]);
    framed.extend_from_slice(&(message.len() as u32).to_le_bytes());
    framed.extend_from_slice(&message);
    pairs.push(("ARROW:schema".to_owned(), base64::engine::general_purpose::STANDARD.encode(framed)));
    pairs
}

pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ParquetReader::new(file).finish().with_context(|| format!("{}: not a readable Parquet table", path.display()))
}

/// The key-value metadata of a Parquet file, read with the `parquet` crate so
/// that any Parquet file (not only ours) can be inspected.
pub fn parquet_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let mut out = BTreeMap::new();
    if let Some(kv) = reader.metadata().file_metadata().key_value_metadata() {
        for e in kv {
            out.insert(e.key.clone(), e.value.clone().unwrap_or_default());
        }
    }
    Ok(out)
}
