//! The CUDA kernel launcher, and the host side of the generic ops' kernels (dropout, GELU,
//! the masked softmax, cross-entropy, AdamW). Each op's CUDA source is a `.cu` file beside the
//! op, compiled once per process with NVRTC (no nvcc step in the build, and the CPU build does
//! not see them) after the shared [`PRELUDE`]. The NF4 kernels' host side is in
//! `quant::kernels`, the LoRA inference kernel's in `lora::kernels`.
//!
//! The `__fmul_rn`/`__fadd_rn` intrinsics in the sources keep NVRTC from fusing a multiply and
//! an add into an FMA, which would round differently from the CPU paths they must equal.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Error, Result, Storage, Tensor};

/// 16-bit conversions and the block reduction every kernel module starts with.
pub const PRELUDE: &str = include_str!("prelude.cu");

/// One NVRTC module: the prelude, `defines` and a `.cu` source, compiled to PTX on first use.
/// NVRTC's default target (the oldest architecture it supports) is JIT-compiled by the driver
/// for the card at hand.
pub struct CudaModule {
    pub name: &'static str,
    pub source: &'static str,
    /// `#define`s the source expects from the host, computed once.
    pub defines: fn() -> String,
    /// The virtual architecture to compile for, where the source needs a newer one than
    /// NVRTC's default.
    pub arch: Option<&'static str>,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl CudaModule {
    pub const fn new(name: &'static str, source: &'static str, defines: fn() -> String) -> Self {
        CudaModule {
            name,
            source,
            defines,
            arch: None,
            ptx: OnceLock::new(),
        }
    }

    /// The module compiled for `arch` (e.g. `compute_80`); the driver then refuses to load
    /// it on older cards, and only its own kernels are lost there.
    pub const fn for_arch(mut self, arch: &'static str) -> Self {
        self.arch = Some(arch);
        self
    }

    /// The whole text NVRTC compiles: the prelude, the host's defines and the module's source
    /// (`scripts/gpu/sass.sh` compiles it to machine code to count a kernel's instructions).
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n{}\n{}", (self.defines)(), self.source)
    }

    pub fn ptx(&self) -> Result<&str> {
        self.ptx
            .get_or_init(|| {
                use candle_core::cuda_backend::cudarc::nvrtc;
                let code = self.full_source();
                let opts = nvrtc::CompileOptions {
                    arch: self.arch,
                    ..Default::default()
                };
                nvrtc::compile_ptx_with_opts(code, opts)
                    .map(|p| p.to_src())
                    .map_err(|e| {
                        format!("compiling the {} CUDA kernels with NVRTC: {e}", self.name)
                    })
            })
            .as_deref()
            .map_err(|e| Error::Msg(e.clone()))
    }
}

/// The major version of `device`'s compute capability (`None` off a GPU), asked of the driver
/// once a process: decoding asks per layer and token, and a process runs on one kind of card.
fn compute_major(device: &Device) -> Result<Option<i32>> {
    static MAJOR: OnceLock<i32> = OnceLock::new();
    let Device::Cuda(d) = device else {
        return Ok(None);
    };
    if let Some(&major) = MAJOR.get() {
        return Ok(Some(major));
    }
    let (major, _) = d
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(Error::wrap)?;
    Ok(Some(*MAJOR.get_or_init(|| major)))
}

/// Whether `device` is a GPU of compute capability 8.0 or later, where the modules compiled
/// `for_arch("compute_80")` load.
pub fn sm80_or_later(device: &Device) -> Result<bool> {
    Ok(compute_major(device)?.is_some_and(|major| major >= 8))
}

/// Whether `device` is a GPU of compute capability 9.0 or later: programmatic dependent launch
/// ([`run_kernel_pdl!`]) and the modules compiled `for_arch("compute_90")`.
pub fn sm90_or_later(device: &Device) -> Result<bool> {
    Ok(compute_major(device)?.is_some_and(|major| major >= 9))
}

/// The multiprocessors of `dev` (at least 1): how many blocks a kernel that keeps them all busy
/// launches.
pub fn multiprocessors(dev: &CudaDevice) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(Error::wrap)?;
    Ok(sms.max(1) as u32)
}

