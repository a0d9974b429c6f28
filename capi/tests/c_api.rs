//! The C API from C and C++: programs under capi/tests/c and examples/c compiled with the system
//! compilers against include/tprun.h and this build's libtprun.so, run under the tprun binary of
//! the same target directory (`cargo build` makes it; `TPRUN_TEST_BIN` names another).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// target/<profile>, where `cargo build` put the tprun binary.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// target/<profile>/deps, where this test run's build put libtprun.so and libtprun.a (cargo
/// copies them up to target/<profile> only for `cargo build`).
fn lib_dir() -> PathBuf {
    target_dir().join("deps")
}

fn tprun_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("TPRUN_TEST_BIN") {
        return b.into();
    }
    let b = target_dir().join("tprun");
    assert!(
        b.exists(),
        "{} does not exist: run `cargo build` (the tprun binary) before these tests, or set TPRUN_TEST_BIN",
        b.display()
    );
    b
}

/// A scratch directory for this test's binaries, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("tprun-capi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Compiles `src` (C99 or, for .cpp, C++11) with every warning an error, linked to libtprun.
fn compile(dir: &Scratch, src: &Path) -> PathBuf {
    let cpp = src.extension().is_some_and(|e| e == "cpp");
    let out = dir.0.join(src.file_stem().unwrap());
    let lib = lib_dir();
    let mut cmd = Command::new(if cpp { "c++" } else { "cc" });
    cmd.arg(if cpp { "-std=c++11" } else { "-std=c99" })
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-O1"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(src)
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .arg("-ltprun")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm");
    if !cpp {
        // clock_gettime and raise under -std=c99.
        cmd.arg("-D_POSIX_C_SOURCE=200809L");
    }
    let o = cmd.output().expect("the system C/C++ compiler (cc, c++)");
    assert!(
        o.status.success(),
        "compiling {}: {}",
        src.display(),
        show(&o)
    );
    out
}

/// `tprun -n N -- prog args`, with output captured.
fn tprun(n: usize, prog: &Path, args: &[&str]) -> Output {
    tprun_with(n, prog, args, &[])
}

fn tprun_with(n: usize, prog: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    Command::new(tprun_bin())
        .args([
            "-n",
            &n.to_string(),
            "--no-prefix",
            "--timeout",
            "120",
            "--",
        ])
        .arg(prog)
        .args(args)
        // cargo's LD_LIBRARY_PATH names target/<profile>, whose libtprun.so may be an older
        // `cargo build`'s: the programs find this run's through their run path.
        .env_remove("LD_LIBRARY_PATH")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_call_and_dtype_matches_the_scalar_reference_on_3_ranks() {
    let dir = Scratch::new("api");
    let prog = compile(&dir, &root().join("capi/tests/c/api_test.c"));
    let o = tprun(3, &prog, &[]);
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    for r in 0..3 {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("rank {r}: ")) && l.ends_with("checks ok"))
            .unwrap_or_else(|| panic!("rank {r} did not finish: {}", show(&o)));
        let n: usize = line
            .split_whitespace()
            .rev()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        // 10 dtypes x (up to 16 all-reduces + the other calls) checks per rank at least.
        assert!(n > 300, "only {n} checks: {line}");
    }
}

#[test]
fn a_cpp_program_compiles_with_wall_werror_and_runs() {
    let dir = Scratch::new("cpp");
    let prog = compile(&dir, &root().join("capi/tests/c/header_check.cpp"));
    let o = tprun(2, &prog, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(stdout(&o).matches("C++ ok").count(), 2, "{}", show(&o));
}

#[test]
fn bad_arguments_are_refused_with_a_message_and_never_crash() {
    let dir = Scratch::new("bad");
    let prog = compile(&dir, &root().join("capi/tests/c/bad_args.c"));
    let o = tprun(2, &prog, &[]);
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("refusals ok").count(), 2, "{}", show(&o));
    // Rank 0 prints every message it got; each names the call.
    let refused: Vec<&str> = out.lines().filter(|l| l.contains("refused: ")).collect();
    assert!(refused.len() > 40, "{}", show(&o));
    for l in refused {
        assert!(l.contains("tprun"), "a message that names no call: {l}");
    }
}

