//! Every relative link in README.md and docs/ (the user guide) resolves: the file or folder
//! exists, and a `#fragment` names a heading of the target page (GitHub's anchor rules). Links
//! in code blocks and to the web are not checked.

use std::path::{Path, PathBuf};

/// The Markdown files of the guide: README.md and every `*.md` under docs/.
fn pages(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let mut out = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut out);
    out
}

/// The text outside fenced code blocks and inline code spans, line by line (1-based numbers).
fn prose(text: &str) -> Vec<(usize, String)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop `code spans`: a link-like text inside one is not a link.
        let mut kept = String::new();
        for (j, part) in line.split('`').enumerate() {
            if j % 2 == 0 {
                kept.push_str(part);
            }
        }
        out.push((i + 1, kept));
    }
    out
}

/// `](target)` link targets of one line.
fn targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        match after.find(')') {
            Some(end) => {
                out.push(after[..end].trim().to_string());
                rest = &after[end..];
            }
            None => break,
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(page: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(page).unwrap();
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_of_the_guide_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages(root) {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root).unwrap().display().to_string();
        for (n, line) in prose(&text) {
            for t in targets(&line) {
                if t.starts_with("http://") || t.starts_with("https://") || t.starts_with("mailto:")
                {
                    continue;
                }
                checked += 1;
                let (path, frag) = t.split_once('#').unwrap_or((t.as_str(), ""));
                let target = if path.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(path)
                };
                if !target.exists() {
                    broken.push(format!("{name}:{n}: {t}: no such file"));
                } else if !frag.is_empty() {
                    let page_of = if target.is_dir() {
                        target.join("README.md")
                    } else {
                        target.clone()
                    };
                    if page_of.extension().is_some_and(|e| e == "md")
                        && !anchors(&page_of).iter().any(|a| a == frag)
                    {
                        broken.push(format!("{name}:{n}: {t}: no heading with that anchor"));
                    }
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: is the parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_parser_sees_links_and_skips_code() {
    assert_eq!(
        targets("see [a](x.md) and [b](y.md#z)."),
        ["x.md", "y.md#z"]
    );
    let p = prose("[a](in.md)\n```\n[b](code.md)\n```\n`[c](span.md)` [d](out.md)");
    let found: Vec<String> = p.iter().flat_map(|(_, l)| targets(l)).collect();
    assert_eq!(found, ["in.md", "out.md"]);
    assert_eq!(slug(" From C and C++"), "from-c-and-c");
    assert_eq!(
        slug(" Studying communication (`--trace DIR/`)"),
        "studying-communication---trace-dir"
    );
}