/// No host-side `#define`s.
pub fn no_defines() -> String {
    String::new()
}

/// Launches kernel `$name` of `$module` (a [`CudaModule`]) on `$dev` with `$cfg`, pushing the
/// arguments in order.
#[macro_export]
macro_rules! run_kernel {
    ($module:expr, $dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::WrapErr as _;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let module = &$module;
        let func = $dev.get_or_load_custom_func($name, module.name, module.ptx()?)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        let cfg = $cfg;
        // SAFETY: every call site passes the kernel's parameters in its order and types.
        unsafe { builder.launch(cfg) }.w()
    }};
}

/// [`run_kernel!`] with programmatic dependent launch (sm_90): the kernel may start while the
/// one before it on the stream finishes, and must execute `griddepcontrol.wait` before it reads
/// anything an earlier kernel wrote or writes anything (what it reads before, its constant
/// inputs, any earlier kernel may still be reading too). The arguments go through [`PdlArg`].
#[macro_export]
macro_rules! run_kernel_pdl {
    ($module:expr, $dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        let module = &$module;
        let func = $dev.get_or_load_custom_func($name, module.name, module.ptx()?)?;
        let stream = $dev.cuda_stream();
        let mut slots: Vec<u64> = vec![$( $crate::ops::kernels::PdlArg::slot($arg, &stream) ),+];
        let cfg = $cfg;
        // SAFETY: every call site passes the kernel's parameters in its order and types, and
        // the kernel waits as the macro's comment says.
        unsafe { $crate::ops::kernels::launch_pdl(func.cu_function(), &stream, cfg, &mut slots) }
    }};
}

/// [`run_kernel_pdl!`] from module `$pdl` where it is `Some`, else [`run_kernel!`] from
/// `$module`: one argument list for a kernel that launches either way.
#[macro_export]
macro_rules! run_kernel_maybe_pdl {
    ($pdl:expr, $module:expr, $dev:expr, $name:expr, $cfg:expr; $($arg:expr),+ $(,)?) => {
        match $pdl {
            Some(pdl) => $crate::run_kernel_pdl!(pdl, $dev, $name, $cfg; $($arg),+),
            None => $crate::run_kernel!($module, $dev, $name, $cfg; $($arg),+).map(|_| ()),
        }
    };
}

/// A kernel parameter as the 8 bytes the driver reads it from (little-endian: a 4-byte value in
/// the low half), for [`run_kernel_pdl!`].
pub trait PdlArg {
    fn slot(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64;
}
impl PdlArg for i32 {
    fn slot(&self, _: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        *self as u32 as u64
    }
}
impl PdlArg for u32 {
    fn slot(&self, _: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        *self as u64
    }
}
impl PdlArg for i64 {
    fn slot(&self, _: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        *self as u64
    }
}
impl PdlArg for f32 {
    fn slot(&self, _: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        self.to_bits() as u64
    }
}
impl<T> PdlArg for CudaSlice<T> {
    fn slot(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
        self.device_ptr(stream).0
    }
}
impl<T> PdlArg for candle_core::cuda_backend::cudarc::driver::CudaView<'_, T> {
    fn slot(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr as _;
        self.device_ptr(stream).0
    }
}
impl<T: PdlArg + ?Sized> PdlArg for &T {
    fn slot(&self, stream: &candle_core::cuda_backend::cudarc::driver::CudaStream) -> u64 {
        (**self).slot(stream)
    }
}

/// Launches `func` on `stream` with `cfg` and the programmatic-stream-serialization attribute,
/// its parameters in `slots` (see [`PdlArg`]).
///
/// # Safety
/// `slots` must be the kernel's parameters, in order, and the kernel must wait as
/// [`run_kernel_pdl!`] says.
pub unsafe fn launch_pdl(
    func: candle_core::cuda_backend::cudarc::driver::sys::CUfunction,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    cfg: LaunchConfig,
    slots: &mut [u64],
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut params: Vec<*mut std::ffi::c_void> = slots
        .iter_mut()
        .map(|s| s as *mut u64 as *mut std::ffi::c_void)
        .collect();
    // SAFETY: all-zero is a valid attribute (the union has a byte pad), then the one field set.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the caller's contract; `params` and `attr` outlive the call.
    let status =
        unsafe { sys::cuLaunchKernelEx(&config, func, params.as_mut_ptr(), std::ptr::null_mut()) };
    if status != sys::cudaError_enum::CUDA_SUCCESS {
        return Err(Error::Msg(format!(
            "launching a kernel with PDL: {status:?}"
        )));
    }
    Ok(())
}