#[test]
fn a_killed_peer_returns_a_remote_error() {
    let dir = Scratch::new("kill");
    let prog = compile(&dir, &root().join("capi/tests/c/killed_peer.c"));
    let key = format!("capi-kill-{}", std::process::id());
    let spawn = |rank: &str| {
        Command::new(&prog)
            .args([&key, rank])
            .env("TPRUN_COMM_TIMEOUT_S", "60")
            .env_remove("LD_LIBRARY_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (r0, r1) = (spawn("0"), spawn("1"));
    let o1 = r1.wait_with_output().unwrap();
    let o0 = r0.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o1.status.signal(), Some(9), "rank 1: {}", show(&o1));
    assert!(o0.status.success(), "rank 0: {}", show(&o0));
    let out = stdout(&o0);
    assert!(out.contains("rank 0: remote error"), "{out}");
    assert!(out.contains("rank 0 then: remote error"), "{out}");
    assert!(out.contains("tprunAllReduce on rank 0 of 2"), "{out}");
}

#[test]
fn the_mpi_allreduce_example_port_runs() {
    let dir = Scratch::new("example");
    let prog = compile(&dir, &root().join("examples/c/allreduce.c"));
    let o = tprun(3, &prog, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stdout(&o).contains("sum of 1..1000000 = 500000500000, max = 1000000, on 3 ranks"),
        "{}",
        show(&o)
    );
}

#[test]
fn the_c_perf_sweep_prints_nccl_tests_rows() {
    let dir = Scratch::new("perf");
    let prog = compile(&dir, &root().join("examples/c/allreduce_perf.c"));
    // Tiny sizes and iterations: this checks the program, it measures nothing.
    let o = tprun(2, &prog, &["1024", "8192", "2", "1"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = stdout(&o);
    assert!(out.contains("algbw") && out.contains("#wrong"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    let sizes: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    assert_eq!(sizes, ["1024", "2048", "4096", "8192"], "{out}");
    for r in &rows {
        assert_eq!(r.len(), 13, "{r:?}");
        assert_eq!((r[8], r[12]), ("0", "0"), "wrong elements: {r:?}");
        assert!(r[5].parse::<f64>().unwrap() > 0.0, "{r:?}");
        assert!(r[9].parse::<f64>().unwrap() > 0.0, "{r:?}");
    }
}

/// install.sh's copy step (the build is this test run's), then a C program built with
/// `pkg-config --cflags --libs tprun` and a CMake project with `find_package(tprun)`.
#[test]
fn pkg_config_and_cmake_find_the_installed_library() {
    let dir = Scratch::new("install");
    let prefix = dir.0.join("prefix");
    let o = Command::new("sh")
        .arg(root().join("capi/install.sh"))
        .args(["--no-build", "--from"])
        .arg(lib_dir())
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "install.sh: {}", show(&o));
    for f in [
        "include/tprun.h",
        "lib/libtprun.so",
        "lib/libtprun.a",
        "lib/pkgconfig/tprun.pc",
        "lib/cmake/tprun/tprunConfig.cmake",
        "lib/cmake/tprun/tprunConfigVersion.cmake",
    ] {
        assert!(prefix.join(f).exists(), "{f} not installed");
    }
    let example = root().join("examples/c/allreduce.c");

    let pc = Command::new("pkg-config")
        .args(["--cflags", "--libs", "tprun"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .expect("pkg-config");
    assert!(pc.status.success(), "{}", show(&pc));
    let flags = String::from_utf8(pc.stdout).unwrap();
    assert!(flags.contains("-ltprun"), "{flags}");
    let exe = dir.0.join("by-pkg-config");
    let o = Command::new("cc")
        .arg(&example)
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace())
        .output()
        .unwrap();
    assert!(o.status.success(), "cc with pkg-config flags: {}", show(&o));
    // pkg-config adds no run path: the loader finds the library through LD_LIBRARY_PATH.
    let libdir = prefix.join("lib");
    let o = tprun_with(2, &exe, &[], &[("LD_LIBRARY_PATH", &libdir)]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains("on 2 ranks"), "{}", show(&o));

    let proj = dir.0.join("cmake-project");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(
        proj.join("CMakeLists.txt"),
        format!(
            "cmake_minimum_required(VERSION 3.10)\nproject(uses_tprun C)\nfind_package(tprun 0.1 REQUIRED)\nadd_executable(allreduce {})\ntarget_link_libraries(allreduce PRIVATE tprun::tprun)\nadd_executable(allreduce_static {})\ntarget_link_libraries(allreduce_static PRIVATE tprun::tprun_static)\n",
            example.display(),
            example.display()
        ),
    )
    .unwrap();
    let build = proj.join("build");
    let o = Command::new("cmake")
        .arg("-S")
        .arg(&proj)
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
        .output()
        .expect("cmake (apt-get install cmake)");
    assert!(o.status.success(), "cmake configure: {}", show(&o));
    let o = Command::new("cmake")
        .arg("--build")
        .arg(&build)
        .output()
        .unwrap();
    assert!(o.status.success(), "cmake build: {}", show(&o));
    for exe in ["allreduce", "allreduce_static"] {
        let o = tprun(2, &build.join(exe), &[]);
        assert!(o.status.success(), "{exe}: {}", show(&o));
        assert!(stdout(&o).contains("on 2 ranks"), "{exe}: {}", show(&o));
    }
}
