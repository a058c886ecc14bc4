//! Programmatic dependent launch (sm_90) for decoding's chain of kernels: a kernel launched
//! with it may be scheduled while the kernel before it on the stream still runs; it executes
//! `griddepcontrol.wait` (`GRID_WAIT()` in pdl.cu) before it reads anything an earlier kernel
//! wrote or writes anything, so what it does before that is the launch itself and reads of
//! constant inputs. A kernel's blocks may also let the next one be scheduled as they start
//! (`GRID_LAUNCH_DEPENDENTS()`), instead of as they exit. Decoding one token runs ~7 kernels a
//! layer one after another, each short; without PDL each waits out its own launch after the
//! one before finishes.
//!
//! `ADAPTERLAB_DECODE_PDL` picks how ([`Pdl`]); each kernel of the chain has its source compiled
//! three ways ([`PdlModules`]), the host launching from the one the switch picks. Layer norm's
//! forward kernel launches so wherever it runs (a training step's too): the launch changes when
//! it may start, never what it computes.

use candle_core::{Device, Error, Result};

use crate::ops::kernels::CudaModule;
use crate::ops::switch::Switch;

/// How decoding's kernels launch (`ADAPTERLAB_DECODE_PDL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdl {
    /// As every other kernel.
    Off,
    /// The NF4 products, layer norm, `rope_append` and decoding attention with PDL where the card
    /// has sm_90: each may be scheduled while the one before finishes (a product loads its
    /// tables and first codes meanwhile).
    On,
    /// The same, and each kernel's blocks let the next be scheduled as they start.
    Early,
    /// [`Pdl::Early`] for the NF4 products alone, the chain's other kernels launched plainly
    /// (decoding before 2026-12-08).
    Products,
}

/// How decoding launches on an sm_90 card where `ADAPTERLAB_DECODE_PDL` is unset. On an H100
/// (BENCHMARKS.md) batch-1 decoding ran 262.8 tokens/s with the whole chain `early` against
/// 240.6 with `products` (2026-12-08, one call); before, 226.6 with the products `early`
/// against 214.3 `on` (2026-12-07, the pairs form; with the swapped form 211.2 against 207.9 in
/// another), and `on` 4.5% ahead of `off`. A dependent that starts early still waits
/// (`griddepcontrol.wait`) for the kernel before it to finish before it reads what it wrote.
pub const DEFAULT: Pdl = Pdl::Early;

/// `ADAPTERLAB_DECODE_PDL` ([`Pdl`]; see [`in_force`]).
pub static SWITCH: Switch<Pdl> = Switch::new(
    "ADAPTERLAB_DECODE_PDL",
    &[
        ("on", Pdl::On),
        ("early", Pdl::Early),
        ("products", Pdl::Products),
        ("off", Pdl::Off),
    ],
);

/// How decoding launches on `device`: as `ADAPTERLAB_DECODE_PDL` says, which may not ask for
/// PDL on a card without sm_90 (an error, not a quiet plain launch); unset, [`DEFAULT`] where
/// the card has sm_90 and plain launches elsewhere.
pub fn in_force(device: &Device) -> Result<Pdl> {
    let sm90 = crate::ops::kernels::sm90_or_later(device)?;
    match SWITCH.get()? {
        Some(Pdl::Off) => Ok(Pdl::Off),
        Some(_) if !sm90 => Err(Error::Msg(
            "ADAPTERLAB_DECODE_PDL asks for programmatic dependent launch, which needs sm_90 or later"
                .into(),
        )),
        Some(mode) => Ok(mode),
        None if sm90 => Ok(DEFAULT),
        None => Ok(Pdl::Off),
    }
}

/// How decoding launches on `device`, as `ADAPTERLAB_DECODE_PDL` names it, for reports.
pub fn setting(device: &Device) -> Result<&'static str> {
    let mode = in_force(device)?;
    Ok(SWITCH.in_force(mode)?.1)
}

/// pdl.cu's defines for a module launched with PDL.
pub fn on_defines() -> String {
    "#define ADAPTERLAB_PDL 1\n".into()
}

/// pdl.cu's defines for a module launched with PDL whose blocks let the next kernel be
/// scheduled as they start.
pub fn early_defines() -> String {
    "#define ADAPTERLAB_PDL 1\n#define ADAPTERLAB_PDL_EARLY 1\n".into()
}

/// One kernel source of decoding's chain compiled three ways: `plain` (no PDL: `GRID_WAIT()` and
/// `GRID_LAUNCH_DEPENDENTS()` are empty), `on` and `early` (compute_90).
pub struct PdlModules {
    pub plain: &'static CudaModule,
    pub on: &'static CudaModule,
    pub early: &'static CudaModule,
}

impl PdlModules {
    /// The plain module and, where a chain kernel (not an NF4 product) launches with PDL on
    /// `device`, the module it launches from: the two arguments of `run_kernel_maybe_pdl!`.
    pub fn pick(
        &self,
        device: &Device,
    ) -> Result<(&'static CudaModule, Option<&'static CudaModule>)> {
        Ok(match in_force(device)? {
            Pdl::Off | Pdl::Products => (self.plain, None),
            Pdl::On => (self.plain, Some(self.on)),
            Pdl::Early => (self.plain, Some(self.early)),
        })
    }

    /// The three modules, for [`crate::ops::kernel_modules`].
    pub fn all(&self) -> [&'static CudaModule; 3] {
        [self.plain, self.on, self.early]
    }
}

/// A chain kernel's module `$plain` (module `$name`, from `$source` without defines, for
/// `$arch` where given) and the same compiled twice more for PDL (compute_90), `$on` and
/// `$early`, named `$name` with `_pdl` and `_pdl_early`; the three as [`PdlModules`] `$all`.
#[macro_export]
macro_rules! pdl_modules {
    ($all:ident, $plain:ident, $on:ident, $early:ident, $name:literal, $source:expr
        $(, $arch:literal)?) => {
        pub(crate) static $plain: $crate::ops::kernels::CudaModule =
            $crate::ops::kernels::CudaModule::new($name, $source, $crate::ops::kernels::no_defines)
                $(.for_arch($arch))?;
        pub(crate) static $on: $crate::ops::kernels::CudaModule =
            $crate::ops::kernels::CudaModule::new(
                concat!($name, "_pdl"),
                $source,
                $crate::ops::pdl::on_defines,
            )
            .for_arch("compute_90");
        pub(crate) static $early: $crate::ops::kernels::CudaModule =
            $crate::ops::kernels::CudaModule::new(
                concat!($name, "_pdl_early"),
                $source,
                $crate::ops::pdl::early_defines,
            )
            .for_arch("compute_90");
        pub(crate) static $all: $crate::ops::pdl::PdlModules = $crate::ops::pdl::PdlModules {
            plain: &$plain,
            on: &$on,
            early: &$early,
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_is_in_the_table() {
        SWITCH.names_match().unwrap();
    }
}