static DROPOUT: CudaModule =
    CudaModule::new("adapterlab_dropout", include_str!("dropout.cu"), no_defines);
static GELU: CudaModule = CudaModule::new("adapterlab_gelu", include_str!("gelu.cu"), no_defines);
static SOFTMAX: CudaModule =
    CudaModule::new("adapterlab_softmax", include_str!("softmax.cu"), no_defines);
static CROSS_ENTROPY: CudaModule = CudaModule::new(
    "adapterlab_cross_entropy",
    include_str!("cross_entropy.cu"),
    no_defines,
);
static ADAMW: CudaModule =
    CudaModule::new("adapterlab_adamw", include_str!("adamw.cu"), no_defines);

/// The generic ops' kernel modules (`crate::ops::kernel_modules` adds the attention ones).
pub fn modules() -> [&'static CudaModule; 5] {
    [&DROPOUT, &GELU, &SOFTMAX, &CROSS_ENTROPY, &ADAMW]
}

pub fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => Err(Error::Msg(
            "NF4 CUDA kernel called with a tensor not on a CUDA device".into(),
        )),
    }
}

/// Whether `t` is contiguous from an element offset that is a multiple of `elems` (for kernels
/// that read it in 4- or 16-byte words).
pub fn start_aligned(t: &Tensor, elems: usize) -> bool {
    t.is_contiguous() && t.layout().start_offset().is_multiple_of(elems)
}

