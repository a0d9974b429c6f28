//! The checkpoint's tokenizer (tokenizer.json via the `tokenizers` crate) and a streaming
//! detokenizer that never splits a UTF-8 character.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

/// A Hugging Face `tokenizer.json`, plus the file it came from for error messages.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn load(model_dir: &Path) -> Result<Tokenizer> {
        let path = model_dir.join("tokenizer.json");
        Tokenizer::from_file(&path)
    }

    /// Loads a tokenizer.json; a missing file, a FIFO or a symlink loop is a clear error.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let Some(json) = crate::checkpoint::read_optional_text(path)? else {
            anyhow::bail!("missing tokenizer: {} does not exist", path.display());
        };
        Tokenizer::from_json_at(&json, path)
    }

    /// From the JSON text of a tokenizer.json that `path` names (in errors and [`Self::path`]).
    pub fn from_json_at(json: &str, path: &Path) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("reading tokenizer {}: {e}", path.display()))?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// From the JSON text of a tokenizer.json (tests build small ones in memory).
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| anyhow!("parsing tokenizer JSON: {e}"))?;
        Ok(Tokenizer {
            inner,
            path: PathBuf::from("<memory>"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`. Added tokens written in the text (`<|im_start|>`, ...) map to their
    /// single ids. `add_special_tokens` runs the tokenizer's post-processor (a BOS for Llama-style
    /// tokenizers; nothing for Qwen2): transformers does so for a plain `tokenizer(text)` but not
    /// for a rendered chat, whose template already wrote every special token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing with {}: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens (eos, `<|im_end|>`, ...) are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("decoding ids with {}: {e}", self.path.display()))
    }

    /// The id of one token string (vocabulary or added token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of ids into text pieces as they arrive, holding back bytes of a character
/// that is not complete yet.
///
/// Decoding ids one by one is wrong for byte-level BPE: a token can hold the first byte of a
/// multi-byte character and the next token the rest, and a lone piece decodes to U+FFFD. So this
/// decodes a short window of the running list (from a few tokens before the last emitted point,
/// which keeps decoders that look at neighbours, like SentencePiece's leading-space rule,
/// correct) and emits only the suffix that grew, and only once it does not end in U+FFFD.
/// [`StreamDecoder::finish`] then emits whatever is left, so the concatenation of every piece
/// equals `decode(all ids)`.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix_offset: usize,
    /// End of what has been emitted (in ids).
    read_offset: usize,
    emitted: String,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tok: &'t Tokenizer, skip_special: bool) -> StreamDecoder<'t> {
        StreamDecoder {
            tok,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            emitted: String::new(),
        }
    }

    /// Adds one id; returns the text that became complete with it (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let window = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if window.len() > prefix.len()
            && !window.ends_with('\u{FFFD}')
            && window.is_char_boundary(prefix.len())
            && window.starts_with(&prefix)
        {
            let piece = window[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.emitted.push_str(&piece);
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The rest of the text once no more ids come: `decode(all ids)` minus what was emitted.
    pub fn finish(&mut self) -> Result<String> {
        let full = self.tok.decode(&self.ids, self.skip_special)?;
        let rest = match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            // A decoder whose output for a prefix is not a prefix of the whole: emit the tail of
            // the window as a best effort (never happens for byte-level BPE).
            None => {
                let prefix = self.tok.decode(
                    &self.ids[self.prefix_offset..self.read_offset],
                    self.skip_special,
                )?;
                let window = self
                    .tok
                    .decode(&self.ids[self.prefix_offset..], self.skip_special)?;
                window.get(prefix.len()..).unwrap_or_default().to_string()
            }
        };
        self.emitted.push_str(&rest);
        self.read_offset = self.ids.len();
        self.prefix_offset = self.read_offset;
        Ok(rest)
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest are shifted
    /// to U+0100.. (what byte-level BPE vocabularies are written in).
    fn byte_char(b: u8) -> char {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable {
            char::from_u32(b as u32).unwrap()
        } else {
            let mut n = 0u32;
            for x in 0..b {
                let p = (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
                if !p {
                    n += 1;
                }
            }
            char::from_u32(256 + n).unwrap()
        }
    }

    /// A byte-level BPE tokenizer whose vocabulary is the 256 single bytes (so every multi-byte
    /// character is split over several tokens), with `<|im_start|>`/`<|im_end|>` as added
    /// special tokens 256 and 257.
    pub(crate) fn byte_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for b in 0..=255u8 {
            vocab.insert(byte_char(b).to_string(), serde_json::json!(b as u32));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 256, "content": "<|im_start|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 257, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                              "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_json(&json.to_string()).unwrap()
    }

    #[test]
    fn special_tokens_stay_whole_and_bytes_split() {
        let tok = byte_tokenizer();
        let ids = tok.encode("<|im_start|>hé<|im_end|>", false).unwrap();
        assert_eq!(ids, vec![256, b'h' as u32, 0xC3, 0xA9, 257]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hé");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>hé<|im_end|>");
        assert_eq!(tok.token_id("<|im_end|>"), Some(257));
    }

    #[test]
    fn stream_never_splits_a_character() {
        let tok = byte_tokenizer();
        let text = "a é 世界 🦀!\nend";
        let mut ids = tok.encode(text, false).unwrap();
        ids.push(257); // a special token at the end is skipped in the text
        assert!(
            ids.len() > text.chars().count(),
            "bytes must split characters"
        );
        let mut dec = StreamDecoder::new(&tok, true);
        let mut pieces = Vec::new();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} has a broken character"
            );
            pieces.push(piece);
        }
        pieces.push(dec.finish().unwrap());
        let streamed: String = pieces.concat();
        assert_eq!(streamed, text);
        assert_eq!(streamed, tok.decode(&ids, true).unwrap());
        assert_eq!(dec.text(), text);
        // The 4 bytes of the crab arrive as 4 tokens: the first 3 emit nothing.
        let crab = "🦀".as_bytes();
        let mut dec = StreamDecoder::new(&tok, true);
        for &b in &crab[..3] {
            assert_eq!(dec.push(b as u32).unwrap(), "");
        }
        assert_eq!(dec.push(crab[3] as u32).unwrap(), "🦀");
        assert_eq!(dec.finish().unwrap(), "");
    }

    #[test]
    fn stream_flushes_an_incomplete_tail_at_the_end() {
        let tok = byte_tokenizer();
        let mut dec = StreamDecoder::new(&tok, true);
        assert_eq!(dec.push(b'x' as u32).unwrap(), "x");
        assert_eq!(dec.push(0xE4).unwrap(), "");
        // Generation stopped mid-character: the end emits what decode gives for all ids.
        let rest = dec.finish().unwrap();
        assert_eq!(rest, "\u{FFFD}");
        assert_eq!(dec.text(), tok.decode(&[b'x' as u32, 0xE4], true).unwrap());
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tprun-no-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Tokenizer::load(&dir).err().unwrap().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("tokenizer.json"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
    }
}
