//! Element types and reduction operators.

use half::{bf16, f16};

/// Wire/storage type of a buffer, NCCL's list. Every type moves through every operation and
/// reduces with every operator that makes sense for it (see [`ReduceOp`] and [`check_reducible`]):
/// bf16 and f16 accumulate in f32, f32 in f32, f64 in f64, integers in their own type with
/// two's-complement wrap-around. The discriminants are part of the segment's slot header and
/// flight recorder, so new types go at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision (`f32`, torch.float32).
    F32,
    /// bfloat16 (`half::bf16`), the model weights' usual type; reduces in f32.
    BF16,
    /// IEEE half precision (`half::f16`); reduces in f32.
    F16,
    /// `u8` (torch.uint8).
    U8,
    /// `i32` (torch.int32).
    I32,
    /// `u32` (torch.uint32).
    U32,
    /// `i64` (torch.int64, token ids and counts).
    I64,
    /// `u64` (torch.uint64).
    U64,
    /// IEEE double precision (`f64`); reduces in f64.
    F64,
    /// `i8` (torch.int8).
    I8,
}

impl DType {
    /// Every type, in discriminant order.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::U8,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F64,
        DType::I8,
    ];
    /// Bytes per element, to turn element counts into buffer lengths.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
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
            DType::F64 => "double",
            DType::I8 => "int8",
        }
    }
    /// The short name `perf --dtype` takes and prints (nccl-tests' names).
    pub fn short_name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U64 => "u64",
            DType::F64 => "f64",
            DType::I8 => "i8",
        }
    }
    /// The type of a `short_name` (also accepts the C name of [`DType::name`]).
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.short_name() == s || d.name() == s)
    }
    /// Whether it is a floating-point type (f64, f32, bf16, f16).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
    }
    /// Whether it is an integer type (the bitwise reductions take only these).
    pub fn is_int(self) -> bool {
        !self.is_float()
    }
}

/// Element-wise operator of the reductions (all-reduce, reduce-scatter, reduce), always applied
/// in rank order 0..N-1 (see [`crate::reduce`]).
///
/// - `Avg`: the rank-order sum divided by N once at the end (integers: truncated toward zero).
/// - `PreMulSum(s)`: NCCL's ncclRedOpCreatePreMulSum: each rank multiplies its own input by its
///   `s` (computed in the accumulation type, rounded to the storage type) before the rank-order
///   sum, so ranks may pass different factors. Float types only.
/// - `BAnd`/`BOr`/`BXor`: bitwise, integer types only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReduceOp {
    /// Sum in rank order.
    Sum,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
    /// Product in rank order.
    Product,
    /// Rank-order sum divided by the group size once at the end.
    Avg,
    /// Bitwise and (integer types).
    BAnd,
    /// Bitwise or (integer types).
    BOr,
    /// Bitwise exclusive or (integer types).
    BXor,
    /// Each rank scales its own input by its factor before the sum (float types).
    PreMulSum(f64),
}

impl ReduceOp {
    /// Every operator without a parameter (and `PreMulSum(1.0)` last), for tests and perf.
    pub const ALL: [ReduceOp; 9] = [
        ReduceOp::Sum,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::Product,
        ReduceOp::Avg,
        ReduceOp::BAnd,
        ReduceOp::BOr,
        ReduceOp::BXor,
        ReduceOp::PreMulSum(1.0),
    ];
    /// A small code that names the operator (not its factor) in slot headers and traces.
    pub fn code(self) -> u32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
            ReduceOp::Product => 3,
            ReduceOp::Avg => 4,
            ReduceOp::BAnd => 5,
            ReduceOp::BOr => 6,
            ReduceOp::BXor => 7,
            ReduceOp::PreMulSum(_) => 8,
        }
    }
    /// The name `perf --redop` takes and prints (nccl-tests' names, plus the bitwise ones).
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Product => "prod",
            ReduceOp::Avg => "avg",
            ReduceOp::BAnd => "band",
            ReduceOp::BOr => "bor",
            ReduceOp::BXor => "bxor",
            ReduceOp::PreMulSum(_) => "premulsum",
        }
    }
    /// The operator of a [`ReduceOp::name`] (`premulsum` with factor 1; `product` also accepted).
    pub fn parse(s: &str) -> Option<ReduceOp> {
        if s == "product" {
            return Some(ReduceOp::Product);
        }
        ReduceOp::ALL.into_iter().find(|o| o.name() == s)
    }
}

/// A Rust element type that maps to a [`DType`]: what every collective moves and reduces.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The tag the byte-level calls carry for this type.
    const DTYPE: DType;
}

/// A float element type the model code computes with through f32 (f32, bf16, f16).
pub trait Float: Element {
    /// Widens to f32, where the arithmetic happens.
    fn to_f32(self) -> f32;
    /// Rounds an f32 result back to the storage type (bf16, f16: to nearest even).
    fn from_f32(v: f32) -> Self;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {
        $(impl Element for $t {
            const DTYPE: DType = DType::$d;
        })*
    };
}
element!(f32 => F32, bf16 => BF16, f16 => F16, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64, f64 => F64, i8 => I8);

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

/// Refuses the combinations that have no meaning: a bitwise operator on a float type, a
/// pre-multiplied sum of integers, a non-finite pre-multiplier.
pub fn check_reducible(op: &'static str, dtype: DType, redop: ReduceOp) -> crate::Result<()> {
    let msg = match redop {
        ReduceOp::BAnd | ReduceOp::BOr | ReduceOp::BXor if dtype.is_float() => format!(
            "{} is a bitwise reduction and {} is a float type (use an integer type)",
            redop.name(),
            dtype.name()
        ),
        ReduceOp::PreMulSum(_) if dtype.is_int() => format!(
            "premulsum takes float types, not {} (use sum)",
            dtype.name()
        ),
        ReduceOp::PreMulSum(s) if !s.is_finite() => {
            format!("the premulsum factor {s} is not finite")
        }
        _ => return Ok(()),
    };
    Err(crate::CommError::Invalid { op, msg })
}
