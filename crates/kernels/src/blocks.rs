//! Weight and activation blocks: the GGUF formats our kernels read, byte for byte as the file has them
//! (scales stay f16: widening them to f32 made a decode step read 6 to 20 % more bytes).

use half::f16;

/// Weights per block, in every format here and in the activation blocks.
pub const BLOCK: usize = 32;
/// Bytes of one GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Bytes of one GGUF Q4_0 block: f16 scale, 16 bytes of nibbles (each value `d * (q - 8)`).
pub const Q4_0_BYTES: usize = 18;
/// Bytes of one GGUF Q8_0 block: f16 scale, 32 signed bytes.
pub const Q8_0_BYTES: usize = 34;

fn f16_at(b: &[u8]) -> f16 {
    f16::from_le_bytes([b[0], b[1]])
}

/// A quantized weight block the kernels can multiply with [`BlockQ8`] activations.
pub trait WeightBlock: Copy + Send + Sync + 'static {
    /// The format's name, for messages.
    const NAME: &'static str;
    /// Bytes of one block in the GGUF file.
    const GGUF_BYTES: usize;
    /// Reads one block from its GGUF bytes (`GGUF_BYTES` long).
    fn from_gguf(bytes: &[u8]) -> Self;
    /// The 32 weights as f32.
    fn values(&self) -> [f32; BLOCK];
}

/// A block of 32 four-bit weights, each `d * q + m`: weight `j < 16` is the low nibble of byte `j`,
/// weight `j + 16` its high nibble. Q4_1 stores `m`; Q4_0 has `m = -8 d`.
pub trait Q4: WeightBlock {
    /// Whether the block stores its minimum (Q4_1) rather than having `m = -8 d` (Q4_0).
    const STORES_MIN: bool;
    /// Scale and minimum, as f32.
    fn dm(&self) -> (f32, f32);

    /// The 16 bytes of nibbles.
    fn nibbles(&self) -> &[u8; 16];

    /// The 32 weights as f32.
    fn q4_values(&self) -> [f32; BLOCK] {
        let (d, m) = self.dm();
        let qs = self.nibbles();
        std::array::from_fn(|j| {
            let q = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            d * f32::from(q) + m
        })
    }
}

/// One Q4_1 block, as in the file: scale and minimum in f16, then the nibbles.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ41 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// 32 four-bit values.
    pub qs: [u8; 16],
}

impl Q4 for BlockQ41 {
    const STORES_MIN: bool = true;
    fn dm(&self) -> (f32, f32) {
        (self.d.to_f32(), self.m.to_f32())
    }

    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
}

impl WeightBlock for BlockQ41 {
    const NAME: &'static str = "Q4_1";
    const GGUF_BYTES: usize = Q4_1_BYTES;

    fn from_gguf(b: &[u8]) -> BlockQ41 {
        BlockQ41 {
            d: f16_at(&b[0..2]),
            m: f16_at(&b[2..4]),
            qs: b[4..20].try_into().expect("16 bytes"),
        }
    }

    fn values(&self) -> [f32; BLOCK] {
        self.q4_values()
    }
}

/// One Q4_0 block, as in the file: an f16 scale, then the nibbles; each weight is `d * (q - 8)`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ40 {
    /// Scale.
    pub d: f16,
    /// 32 four-bit values.
    pub qs: [u8; 16],
}

impl Q4 for BlockQ40 {
    const STORES_MIN: bool = false;
    fn dm(&self) -> (f32, f32) {
        let d = self.d.to_f32();
        (d, -8.0 * d)
    }

    fn nibbles(&self) -> &[u8; 16] {
        &self.qs
    }
}

impl WeightBlock for BlockQ40 {
    const NAME: &'static str = "Q4_0";
    const GGUF_BYTES: usize = Q4_0_BYTES;

    fn from_gguf(b: &[u8]) -> BlockQ40 {
        BlockQ40 {
            d: f16_at(&b[0..2]),
            qs: b[2..18].try_into().expect("16 bytes"),
        }
    }

    fn values(&self) -> [f32; BLOCK] {
        self.q4_values()
    }
}

/// One Q8_0 block, as in the file: an f16 scale, then 32 signed values; each weight is `d * q`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ80 {
    /// Scale.
    pub d: f16,
    /// 32 signed values.
    pub qs: [i8; 32],
}

impl WeightBlock for BlockQ80 {
    const NAME: &'static str = "Q8_0";
    const GGUF_BYTES: usize = Q8_0_BYTES;

    fn from_gguf(b: &[u8]) -> BlockQ80 {
        BlockQ80 {
            d: f16_at(&b[0..2]),
            qs: std::array::from_fn(|j| b[2 + j] as i8),
        }
    }

    fn values(&self) -> [f32; BLOCK] {
        let d = self.d.to_f32();
        self.qs.map(|q| d * f32::from(q))
    }
}

/// One block of 32 activations quantized to i8: `x ≈ d * q`; `s = d * Σq`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale.
    pub d: f32,
    /// Scale times the sum of `qs` (the minimum's share of a Q4_1 dot product).
    pub s: f32,
    /// 128 times the sum of `qs`: what offsetting signed weights by 128 adds to an integer dot product
    /// (the Q8_0 kernels' unsigned form).
    pub offset: i32,
    /// 32 quantized values.
    pub qs: [i8; 32],
}

/// Quantizes 32 activations: the scale maps the largest magnitude to 127.
pub fn quantize_block(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0.0_f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += i32::from(*q);
    }
    BlockQ8 {
        d,
        s: d * sum as f32,
        offset: 128 * sum,
        qs,
    }
}