/// `t` itself where [`start_aligned`] holds, else a compact copy in a fresh buffer, which
/// starts on the allocation (candle's `copy` keeps the layout and its offset; this does not).
pub fn aligned(t: &Tensor, elems: usize) -> Result<Tensor> {
    if start_aligned(t, elems) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

pub fn wrap<T: candle_core::cuda_backend::CudaDType>(
    out: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// `x * mask / (1 - p)` with the mask of [`crate::ops::dropout::keep_scale`]; `x` contiguous from
/// its storage's start (`offset` elements in).
pub fn seeded_dropout(
    x: &CudaStorage,
    offset: usize,
    n: usize,
    key: u64,
    p: f32,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let n_i = n as i64;
    // A thread a quad of elements (dropout.cu).
    let cfg = LaunchConfig::for_num_elems(n.div_ceil(4) as u32);
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let src = x.as_cuda_slice::<$t>()?.slice(offset..offset + n);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            crate::run_kernel!(DROPOUT, dev, $name, cfg; &src, &out, &n_i, &key, &p, &scale)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match x.dtype() {
        DType::F32 => launch!("seeded_dropout_f32", f32),
        DType::BF16 => launch!("seeded_dropout_bf16", half::bf16),
        DType::F16 => launch!("seeded_dropout_f16", half::f16),
        other => Err(Error::Msg(format!("dropout on {other:?} is not supported"))),
    }
}

/// The shape and options of one [`masked_softmax`] launch (see `crate::ops::softmax`).
pub struct SoftmaxArgs {
    pub rows: usize,
    pub t: usize,
    pub per_batch: usize,
    pub s: usize,
    pub mask_batch: usize,
    pub scale: f32,
    pub has_mask: bool,
}

/// The longest row the one-warp softmax kernel holds in registers.
const SOFTMAX_WARP_MAX_T: usize = 1024;

/// Attention's softmax over rows of `t` scores or, with `dp`, the probabilities followed by the
/// gradient (`2 * rows * t` elements); each input is a storage and the element offset where the
/// contiguous tensor starts.
pub fn masked_softmax(
    scores: (&CudaStorage, usize),
    mask: (&CudaStorage, usize),
    dp: Option<(&CudaStorage, usize)>,
    a: &SoftmaxArgs,
) -> Result<CudaStorage> {
    let dev = scores.0.device.clone();
    let n = a.rows * a.t;
    let sixteen_bit = matches!(scores.0.dtype(), DType::BF16 | DType::F16);
    // The warp kernel reads 16-byte vectors: every row, and the mask's rows, must start on one.
    let aligned =
        scores.1.is_multiple_of(8) && dp.is_none_or(|d| d.1 % 8 == 0) && mask.1.is_multiple_of(4);
    let warp = sixteen_bit && a.t.is_multiple_of(8) && a.t <= SOFTMAX_WARP_MAX_T && aligned;
    // The variant whose register arrays just hold the row.
    let warp_kernel = |dtype: &str| {
        let it = match a.t.div_ceil(256) {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        format!("masked_softmax_warp{it}_{dtype}")
    };
    let cfg = if warp {
        let rows_per_block = 8;
        LaunchConfig {
            grid_dim: (a.rows.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: (32 * rows_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        let threads = (a.t.div_ceil(4).next_power_of_two()).clamp(32, 512) as u32;
        LaunchConfig {
            grid_dim: (a.rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    let (t, per_batch, s, mb, rows) = (
        a.t as i32,
        a.per_batch as i64,
        a.s as i32,
        a.mask_batch as i32,
        a.rows as i64,
    );
    let (has_mask, backward) = (a.has_mask as i32, dp.is_some() as i32);
    let out_len = if dp.is_some() { 2 * n } else { n };
    let mask_all = mask.0.as_cuda_slice::<f32>()?;
    let mask_v = mask_all.slice(mask.1..);
    macro_rules! launch {
        ($name:expr, $t:ty) => {{
            let x = scores
                .0
                .as_cuda_slice::<$t>()?
                .slice(scores.1..scores.1 + n);
            // Without a gradient the kernel never reads `dp`; the scores stand in for it.
            let g = match dp {
                Some((g, off)) => g.as_cuda_slice::<$t>()?.slice(off..off + n),
                None => scores
                    .0
                    .as_cuda_slice::<$t>()?
                    .slice(scores.1..scores.1 + n),
            };
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(out_len)? };
            crate::run_kernel!(SOFTMAX, dev, $name, cfg;
                &x, &mask_v, &g, &out, &t, &per_batch, &s, &mb, &a.scale, &has_mask, &backward,
                &rows,
            )?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match (scores.0.dtype(), warp) {
        (DType::F32, _) => launch!("masked_softmax_f32", f32),
        (DType::BF16, true) => launch!(&warp_kernel("bf16"), half::bf16),
        (DType::BF16, false) => launch!("masked_softmax_bf16", half::bf16),
        (DType::F16, true) => launch!(&warp_kernel("f16"), half::f16),
        (DType::F16, false) => launch!("masked_softmax_f16", half::f16),
        (other, _) => Err(Error::Msg(format!(
            "masked softmax on {other:?} is not supported"
        ))),
    }
}

/// `gelu_erf(x)` with candle's roundings (the `gelu_fwd` kernels) for `x` in a 16-bit type,
/// contiguous from a 16-byte boundary; `None` elsewhere, where candle's kernel runs. From
/// [`GELU_TABLE_MIN`] elements on, through the table of every code's value (`gelu_fwd_table`),
/// where the GPU lets a block hold it in shared memory.
pub fn gelu_forward(x: &Tensor) -> Result<Option<Tensor>> {
    let n = x.elem_count();
    if n == 0 || !start_aligned(x, 8) {
        return Ok(None);
    }
    let dev = cuda_device(x)?;
    let xi = CudaInput::of(x)?;
    let n_i = n as i64;
    let table = if n >= GELU_TABLE_MIN {
        gelu_table(x.device(), x.dtype())?
    } else {
        None
    };
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let xv = xi.view::<$t>(n)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            match &table {
                Some((t, blocks)) => {
                    let ti = CudaInput::of(t)?;
                    let tv = ti.view::<$t>(GELU_CODES)?;
                    let cfg = LaunchConfig {
                        grid_dim: (*blocks, 1, 1),
                        block_dim: (1024, 1, 1),
                        // Allowed on the function when the table was made.
                        shared_mem_bytes: GELU_TABLE_BYTES as u32,
                    };
                    crate::run_kernel!(GELU, dev, "gelu_fwd_table", cfg; &tv, &xv, &out, &n_i)?;
                }
                None => {
                    let cfg = LaunchConfig::for_num_elems(n.div_ceil(8) as u32);
                    crate::run_kernel!(GELU, dev, $name, cfg; &xv, &out, &n_i)?;
                }
            }
            Ok(Some(wrap(out, &dev, x.shape().clone())))
        }};
    }
    match x.dtype() {
        DType::BF16 => launch!("gelu_fwd_bf16", half::bf16),
        DType::F16 => launch!("gelu_fwd_f16", half::f16),
        _ => Ok(None),
    }
}

/// Elements from which [`gelu_forward`] goes through the table: below, loading the table
/// (128 KB a block) costs more than it saves (a decoding step's activation is ~18 K elements).
pub const GELU_TABLE_MIN: usize = 1 << 22;
const GELU_CODES: usize = 1 << 16;
const GELU_TABLE_BYTES: usize = 2 * GELU_CODES;

/// A device's GELU table for one type, and the blocks `gelu_fwd_table` runs in there.
type GeluTable = (Tensor, u32);

/// The GELU table of `dtype` on `device` (built on first use, then kept: 128 KB) and the blocks
/// `gelu_fwd_table` runs in (one a multiprocessor); `None` where the GPU cannot give a block the
/// table's shared memory (the direct kernel runs there).
fn gelu_table(device: &Device, dtype: DType) -> Result<Option<GeluTable>> {
    static TABLES: std::sync::Mutex<Vec<(Device, DType, Option<GeluTable>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut tables = TABLES
        .lock()
        .map_err(|_| Error::Msg("the GELU tables' lock is poisoned".into()))?;
    if let Some((_, _, t)) = tables
        .iter()
        .find(|(d, t, _)| d.same_device(device) && *t == dtype)
    {
        return Ok(t.clone());
    }
    let Device::Cuda(dev) = device else {
        return Ok(None);
    };
    let name = match dtype {
        DType::BF16 => "gelu_table_bf16",
        DType::F16 => "gelu_table_f16",
        _ => return Ok(None),
    };
    use candle_core::cuda_backend::cudarc::driver::sys;
    let func = dev.get_or_load_custom_func("gelu_fwd_table", GELU.name, GELU.ptx()?)?;
    let allowed = func
        .set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            GELU_TABLE_BYTES as i32,
        )
        .is_ok();
    let entry = if allowed {
        let sms = multiprocessors(dev)?;
        let cfg = LaunchConfig::for_num_elems(GELU_CODES as u32);
        macro_rules! build {
            ($t:ty) => {{
                // SAFETY: every element is written by the kernel below.
                let table = unsafe { dev.alloc::<$t>(GELU_CODES)? };
                crate::run_kernel!(GELU, dev, name, cfg; &table)?;
                wrap(table, dev, GELU_CODES)
            }};
        }
        // Entry i is GELU of the value whose bits are i, in the type of x.
        let t = match dtype {
            DType::BF16 => build!(half::bf16),
            _ => build!(half::f16),
        };
        Some((t, sms))
    } else {
        None
    };
    tables.push((device.clone(), dtype, entry.clone()));
    Ok(entry)
}

/// `g * gelu_erf'(x)` (see `crate::ops::gelu`); each input is a storage and the element offset where
/// its contiguous `n` elements start.
pub fn gelu_backward(
    x: (&CudaStorage, usize),
    g: (&CudaStorage, usize),
    n: usize,
) -> Result<CudaStorage> {
    let dev = x.0.device.clone();
    let n_i = n as i64;
    let cfg = LaunchConfig::for_num_elems(n as u32);
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let xv = x.0.as_cuda_slice::<$t>()?.slice(x.1..x.1 + n);
            let gv = g.0.as_cuda_slice::<$t>()?.slice(g.1..g.1 + n);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            crate::run_kernel!(GELU, dev, $name, cfg; &xv, &gv, &out, &n_i)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }};
    }
    match x.0.dtype() {
        DType::F32 => launch!("gelu_bwd_f32", f32),
        DType::BF16 => launch!("gelu_bwd_bf16", half::bf16),
        DType::F16 => launch!("gelu_bwd_f16", half::f16),
        other => Err(Error::Msg(format!(
            "gelu backward on {other:?} is not supported"
        ))),
    }
}

/// A contiguous tensor's CUDA storage, read-locked while a launch uses it.
pub struct CudaInput<'a> {
    storage: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CudaInput<'a> {
    pub fn of(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(Error::Msg("CUDA kernel: input is not contiguous".into()));
        };
        Ok(CudaInput {
            storage,
            start,
            len: end - start,
        })
    }

    /// The tensor's elements as a kernel argument; there must be `n` of them.
    pub fn view<T: candle_core::cuda_backend::CudaDType>(
        &self,
        n: usize,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>> {
        if n != self.len {
            return Err(Error::Msg(format!(
                "CUDA kernel: input has {} elements, expected {n}",
                self.len
            )));
        }
        match &*self.storage {
            Storage::Cuda(c) => Ok(c.as_cuda_slice::<T>()?.slice(self.start..self.start + n)),
            _ => Err(Error::Msg("CUDA kernel: input is not on the GPU".into())),
        }
    }
}

/// Per row of `logits` (`[n, v]`, contiguous) and its `labels` (`[n]` u32): `(lse, nll)`, each
/// `[n]` f32 (see the `CE_FWD` kernel).
pub fn cross_entropy_forward(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(logits)?;
    let (n, v) = logits.dims2()?;
    let ls = CudaInput::of(logits)?;
    let ys = CudaInput::of(labels)?;
    let y = ys.view::<u32>(n)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let v_i = v as i32;
    // SAFETY: every element is written by the kernel below.
    let lse = unsafe { dev.alloc::<f32>(n)? };
    let nll = unsafe { dev.alloc::<f32>(n)? };
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = ls.view::<$t>(n * v)?;
            crate::run_kernel!(CROSS_ENTROPY, dev, $name, cfg; &x, &y, &lse, &nll, &v_i)?;
        }};
    }
    match logits.dtype() {
        DType::F32 => launch!("ce_fwd_f32", f32),
        DType::BF16 => launch!("ce_fwd_bf16", half::bf16),
        DType::F16 => launch!("ce_fwd_f16", half::f16),
        other => {
            return Err(Error::Msg(format!(
                "cross-entropy on {other:?} is not supported"
            )));
        }
    }
    Ok((wrap(lse, &dev, n), wrap(nll, &dev, n)))
}

/// The gradient of the summed cross-entropy with respect to `logits`, in their dtype, given the
/// forward's `lse` and `grad` (a one-element f32 tensor: the gradient of the sum).
pub fn cross_entropy_backward(
    logits: &Tensor,
    labels: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let dev = cuda_device(logits)?;
    let (n, v) = logits.dims2()?;
    let ls = CudaInput::of(logits)?;
    let ys = CudaInput::of(labels)?;
    let es = CudaInput::of(lse)?;
    let gs = CudaInput::of(grad)?;
    let y = ys.view::<u32>(n)?;
    let e = es.view::<f32>(n)?;
    let g = gs.view::<f32>(1)?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let v_i = v as i32;
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = ls.view::<$t>(n * v)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n * v)? };
            crate::run_kernel!(CROSS_ENTROPY, dev, $name, cfg; &x, &y, &e, &g, &out, &v_i)?;
            Ok(wrap(out, &dev, (n, v)))
        }};
    }
    match logits.dtype() {
        DType::F32 => launch!("ce_bwd_f32", f32),
        DType::BF16 => launch!("ce_bwd_bf16", half::bf16),
        DType::F16 => launch!("ce_bwd_f16", half::f16),
        other => Err(Error::Msg(format!(
            "cross-entropy on {other:?} is not supported"
        ))),
    }
}

