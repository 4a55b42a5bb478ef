//! Tokenization with the model's `tokenizer.json`, and evaluation windows.

use std::path::{Path, PathBuf};

use crate::ModelError;

/// A Hugging Face `tokenizer.json`, used without adding special tokens.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::Tokenizer {
                path: path.to_owned(),
                message: "file not found".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a `tokenizer.json` (e.g. one carried inside a container);
    /// `origin` names where they came from in error messages.
    pub fn from_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = origin.as_ref();
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer {
                path: path.to_owned(),
                message: format!("cannot parse: {e}"),
            })?;
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    /// Loads `dir/tokenizer.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    /// Id of a token string, e.g. `"<|endoftext|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn err(&self, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// Consecutive non-overlapping windows of `seq` tokens from the start; the remainder is
/// dropped; at most `max_windows` when given. `seq == 0` gives no windows.
pub fn windows(tokens: &[u32], seq: usize, max_windows: Option<usize>) -> Vec<&[u32]> {
    if seq == 0 {
        return Vec::new();
    }
    let n = max_windows.unwrap_or(usize::MAX);
    tokens.chunks_exact(seq).take(n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_remainder() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 3, None);
        assert_eq!(w.len(), 3);
        assert_eq!(w[2], &[6, 7, 8]);
        assert_eq!(windows(&t, 3, Some(2)).len(), 2);
        assert!(windows(&t, 0, None).is_empty());
        assert!(windows(&t, 11, None).is_empty());
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let e = TextTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
    }
}
