//! Prints the text NVRTC compiles for one of the crate's CUDA kernel modules (the prelude, the
//! host's defines and the module's `.cu` sources), or, without an argument, the modules' names:
//! `scripts/gpu/sass.sh` compiles it to machine code to count a kernel's instructions.
//!
//! `cargo run -p adapterlab-model --features cuda --example kernel_source -- [MODULE]`

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let modules = adapterlab_model::engine::device::kernel_modules();
    let Some(wanted) = std::env::args().nth(1) else {
        for m in &modules {
            println!("{}", m.name);
        }
        return Ok(());
    };
    match modules.iter().find(|m| m.name == wanted) {
        Some(m) => {
            print!("{}", m.full_source());
            Ok(())
        }
        None => {
            let names: Vec<&str> = modules.iter().map(|m| m.name).collect();
            bail!(
                "no kernel module {wanted:?}; the modules are {}",
                names.join(", ")
            )
        }
    }
}
