//! The one owner of a checkpoint directory (docs/DESIGN.md, "On disk"). Every file of a
//! Hugging Face Qwen2 checkpoint is opened here and nowhere else, so each error names the file,
//! and a path that is not a regular file (a FIFO would block `open` forever) is refused before
//! it is opened.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::model::config::Config;
use crate::model::loader::Checkpoint;
use crate::text::chat::ChatTemplate;
use crate::text::Tokenizer;

/// A checkpoint directory (or the bundled model's files in memory) and its parsed config.json.
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
    /// `Some` for the bundled model: its files are compiled in, nothing is read from disk.
    files: Option<&'static [(&'static str, &'static [u8])]>,
    config: Config,
}

/// Name under which the bundled model appears in messages (it has no directory).
pub const BUNDLED_NAME: &str = "(bundled) tiny-hub-bf16-tied";

/// The bundled tiny model's files (tests/fixtures/tiny-hub-bf16-tied), compiled into the binary
/// so that the default model works from any directory and any install.
static BUNDLED: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../tests/fixtures/tiny-hub-bf16-tied/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../tests/fixtures/tiny-hub-bf16-tied/generation_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../tests/fixtures/tiny-hub-bf16-tied/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../tests/fixtures/tiny-hub-bf16-tied/tokenizer_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../tests/fixtures/tiny-hub-bf16-tied/model.safetensors"),
    ),
];

impl ModelDir {
    /// Checks that `path` is a directory and reads its config.json.
    pub fn open(path: &Path) -> Result<ModelDir> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("model directory {} is not a directory", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !is_symlink(path) => {
                bail!("model directory {} does not exist", path.display())
            }
            Err(e) => bail!("model directory {}: {}", path.display(), io_cause(&e)),
        }
        let config = Config::from_dir(path)?;
        Ok(ModelDir {
            path: path.to_path_buf(),
            files: None,
            config,
        })
    }

    /// The tiny model compiled into the binary (the default when no model is named).
    pub fn bundled() -> ModelDir {
        let (_, text) = BUNDLED
            .iter()
            .find(|(n, _)| *n == "config.json")
            .expect("bundled");
        let text = std::str::from_utf8(text).expect("bundled config.json is UTF-8");
        ModelDir {
            path: PathBuf::from(BUNDLED_NAME),
            files: Some(BUNDLED),
            config: Config::from_json(text).expect("the bundled config.json is valid"),
        }
    }

    /// The model `--model SPEC [--revision REV]` names (a directory or a repo id in the Hugging
    /// Face cache, see [`crate::hub::resolve_dir`]), or the bundled model when `spec` is `None`.
    /// The launcher and every rank call this one function, so they agree on the model.
    pub fn resolve(spec: Option<&Path>, revision: Option<&str>) -> Result<ModelDir> {
        match spec {
            Some(s) => ModelDir::open(&crate::hub::resolve_dir(s, revision)?),
            None => match revision {
                Some(r) => bail!(
                    "--revision {r}: goes with --model ORG/NAME (a Hugging Face repo id), not \
                     the bundled model"
                ),
                None => Ok(ModelDir::bundled()),
            },
        }
    }

    /// Whether this is the bundled in-memory model.
    pub fn is_bundled(&self) -> bool {
        self.files.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated config.json.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The text of file `name` of the checkpoint, `None` when absent.
    fn read_optional(&self, name: &str) -> Result<Option<String>> {
        self.read_path(&self.path.join(name))
    }

    /// [`read_optional_text`], or for the bundled model a lookup of the compiled-in file.
    fn read_path(&self, path: &Path) -> Result<Option<String>> {
        let Some(files) = self.files else {
            return read_optional_text(path);
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        Ok(files
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| String::from_utf8(b.to_vec()).expect("bundled text files are UTF-8")))
    }

    /// End-of-sequence ids: `eos_token_id` of generation_config.json when the file has one,
    /// else config.json's (both parsed by [`Config`]'s one token-id parser).
    pub fn eos_ids(&self) -> Result<Vec<u32>> {
        let path = self.path.join("generation_config.json");
        let Some(text) = self.read_optional("generation_config.json")? else {
            return Ok(self.config.eos_token_ids.clone());
        };
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(crate::model::config::eos_token_ids(&v)
            .with_context(|| format!("{}", path.display()))?
            .unwrap_or_else(|| self.config.eos_token_ids.clone()))
    }

    /// tokenizer.json.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self.tokenizer_if_present()? {
            Some(t) => Ok(t),
            None => bail!(
                "missing tokenizer: {} does not exist",
                self.path.join("tokenizer.json").display()
            ),
        }
    }

    /// tokenizer.json, or `None` when the checkpoint has none (token ids need no tokenizer).
    pub fn tokenizer_if_present(&self) -> Result<Option<Tokenizer>> {
        let path = self.path.join("tokenizer.json");
        match self.read_optional("tokenizer.json")? {
            Some(json) => Tokenizer::from_json_at(&json, &path).map(Some),
            None => Ok(None),
        }
    }

    /// The chat template: chat_template.jinja when present (it wins, as in transformers 5),
    /// else `chat_template` of tokenizer_config.json.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        ChatTemplate::load_with(&self.path, &|p| self.read_path(p))
    }

    /// The weights: model.safetensors, or the shards of model.safetensors.index.json.
    pub fn weights(&self) -> Result<Checkpoint> {
        match self.files {
            Some(files) => {
                let (_, bytes) = files
                    .iter()
                    .find(|(n, _)| *n == "model.safetensors")
                    .expect("the bundled model has weights");
                Checkpoint::from_static(&self.path, bytes)
            }
            None => Checkpoint::open(&self.path),
        }
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// The OS's words for an I/O error, without Rust's "(os error N)" only where it adds nothing.
fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ELOOP) => "too many levels of symbolic links".to_string(),
        Some(libc::ENOENT) => "broken symbolic link (its target does not exist)".to_string(),
        _ => e.to_string(),
    }
}

