//! Reading a GGUF file's header and typed metadata.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::ModelError;

/// An opened GGUF: its parsed header and the file, positioned for reading tensors.
pub struct GgufFile {
    /// Where it came from, for error messages.
    pub path: PathBuf,
    /// Header: metadata and tensor index.
    pub content: Content,
    /// The open file, from which tensors are read.
    pub file: File,
}

impl GgufFile {
    /// Opens `path` and parses the GGUF header.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let content = Content::read(&mut file).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            // Candle appends a backtrace when RUST_BACKTRACE is set; the first line is the reason.
            message: format!("not a GGUF file ({})", e.to_string().lines().next().unwrap_or_default()),
        })?;
        // Candle multiplies a tensor's dimensions when it reads it; corrupted dimensions would overflow
        // there. Refuse them here, by name.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let bytes = elems.and_then(|e| (e / info.ggml_dtype.block_size()).checked_mul(info.ggml_dtype.type_size()));
            if bytes.is_none() {
                return Err(ModelError::Format {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor {name} has dimensions {:?}, too large to address",
                        info.shape.dims()
                    ),
                });
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    fn format_err(&self, message: String) -> ModelError {
        ModelError::Format {
            path: self.path.clone(),
            message,
        }
    }

    /// The raw metadata value under `key`.
    pub fn value(&self, key: &str) -> Result<&Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.format_err(format!("metadata key `{key}` is missing")))
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        self.value(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| self.format_err(format!("metadata key `{key}`: {e}")))
    }

    /// An integer metadata value of any width.
    pub fn u32(&self, key: &str) -> Result<u32, ModelError> {
        as_u32(self.value(key)?).ok_or_else(|| self.format_err(format!("metadata key `{key}` is not an integer")))
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<String>, ModelError> {
        let values = self
            .value(key)?
            .to_vec()
            .map_err(|e| self.format_err(format!("metadata key `{key}`: {e}")))?;
        values
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| self.format_err(format!("metadata key `{key}`: {e}")))
    }

    /// An array of integers.
    pub fn u32s(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        let values = self
            .value(key)?
            .to_vec()
            .map_err(|e| self.format_err(format!("metadata key `{key}`: {e}")))?;
        values
            .iter()
            .map(as_u32)
            .collect::<Option<_>>()
            .ok_or_else(|| self.format_err(format!("metadata key `{key}` holds a non-integer")))
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x),
        Value::U64(x) => u32::try_from(x).ok(),
        Value::I8(x) => u32::try_from(x).ok(),
        Value::I16(x) => u32::try_from(x).ok(),
        Value::I32(x) => u32::try_from(x).ok(),
        Value::I64(x) => u32::try_from(x).ok(),
        _ => None,
    }
}
