//! The safetensors JSON header: parsing (strict: no duplicate keys, no unknown fields) and
//! writing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::manifest::{expected_tensors, Layout, Manifest};

/// `__metadata__` key holding the manifest.
pub const MANIFEST_KEY: &str = "bitstack.manifest";
/// `__metadata__` key holding the format version as a decimal string.
pub const VERSION_KEY: &str = "bitstack.version";
/// `__metadata__` key holding the CRC-32 of the manifest text, 8 lowercase hex digits.
pub const MANIFEST_CRC_KEY: &str = "bitstack.manifest.crc32";
/// `__metadata__` key identifying the format; its value is [`FORMAT_NAME`].
pub const FORMAT_KEY: &str = "format";
/// Value of [`FORMAT_KEY`].
pub const FORMAT_NAME: &str = "bitstack";
/// Largest header length accepted (and written), in bytes: 100,000,000, as safetensors.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a safetensors header.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A parsed safetensors header.
#[derive(Debug, Default)]
pub(crate) struct RawHeader {
    pub(crate) metadata: Option<BTreeMap<String, String>>,
    pub(crate) tensors: HashMap<String, RawTensor>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut header = RawHeader::default();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        if header.metadata.is_some() {
                            return Err(serde::de::Error::custom("duplicate key \"__metadata__\""));
                        }
                        let meta: UniqueStringMap = map.next_value()?;
                        header.metadata = Some(meta.0);
                    } else {
                        let tensor: RawTensor = map.next_value()?;
                        if header.tensors.contains_key(&key) {
                            return Err(serde::de::Error::custom(format!(
                                "duplicate tensor {key:?}"
                            )));
                        }
                        header.tensors.insert(key, tensor);
                    }
                }
                Ok(header)
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// A string → string map that rejects duplicate keys.
struct UniqueStringMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueStringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueStringMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate __metadata__ key {k:?}"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueStringMap(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// Parses the header text (without the length prefix).
pub(crate) fn parse_header(text: &[u8]) -> Result<RawHeader, String> {
    let text = std::str::from_utf8(text).map_err(|e| format!("not UTF-8: {e}"))?;
    if !text.starts_with('{') {
        return Err("does not start with '{'".to_owned());
    }
    serde_json::from_str(text).map_err(|e| format!("bad JSON: {e}"))
}

/// Checks that the header's tensor entries are exactly those the manifest implies.
pub(crate) fn check_tensors(
    mut tensors: HashMap<String, RawTensor>,
    manifest: &Manifest,
    layout: &Layout,
) -> Result<(), String> {
    for (name, dtype, shape, range) in expected_tensors(manifest, layout) {
        let Some(t) = tensors.remove(&name) else {
            return Err(format!("tensor {name:?} of the manifest is missing"));
        };
        if t.dtype != dtype.name() || t.shape.as_slice() != &*shape {
            return Err(format!(
                "tensor {name:?} is {} {:?} but the manifest says {dtype} {shape:?}",
                t.dtype, t.shape
            ));
        }
        if t.data_offsets != [range.start, range.end] {
            return Err(format!(
                "tensor {name:?} has data_offsets {:?} but the manifest says [{}, {}]",
                t.data_offsets, range.start, range.end
            ));
        }
    }
    if let Some(name) = tensors.keys().min() {
        return Err(format!(
            "tensor {name:?} is not in the manifest ({} such tensors)",
            tensors.len()
        ));
    }
    Ok(())
}

/// Serializes the header (JSON, padded with spaces to a multiple of 8 bytes).
pub(crate) fn write_header(manifest: &Manifest, layout: &Layout) -> Result<Vec<u8>, String> {
    let manifest_text = serde_json::to_string(manifest).map_err(|e| e.to_string())?;
    let mut out = String::with_capacity(manifest_text.len() * 2 + 64);
    out.push_str("{\"__metadata__\":{");
    out.push_str(&json(FORMAT_KEY)?);
    out.push(':');
    out.push_str(&json(FORMAT_NAME)?);
    out.push(',');
    out.push_str(&json(VERSION_KEY)?);
    out.push(':');
    out.push_str(&json(&manifest.version.to_string())?);
    out.push(',');
    out.push_str(&json(MANIFEST_KEY)?);
    out.push(':');
    out.push_str(&json(&manifest_text)?);
    out.push(',');
    out.push_str(&json(MANIFEST_CRC_KEY)?);
    out.push(':');
    out.push_str(&json(&format!(
        "{:08x}",
        crc32fast::hash(manifest_text.as_bytes())
    ))?);
    out.push('}');
    for (name, dtype, shape, range) in expected_tensors(manifest, layout) {
        out.push(',');
        out.push_str(&json(&name)?);
        out.push_str(":{\"dtype\":");
        out.push_str(&json(dtype.name())?);
        out.push_str(",\"shape\":");
        out.push_str(&json(&*shape)?);
        out.push_str(",\"data_offsets\":");
        out.push_str(&json(&[range.start, range.end])?);
        out.push('}');
    }
    out.push('}');
    let mut bytes = out.into_bytes();
    let padded = bytes
        .len()
        .checked_next_multiple_of(8)
        .ok_or("header too large")?;
    bytes.resize(padded, b' ');
    Ok(bytes)
}

/// Serializes one JSON value.
fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}
