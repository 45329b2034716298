//! `ferroserve model derive`: a second real model version from the one file we have. The Q4_1 GGUF is
//! re-quantized to Q8_0 or Q4_0 with Candle's quantizer, so a "v2" has genuinely different weights and
//! speed.
//!
//! - Metadata is copied: tokenizer, chat template, hyperparameters. `general.file_type` is set to the
//!   target, and `general.alignment` to the 32 bytes the writer uses.
//! - Each Q4_1 tensor is dequantized to f32 and quantized to the target.
//! - Other tensors are copied as they are: the f32 norms and SmolLM2's Q8_0 embedding.
//! - The file is written next to the destination and renamed into place, so a failed derive leaves no
//!   half-written model behind.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::ModelError;
use crate::fetch::Progress;
use crate::gguf::GgufFile;

/// The format a derived model's Q4_1 tensors are re-quantized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// 8-bit, one scale per 32 weights: about twice the size, closer to the original full-precision weights.
    Q8_0,
    /// 4-bit without a minimum: the same size as Q4_1, slightly coarser.
    Q4_0,
}

impl Target {
    fn dtype(self) -> GgmlDType {
        match self {
            Target::Q8_0 => GgmlDType::Q8_0,
            Target::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` for a file that is mostly this format.
    fn file_type(self) -> u32 {
        match self {
            Target::Q8_0 => 7,
            Target::Q4_0 => 2,
        }
    }
}

/// What a derive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The file written.
    pub path: PathBuf,
    /// Tensors re-quantized from Q4_1.
    pub converted: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Size of the new file.
    pub bytes: u64,
}

/// Writes `output`: `source` with its Q4_1 tensors re-quantized to `target`. Progress counts tensor bytes
/// read from the source.
pub fn derive(source: &Path, output: &Path, target: Target, progress: &dyn Progress) -> Result<Derived, ModelError> {
    let format = |message: String| ModelError::Format {
        path: source.to_path_buf(),
        message,
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    if let (Ok(a), Ok(b)) = (source.canonicalize(), output.canonicalize())
        && a == b
    {
        return Err(format(
            "the output would overwrite the source; choose another --output".into(),
        ));
    }
    let mut gguf = GgufFile::open(source)?;
    let mut names: Vec<String> = gguf.content.tensor_infos.keys().cloned().collect();
    names.sort();
    let total: u64 = names
        .iter()
        .map(|n| {
            let info = &gguf.content.tensor_infos[n];
            (info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
        })
        .sum();
    progress.begin(&format!("re-quantizing to {target:?}"), Some(total));
    let (mut tensors, mut converted, mut copied) = (Vec::with_capacity(names.len()), 0, 0);
    for name in &names {
        let q = gguf.content.tensor(&mut gguf.file, name, &Device::Cpu)?;
        progress.advance(q.storage_size_in_bytes() as u64);
        if q.dtype() == GgmlDType::Q4_1 {
            let weights = q.dequantize(&Device::Cpu)?;
            tensors.push(QTensor::quantize(&weights, target.dtype())?);
            converted += 1;
        } else {
            tensors.push(q);
            copied += 1;
        }
    }
    if converted == 0 {
        return Err(format("it has no Q4_1 tensors to re-quantize".into()));
    }
    progress.end(&format!("{converted} tensors re-quantized, {copied} copied"));

    let mut metadata: Vec<(String, Value)> = gguf
        .content
        .metadata
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "general.file_type" | "general.alignment"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(target.file_type())));
    metadata.push(("general.alignment".into(), Value::U32(32)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    let partial = output.with_extension("gguf.partial");
    let written = (|| {
        let mut w = BufWriter::new(std::fs::File::create(&partial).map_err(io(&partial))?);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let named: Vec<(&str, &QTensor)> = names.iter().map(String::as_str).zip(&tensors).collect();
        gguf_file::write(&mut w, &meta, &named)?;
        w.flush().map_err(io(&partial))?;
        std::fs::rename(&partial, output).map_err(io(output))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(Derived {
        path: output.to_path_buf(),
        converted,
        copied,
        bytes: std::fs::metadata(output).map_err(io(output))?.len(),
    })
}
