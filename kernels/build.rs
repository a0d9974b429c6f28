//! Feature `cuda-emulator` only: builds tprun's CUDA emulator (src/cuda/emu), one host shared
//! library standing in for libcuda, libnvrtc and libcublas, with the host C++ compiler the `cc`
//! crate finds. kernels::cuda::emulator embeds it.

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/emu");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-emulator")]
    build_emulator();
}

#[cfg(feature = "cuda-emulator")]
fn build_emulator() {
    use std::path::PathBuf;
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let emu = PathBuf::from("src/cuda/emu");
    let header = std::fs::read_to_string(emu.join("device.h")).expect("src/cuda/emu/device.h");
    let text = format!(
        "extern \"C\" __attribute__((visibility(\"default\"))) char tprun_emu_device_h[] = \
         R\"TPRUNEMU({header})TPRUNEMU\";\n"
    );
    std::fs::write(out.join("device_h.cpp"), text).expect("writing device_h.cpp");
    // Every driver symbol cudarc's bindings resolve when they open libcuda: a weak stub each
    // (CUDA_ERROR_NOT_SUPPORTED, named on stderr once), overridden by emu.cpp's definitions.
    let names = std::fs::read_to_string(emu.join("driver_symbols.txt")).expect("symbol list");
    let mut stubs = String::from(
        "#include <cstdio>\n#include <mutex>\n#include <set>\n#include <string>\n\
         static int stub(const char* name) {\n  static std::mutex& m = *new std::mutex; static auto& said = *new std::set<std::string>;\n\
         std::lock_guard<std::mutex> l(m);\n  if (said.insert(name).second)\n\
         fprintf(stderr, \"tprun cuda emulator: %s is not emulated\\n\", name);\n  return 801;\n}\n",
    );
    for n in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        stubs += &format!(
            "extern \"C\" __attribute__((weak, visibility(\"default\"))) int {n}() {{ return stub(\"{n}\"); }}\n"
        );
    }
    std::fs::write(out.join("stubs.cpp"), stubs).expect("writing stubs.cpp");
    let lib = out.join("libtprun_cuda_emu.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args([
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
    ])
    .arg("-Wl,-soname,libcuda.so")
    .arg(emu.join("emu.cpp"))
    .arg(out.join("stubs.cpp"))
    .arg(out.join("device_h.cpp"))
    .arg("-o")
    .arg(&lib)
    .args(["-ldl", "-lpthread", "-lrt"]);
    let status = cmd
        .status()
        .expect("running the C++ compiler for the CUDA emulator");
    assert!(
        status.success(),
        "building the CUDA emulator failed: {cmd:?}"
    );
    println!("cargo:rustc-env=TPRUN_CUDA_EMU_LIB={}", lib.display());
}
