//! `--model ORG/NAME`: an offline lookup in the local Hugging Face cache, laid out as
//! huggingface_hub lays it out: `models--ORG--NAME/refs/REV` holds a commit hash and
//! `snapshots/HASH/` the files (symlinks into `blobs/`). Nothing is downloaded: a missing model is
//! one line naming the path looked at and the command that fetches it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::{exists_or_cause, read_text};

/// Whether `s` has the form of a Hugging Face repo id, `ORG/NAME`.
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("HF_HUB_CACHE") {
        return Ok(d);
    }
    if let Some(d) = var("HF_HOME") {
        return Ok(d.join("hub"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".cache/huggingface/hub")),
        None => {
            bail!("cannot find the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, HOME is set")
        }
    }
}

/// The snapshot directory of `repo` at `revision` (a branch or tag name in `refs/`, or a commit
/// hash in `snapshots/`).
pub fn snapshot(repo: &str, revision: &str) -> Result<PathBuf> {
    let repo_dir = cache_dir()?.join(format!("models--{}", repo.replace('/', "--")));
    if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
        bail!("--revision {revision:?}: expected a branch, tag or commit hash");
    }
    let missing = |path: &Path| {
        let fetch = match revision {
            "main" => format!("huggingface-cli download {repo}"),
            r => format!("huggingface-cli download {repo} --revision {r}"),
        };
        anyhow::anyhow!(
            "model {repo} (revision {revision}) is not in the Hugging Face cache: {} does not \
             exist; fetch it with `{fetch}`",
            path.display()
        )
    };
    if !exists_or_cause(&repo_dir)? {
        return Err(missing(&repo_dir));
    }
    let direct = repo_dir.join("snapshots").join(revision);
    if exists_or_cause(&direct)? {
        return Ok(direct);
    }
    let ref_path = repo_dir.join("refs").join(revision);
    if !exists_or_cause(&ref_path)? {
        return Err(missing(&ref_path));
    }
    let hash = read_text(&ref_path)?;
    let hash = hash.trim();
    if hash.is_empty() || !hash.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!(
            "{}: expected a commit hash, found {hash:?}",
            ref_path.display()
        );
    }
    let snap = repo_dir.join("snapshots").join(hash);
    if !exists_or_cause(&snap)? {
        return Err(missing(&snap));
    }
    Ok(snap)
}

/// Where `--model SPEC` points: an existing directory wins, then a repo id in the cache, else
/// `SPEC` as a directory (whose absence is the error). `revision` goes with repo ids only.
pub fn resolve_dir(spec: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let is_dir = std::fs::metadata(spec).is_ok_and(|m| m.is_dir());
    match spec.to_str() {
        Some(id) if !is_dir && is_repo_id(id) => {
            snapshot(id, revision.unwrap_or("main")).with_context(|| format!("--model {id}"))
        }
        _ => {
            if let Some(r) = revision {
                bail!(
                    "--revision {r}: goes with --model ORG/NAME (a Hugging Face repo id), but {} \
                     is a directory path",
                    spec.display()
                );
            }
            Ok(spec.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        for id in ["Qwen/Qwen2.5-0.5B-Instruct", "a/b", "org_x/name.v2"] {
            assert!(is_repo_id(id), "{id}");
        }
        for p in ["a", "/a/b", "a/b/c", "./a", "../a", "a/", "a b/c", ""] {
            assert!(!is_repo_id(p), "{p}");
        }
    }
}
