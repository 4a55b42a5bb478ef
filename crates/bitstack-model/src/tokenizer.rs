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
                message: "file not found: copy the model's original tokenizer.json there".into(),
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
    ///
    /// Never panics: a file that is not JSON is refused before the `tokenizers` crate sees
    /// it, and that crate's panics on some malformed files (a syntax error inside
    /// `"decoder"`, a bad `precompiled_charsmap`) are caught and returned as errors.
    pub fn from_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = origin.as_ref();
        let inner = parse_tokenizer(bytes).map_err(|message| ModelError::Tokenizer {
            path: path.to_owned(),
            message: format!("cannot parse: {message}"),
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

/// Parses a `tokenizer.json` with the `tokenizers` crate, turning its panics into errors.
///
/// `tokenizers` 0.22 panics instead of returning an error on some malformed files (found by
/// `fuzz/fuzz_targets/load_tokenizer.rs`; regression inputs in
/// `tests/fuzz_inputs/tokenizer-*`): a JSON syntax error inside `"decoder"`
/// (`expect("Helper")` in its `decoders/mod.rs`), a bad `precompiled_charsmap`
/// (`expect("Precompiled")` in `normalizers/mod.rs`). A file that is not JSON is refused
/// before the crate sees it (also the clearer message); any remaining panic is caught with
/// [`std::panic::catch_unwind`] and returned as an error, without the panic message being
/// printed (see [`quietly`]).
fn parse_tokenizer(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| e.to_string())?;
    quietly(|| tokenizers::Tokenizer::from_bytes(bytes))
        .map_err(|panic| format!("the tokenizers crate failed on it: {panic}"))?
        .map_err(|e| e.to_string())
}

thread_local! {
    /// Set while [`quietly`] runs on this thread: its panics are not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, returning a panic as its message instead of unwinding.
///
/// The panic hook is wrapped once (chaining to the hook installed before) so that a panic
/// caught here does not print `thread '…' panicked at …` to stderr: for a CLI user a
/// malformed file is an error, not a crash. Panics of other threads, or outside `f`, are
/// reported by the previous hook as before.
fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic without a message".to_owned())
    })
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
    fn panics_of_the_tokenizers_crate_become_errors() {
        // Valid JSON on which tokenizers 0.22 panics (`expect("Precompiled")`).
        let json = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":{"type":"Precompiled","precompiled_charsmap":"!!"},
            "pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#;
        let e = TextTokenizer::from_bytes(json, "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.json") && e.contains("cannot parse"), "{e}");
        assert!(
            e.contains("the tokenizers crate failed on it: Precompiled"),
            "{e}"
        );
        assert_eq!(quietly(|| 7), Ok(7));
        assert_eq!(
            quietly(|| -> u8 { panic!("boom {}", 1) }),
            Err("boom 1".to_owned())
        );
        assert!(!QUIET.with(std::cell::Cell::get));
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let e = TextTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokenizer.json"), "{e}");
    }
}
