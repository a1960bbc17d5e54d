//! The CLIP tokenizer, built from a diffusers `tokenizer/` folder (`vocab.json`, `merges.txt`,
//! optionally `special_tokens_map.json` for the pad token) with the `tokenizers` crate, set up
//! the way `CLIPTokenizerFast` is: NFC, whitespace collapsed, lower-cased, CLIP's word regex,
//! byte-level alphabet, BPE with the `</w>` end-of-word suffix.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::model::ModelError;

/// CLIP's word pattern (`CLIPTokenizer.pat`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Start of text.
pub const BOS: &str = "<|startoftext|>";
/// End of text (also the pad token of SD 1.x).
pub const EOS: &str = "<|endoftext|>";

/// A CLIP tokenizer producing fixed-length id sequences (`[BOS] text [EOS] pad...`).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

/// Token ids of one prompt, padded to the encoder's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `max_len` ids.
    pub ids: Vec<u32>,
    /// Whether the prompt was longer than fits and was cut.
    pub truncated: bool,
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json` and `dir/merges.txt`; sequences are `max_len` long.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self, ModelError> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(ModelError::MissingFile { path: file.clone() });
            }
        }
        let tokenizer_err = |what: &str, e: tokenizers::Error| ModelError::Tokenizer {
            path: dir.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| tokenizer_err("vocab.json / merges.txt", e))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| tokenizer_err("normalizer", e))?;
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tokenizer_err("pre-tokenizer", e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| ModelError::Tokenizer {
                    path: vocab.clone(),
                    reason: format!("the vocabulary has no `{token}` token"),
                })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match read_pad_token(dir)? {
            Some(token) => id(&token)?,
            None => eos,
        };
        if max_len < 2 {
            return Err(ModelError::Tokenizer {
                path: dir.to_path_buf(),
                reason: format!("sequence length {max_len} is too short"),
            });
        }
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    /// The fixed sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes `text` into exactly `max_len` ids, cutting it if it is too long.
    pub fn encode(&self, text: &str) -> Result<Tokens, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: Default::default(),
                reason: format!("cannot tokenize the prompt: {e}"),
            })?;
        let body = encoding.get_ids();
        let room = self.max_len - 2;
        let truncated = body.len() > room;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..body.len().min(room)]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(Tokens { ids, truncated })
    }

    /// The sub-word pieces of `text` (for diagnostics and tests).
    pub fn pieces(&self, text: &str) -> Result<Vec<String>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: Default::default(),
                reason: e.to_string(),
            })?;
        Ok(encoding.get_tokens().to_vec())
    }
}

/// `pad_token` from `special_tokens_map.json` (a string or `{ "content": ... }`), if present.
fn read_pad_token(dir: &Path) -> Result<Option<String>, ModelError> {
    let path = dir.join("special_tokens_map.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(match json.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .map(String::from),
        None => None,
    })
}

/// The GPT-2 / CLIP byte-to-character map: printable bytes map to themselves, the rest to
/// code points from 256 up, so every byte sequence is a string of visible characters.
pub fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}