/// The scalars of one AdamW update, as the trainer's op-by-op version rounds them to f32.
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// `1 - lr * weight_decay`, or `None` without weight decay.
    pub decay: Option<f64>,
    pub bc2_sqrt: f64,
    /// `lr / bc1`.
    pub step: f64,
    /// The factor the gradient is scaled by first (`clip_grad_norm_`'s), or `None`.
    pub grad_scale: Option<f64>,
}

/// The AdamW kernels' scalar arguments, in the order of `ADAMW_SCALARS` (adamw.cu).
type AdamWArgs = (f32, f32, f32, f32, f32, i32, f32, f32, f32, f32, i32);

impl AdamWScalars {
    /// The scalars as the kernels take them, rounded to f32 as the op-by-op update rounds them.
    fn kernel_args(&self) -> AdamWArgs {
        let f = |x: f64| x as f32;
        (
            f(self.beta1),
            f(1.0 - self.beta1),
            f(self.beta2),
            f(1.0 - self.beta2),
            f(self.decay.unwrap_or(1.0)),
            self.decay.is_some() as i32,
            f(1.0 / self.bc2_sqrt),
            f(self.eps),
            f(self.step),
            f(self.grad_scale.unwrap_or(1.0)),
            self.grad_scale.is_some() as i32,
        )
    }
}

