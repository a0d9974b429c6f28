//! Element types and reduction operators.

use half::{bf16, f16};

/// Wire/storage type of a buffer. Reductions are always computed in f32 and rounded once, so
/// only the float types reduce; the integer types travel through all-gather and broadcast (token
/// ids, byte counts) and are tagged as what they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U8,
    I32,
    U32,
    I64,
    U64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 | DType::U64 => 8,
        }
    }
    /// The type's name as the trace writes it (C names, like torch's profiler).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::BF16 => "bfloat16",
            DType::F16 => "half",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
        }
    }
    /// Whether all-reduce and reduce-scatter accept it (they reduce in f32).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
}

/// Element-wise operator of all-reduce and reduce-scatter (always applied in rank order, in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    Product,
}

/// A Rust element type that maps to a [`DType`]: what all-gather and broadcast move.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}

/// An element type that all-reduce and reduce-scatter can reduce (through f32).
pub trait Float: Element {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {
        $(impl Element for $t {
            const DTYPE: DType = DType::$d;
        })*
    };
}
element!(f32 => F32, bf16 => BF16, f16 => F16, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64);

impl Float for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Float for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl Float for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// All-reduce and reduce-scatter reduce in f32: an integer buffer is refused, not mangled.
pub fn check_reducible(op: &'static str, dtype: DType) -> crate::Result<()> {
    if dtype.is_float() {
        return Ok(());
    }
    Err(crate::CommError::Invalid {
        op,
        msg: format!(
            "{} cannot be reduced (reductions are in f32: use f32, bf16 or f16)",
            dtype.name()
        ),
    })
}
