//! NVRTC compiles every kernel module to PTX and CUBIN for sm_80 and sm_90 (no GPU needed).
//! Without libnvrtc these tests log why they skipped (`crate::skips`: a failure under `CI=true`),
//! and fail with `TPRUN_REQUIRE_NVRTC=1` (.ci/run sets it, with the PyPI wheel's folder in
//! `TPRUN_CUDA_LIB_PATH`: .ci/nvrtc-venv).

use super::cubin;
use super::nvrtc::{self, Target};
use super::sources::MODULES;

const ARCHES: [u32; 2] = [80, 90];

/// NVRTC, or `None` after logging why the test is skipped.
fn nvrtc_or_skip() -> Option<&'static nvrtc::Nvrtc> {
    match nvrtc::nvrtc() {
        Ok(n) => {
            println!(
                "NVRTC {}.{} from {:?}",
                n.version.0,
                n.version.1,
                super::libs::loaded()
            );
            Some(n)
        }
        Err(why) if std::env::var("TPRUN_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("TPRUN_REQUIRE_NVRTC=1 but NVRTC is unavailable: {why}")
        }
        Err(why) => {
            crate::skips::skip("kernels nvrtc_*", &format!("NVRTC is unavailable: {why}"));
            None
        }
    }
}

#[test]
fn nvrtc_every_module_compiles_to_ptx_for_sm80_and_sm90() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    for m in MODULES {
        for cc in ARCHES {
            let ptx = nvrtc::compile(&m, Target::Ptx(cc)).unwrap_or_else(|e| panic!("{e}"));
            let text = String::from_utf8_lossy(&ptx);
            assert!(
                text.contains(&format!(".target sm_{cc}")),
                "{}: {cc}",
                m.name
            );
            for e in m.entries {
                assert!(
                    text.contains(&format!(".entry {e}(")),
                    "{}: no {e} in PTX",
                    m.name
                );
            }
        }
    }
}

#[test]
fn nvrtc_every_kernel_compiles_to_cubin_for_sm80_and_sm90_with_its_resources() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    for cc in ARCHES {
        println!("sm_{cc}: kernel, registers, static shared bytes, stack frame bytes");
        for m in MODULES {
            let image = nvrtc::compile(&m, Target::Cubin(cc)).unwrap_or_else(|e| panic!("{e}"));
            let usage = cubin::usage(&image).expect("NVRTC's CUBIN is an ELF64 with symbols");
            for e in m.entries {
                let u = usage
                    .get(*e)
                    .unwrap_or_else(|| panic!("{}: no {e} in CUBIN", m.name));
                assert!(u.registers > 0 && u.registers <= 255, "{e}: {u:?}");
                if e.starts_with("attention_") {
                    let most = super::sources::ATTENTION_STATIC_SHARED_MAX;
                    assert!(u.shared_bytes as u32 <= most, "{e}: {u:?}");
                }
                println!(
                    "  {}/{e}: {} regs, {} B shared, {} B frame",
                    m.name, u.registers, u.shared_bytes, u.frame_bytes
                );
            }
            assert_eq!(
                usage.len(),
                m.entries.len(),
                "{}: {:?}",
                m.name,
                usage.keys()
            );
        }
    }
}

#[test]
fn nvrtc_errors_carry_the_compiler_log() {
    let Some(n) = nvrtc_or_skip() else { return };
    let err = n
        .compile_source(
            "broken",
            "extern \"C\" __global__ void k() { undeclared(); }",
            Target::Ptx(80),
        )
        .unwrap_err();
    assert!(err.contains("undeclared"), "{err}");
}

#[test]
fn nvrtc_compiles_each_module_once_per_process() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    let a = nvrtc::compile(&MODULES[0], Target::Ptx(90)).unwrap();
    let b = nvrtc::compile(&MODULES[0], Target::Ptx(90)).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}