/// `(p, m, v)` after one AdamW update of the f32 tensors `p`, `m`, `v` with gradient `g` (see
/// the `adamw_f32` kernel): one launch instead of a dozen per weight.
pub fn adamw_f32(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &AdamWScalars,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(p)?;
    let n = p.elem_count();
    for t in [g, m, v] {
        if t.elem_count() != n || t.dtype() != DType::F32 || p.dtype() != DType::F32 {
            return Err(Error::Msg(format!(
                "adamw: tensors of {:?} {:?} and {:?} {:?}",
                p.dims(),
                p.dtype(),
                t.dims(),
                t.dtype()
            )));
        }
    }
    let ps = CudaInput::of(p)?;
    let gs = CudaInput::of(g)?;
    let ms = CudaInput::of(m)?;
    let vs = CudaInput::of(v)?;
    let pv = ps.view::<f32>(n)?;
    let gv = gs.view::<f32>(n)?;
    let mv = ms.view::<f32>(n)?;
    let vv = vs.view::<f32>(n)?;
    // SAFETY: every element is written by the kernel below.
    let (po, mo, vo) = unsafe {
        (
            dev.alloc::<f32>(n)?,
            dev.alloc::<f32>(n)?,
            dev.alloc::<f32>(n)?,
        )
    };
    let n_i = n as i64;
    let (b1, omb1, b2, omb2, decay, has_decay, inv_bc2, eps, step, gscale, has_scale) =
        c.kernel_args();
    crate::run_kernel!(ADAMW, dev, "adamw_f32", LaunchConfig::for_num_elems(n as u32);
        &pv, &gv, &mv, &vv, &po, &mo, &vo, &n_i, &b1, &omb1, &b2, &omb2, &decay, &has_decay,
        &inv_bc2, &eps, &step, &gscale, &has_scale,
    )?;
    let shape = p.shape().clone();
    Ok((
        wrap(po, &dev, shape.clone()),
        wrap(mo, &dev, shape.clone()),
        wrap(vo, &dev, shape),
    ))
}

