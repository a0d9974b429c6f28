//! The user guide's command reference (docs/commands.md) is each program's `--help`, verbatim:
//! this test fails when they drift apart. `TPRUN_BLESS=1 cargo test --test readme_help` rewrites
//! the page's blocks from the binary.

use std::path::Path;
use std::process::Command;

/// `tprun` itself, then every subcommand, in the page's order.
const PROGRAMS: &[&str] = &[
    "", "generate", "logits", "bench", "perf", "analyze", "compare", "rank",
];

fn help(program: &str) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tprun"));
    if !program.is_empty() {
        c.arg(program);
    }
    let out = c.arg("--help").env("COLUMNS", "100").output().unwrap();
    assert!(out.status.success(), "{program} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The page's block for `program`: the text between its marker line and the closing fence.
fn block_range(readme: &str, program: &str) -> Option<(usize, usize)> {
    let marker = format!("<!-- help: tprun {program} -->\n```text\n").replace("tprun  ", "tprun ");
    let start = readme.find(&marker)? + marker.len();
    let end = start + readme[start..].find("```\n")?;
    Some((start, end))
}

#[test]
fn readme_shows_every_programs_help() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/commands.md");
    let mut readme = std::fs::read_to_string(&path).unwrap();
    let bless = std::env::var_os("TPRUN_BLESS").is_some();
    let mut stale = Vec::new();
    for p in PROGRAMS {
        let (start, end) = block_range(&readme, p)
            .unwrap_or_else(|| panic!("docs/commands.md has no help block for `tprun {p}`"));
        let want = help(p);
        if readme[start..end] != want {
            stale.push(if p.is_empty() { "tprun" } else { p });
            readme.replace_range(start..end, &want);
        }
    }
    if bless {
        std::fs::write(&path, readme).unwrap();
    } else {
        assert!(
            stale.is_empty(),
            "docs/commands.md's --help blocks are stale for {stale:?}: run TPRUN_BLESS=1 cargo test --test readme_help"
        );
    }
}
