//! The classifier's head: one hidden ReLU layer over a sentence embedding, then a softmax over `allow` and
//! the harm categories. Inference is plain Rust (about 50k multiply-adds); training is in [`super::train`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

/// Tensor names in the weights file.
const HIDDEN_W: &str = "hidden.weight";
const HIDDEN_B: &str = "hidden.bias";
const OUT_W: &str = "out.weight";
const OUT_B: &str = "out.bias";

/// A trained head's weights, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Embedding width (384 for all-MiniLM-L6-v2).
    pub inputs: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Outputs: `allow` and the categories.
    pub outputs: usize,
    /// `hidden x inputs`.
    pub w1: Vec<f32>,
    /// `hidden`.
    pub b1: Vec<f32>,
    /// `outputs x hidden`.
    pub w2: Vec<f32>,
    /// `outputs`.
    pub b2: Vec<f32>,
}

fn matvec(w: &[f32], b: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .zip(b)
        .map(|(row, bias)| row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + bias)
        .collect()
}

/// Softmax of `logits / temperature`.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let t = temperature.max(1e-3);
    let top = logits.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| ((l - top) / t).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

impl Head {
    /// The logits of one input. Only the input's non-zero entries are read: the n-gram part is mostly
    /// zeros, and skipping them makes the head's cost that of the embedding part alone.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let nonzero: Vec<(usize, f32)> = x.iter().copied().enumerate().filter(|(_, v)| *v != 0.0).collect();
        let mut h: Vec<f32> = self
            .w1
            .chunks_exact(self.inputs)
            .zip(&self.b1)
            .map(|(row, bias)| nonzero.iter().map(|&(i, v)| row[i] * v).sum::<f32>() + bias)
            .collect();
        h.iter_mut().for_each(|v| *v = v.max(0.0));
        matvec(&self.w2, &self.b2, &h)
    }

    /// Reads a weights file; the shapes must agree with each other and with `outputs`.
    pub fn load(path: &Path, outputs: usize) -> Result<Head, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Head::from_safetensors(&bytes, outputs).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn from_safetensors(bytes: &[u8], outputs: usize) -> Result<Head, String> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), String> {
            let t = tensors.get(name).ok_or_else(|| format!("no tensor `{name}`"))?;
            let flat = t
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(|e| format!("{name}: {e}"))?;
            Ok((t.dims().to_vec(), flat))
        };
        let (d1, w1) = get(HIDDEN_W)?;
        let (_, b1) = get(HIDDEN_B)?;
        let (d2, w2) = get(OUT_W)?;
        let (_, b2) = get(OUT_B)?;
        let [hidden, inputs] = d1[..] else {
            return Err(format!("`{HIDDEN_W}` must be 2-D, not {d1:?}"));
        };
        if d2 != [outputs, hidden] || b1.len() != hidden || b2.len() != outputs {
            return Err(format!(
                "shapes disagree: {HIDDEN_W} {d1:?}, {OUT_W} {d2:?}, biases {} and {}, for {outputs} classes",
                b1.len(),
                b2.len()
            ));
        }
        Ok(Head {
            inputs,
            hidden,
            outputs,
            w1,
            b1,
            w2,
            b2,
        })
    }

    /// The weights as a safetensors file.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, String> {
        let dev = Device::Cpu;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &dev).map_err(|e| e.to_string());
        let tensors: HashMap<String, Tensor> = [
            (HIDDEN_W, t(&self.w1, &[self.hidden, self.inputs])?),
            (HIDDEN_B, t(&self.b1, &[self.hidden])?),
            (OUT_W, t(&self.w2, &[self.outputs, self.hidden])?),
            (OUT_B, t(&self.b2, &[self.outputs])?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // A sorted map makes the file's bytes a function of the weights alone.
        let sorted: std::collections::BTreeMap<_, _> = tensors.iter().collect();
        safetensors::serialize(sorted.into_iter().map(|(k, v)| (k.as_str(), v)), None).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_survive_a_round_trip_and_bad_shapes_are_named() {
        let head = Head {
            inputs: 3,
            hidden: 2,
            outputs: 2,
            w1: vec![1.0, 0.0, -1.0, 0.5, 0.5, 0.5],
            b1: vec![0.0, -0.1],
            w2: vec![1.0, -1.0, -1.0, 1.0],
            b2: vec![0.2, -0.2],
        };
        let bytes = head.to_safetensors().unwrap();
        assert_eq!(Head::from_safetensors(&bytes, 2).unwrap(), head);
        assert_eq!(
            bytes,
            head.to_safetensors().unwrap(),
            "the file is a function of the weights"
        );
        let err = Head::from_safetensors(&bytes, 3).unwrap_err();
        assert!(err.contains("for 3 classes"), "{err}");
        let l = head.logits(&[1.0, 0.0, 0.0]);
        assert_eq!(l, vec![1.0 - 0.4 + 0.2, -1.0 + 0.4 - 0.2]);
        let p = softmax(&l, 1.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[0] > p[1]);
    }
}