/// Elements one block of the multi-tensor kernels takes (`MT_CHUNK` in `adamw.cu`).
const MT_CHUNK: usize = 16384;
/// A chunk's first element is kept in the low 40 bits of its table entry, its tensor above.
const MT_START_BITS: u32 = 40;

/// A step's weights, gradients and AdamW moments (all f32, contiguous, on one GPU) described
/// once for the multi-tensor kernels of `adamw.cu`: every gradient's norm then takes two
/// launches and every weight's update one, where the per-tensor path launched ~5 kernels a
/// weight. [`Self::adamw`] overwrites the weights and moments in place, as `Var::set` would.
pub struct MultiTensorStep {
    dev: CudaDevice,
    table: CudaSlice<u64>,
    tensors: usize,
    chunks: usize,
    /// The tensors the table's addresses point into, kept alive while the table is.
    _held: Vec<Tensor>,
}

impl MultiTensorStep {
    /// `params[i]`, `grads[i]`, `m[i]` and `v[i]` of one element count each.
    pub fn new(params: &[Tensor], grads: &[Tensor], m: &[Tensor], v: &[Tensor]) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let tensors = params.len();
        if [grads.len(), m.len(), v.len()] != [tensors; 3] || tensors == 0 {
            return Err(Error::Msg(format!(
                "multi-tensor AdamW: {tensors} weights, {} gradients, {} and {} moments",
                grads.len(),
                m.len(),
                v.len()
            )));
        }
        let dev = cuda_device(&params[0])?;
        let stream = dev.cuda_stream();
        let mut addresses = vec![0u64; 5 * tensors];
        let mut chunk_entries = Vec::new();
        let mut first = Vec::with_capacity(tensors + 1);
        for (i, group) in [params, grads, m, v].iter().enumerate() {
            for (t, x) in group.iter().enumerate() {
                let n = params[t].elem_count();
                if x.dtype() != DType::F32
                    || x.elem_count() != n
                    || !x.device().same_device(params[0].device())
                {
                    return Err(Error::Msg(format!(
                        "multi-tensor AdamW: tensor {t} of group {i} is {:?} {:?} on {:?}, \
                         expected {n} f32 elements on the weights' GPU",
                        x.dims(),
                        x.dtype(),
                        x.device().location()
                    )));
                }
                let input = CudaInput::of(x)?;
                let view = input.view::<f32>(n)?;
                addresses[i * tensors + t] = view.device_ptr(&stream).0;
            }
        }
        for (t, x) in params.iter().enumerate() {
            let n = x.elem_count();
            if n >= 1usize << MT_START_BITS || t >= 1 << (64 - MT_START_BITS) {
                return Err(Error::Msg(format!(
                    "multi-tensor AdamW: tensor {t} has {n} elements"
                )));
            }
            addresses[4 * tensors + t] = n as u64;
            first.push(chunk_entries.len() as u64);
            for start in (0..n).step_by(MT_CHUNK) {
                chunk_entries.push(((t as u64) << MT_START_BITS) | start as u64);
            }
        }
        first.push(chunk_entries.len() as u64);
        let chunks = chunk_entries.len();
        let mut all = addresses;
        all.extend(chunk_entries);
        all.extend(first);
        let table = dev.clone_htod(&all)?;
        let _held = [params, grads, m, v].concat();
        Ok(MultiTensorStep {
            dev,
            table,
            tensors,
            chunks,
            _held,
        })
    }

    /// Each gradient's L2 norm, computed in a fixed order, read back to the host.
    pub fn grad_norms(&self) -> Result<Vec<f32>> {
        let dev = &self.dev;
        if self.chunks == 0 {
            // Every tensor is empty: no block to launch, and every norm is zero.
            return Ok(vec![0.0; self.tensors]);
        }
        // SAFETY: every element is written by the kernels below.
        let (partial, norms) = unsafe {
            (
                dev.alloc::<f32>(self.chunks)?,
                dev.alloc::<f32>(self.tensors)?,
            )
        };
        let (tensors, chunks) = (self.tensors as i32, self.chunks as i32);
        let cfg = LaunchConfig {
            grid_dim: (self.chunks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        crate::run_kernel!(ADAMW, dev, "mt_sq_sums_f32", cfg; &self.table, &tensors, &partial)?;
        let cfg = LaunchConfig {
            grid_dim: (self.tensors.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        crate::run_kernel!(ADAMW, dev, "mt_norms_f32", cfg;
            &partial, &self.table, &tensors, &chunks, &norms)?;
        dev.clone_dtoh(&norms)
    }

    /// One AdamW update of every weight (see [`adamw_f32`]), in place.
    pub fn adamw(&self, c: &AdamWScalars) -> Result<()> {
        let dev = &self.dev;
        if self.chunks == 0 {
            return Ok(());
        }
        let (b1, omb1, b2, omb2, decay, has_decay, inv_bc2, eps, step, gscale, has_scale) =
            c.kernel_args();
        let tensors = self.tensors as i32;
        let cfg = LaunchConfig {
            grid_dim: (self.chunks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // The kernel writes the weights and moments through the table's addresses, which
        // `_held` keeps alive; the stream orders it after every earlier reader and writer.
        crate::run_kernel!(ADAMW, dev, "mt_adamw_f32", cfg;
            &self.table, &tensors, &b1, &omb1, &b2, &omb2, &decay, &has_decay, &inv_bc2, &eps,
            &step, &gscale, &has_scale,
        )?;
        Ok(())
    }
}