/// Opens `path` for reading, refusing anything but a regular file (after symlinks) before it is
/// opened: opening a FIFO blocks until a writer comes. O_NONBLOCK plus an fstat of the opened
/// file close the race with a file swapped in between.
pub fn open_regular(path: &Path) -> Result<File> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if !is_symlink(path) => {
            anyhow::anyhow!("cannot read {}: {e}", path.display())
        }
        _ => anyhow::anyhow!("cannot read {}: {}", path.display(), io_cause(&e)),
    })?;
    if md.is_dir() {
        let e = std::io::Error::from_raw_os_error(libc::EISDIR);
        bail!("cannot read {}: {e}", path.display());
    }
    if !md.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let md = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?;
    if !md.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    Ok(file)
}

/// The text of a file that must exist.
pub fn read_text(path: &Path) -> Result<String> {
    let mut text = String::new();
    open_regular(path)?
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text)
}

/// The text of a file that may be absent (`None`); anything else that is not a readable regular
/// file (a FIFO, a symlink loop, a broken link) is an error naming the cause.
pub fn read_optional_text(path: &Path) -> Result<Option<String>> {
    if exists_or_cause(path)? {
        read_text(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Whether something is at `path`: `false` only when nothing (not even a symlink) is there.
pub fn exists_or_cause(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => bail!("{}: {}", path.display(), io_cause(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_copy(tag: &str) -> crate::tests::TmpDir {
        let d = crate::tests::tmpdir(&format!("modeldir-{tag}"));
        let src =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-hub-bf16-tied");
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
            }
        }
        d
    }

    fn mkfifo(path: &Path) {
        std::fs::remove_file(path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Each would block in open(2) forever before ModelDir checked the file type.
    #[test]
    fn a_fifo_where_a_file_belongs_is_refused_not_waited_on() {
        for name in ["config.json", "model.safetensors", "tokenizer.json"] {
            let d = fixture_copy(&format!("fifo-{name}"));
            mkfifo(&d.join(name));
            let r = ModelDir::open(&d).and_then(|m| {
                m.tokenizer()?;
                m.weights().map(|_| ())
            });
            let e = format!("{:#}", r.err().unwrap());
            assert!(e.contains(&format!("{name}: not a regular file")), "{e}");
        }
    }

    #[test]
    fn a_symlink_loop_is_not_reported_as_missing() {
        let d = fixture_copy("loop");
        for name in ["config.json", "tokenizer.json", "generation_config.json"] {
            let p = d.join(name);
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink(&p, &p).unwrap();
            let r = ModelDir::open(&d).and_then(|m| m.eos_ids().and(m.tokenizer().map(|_| ())));
            let e = format!("{:#}", r.err().unwrap());
            assert!(e.contains("too many levels of symbolic links"), "{e}");
            assert!(!e.contains("does not exist"), "{e}");
            std::fs::remove_file(&p).unwrap();
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures/tiny-hub-bf16-tied")
                    .join(name),
                &p,
            )
            .unwrap();
        }
        let lp = d.join("self");
        std::os::unix::fs::symlink(&lp, &lp).unwrap();
        let e = format!("{:#}", ModelDir::open(&lp).err().unwrap());
        assert!(e.contains("too many levels of symbolic links"), "{e}");
    }

    #[test]
    fn every_file_of_a_fixture_reads() {
        let d = fixture_copy("ok");
        let m = ModelDir::open(&d).unwrap();
        assert_eq!(m.eos_ids().unwrap(), vec![389, 387]);
        assert!(m.tokenizer().unwrap().vocab_size() > 0);
        m.chat_template().unwrap();
        m.weights().unwrap();
    }
}
