//! Fuzzes `TextTokenizer::from_bytes` (a `tokenizer.json`, e.g. one carried inside a
//! container), then encodes and decodes a short text with any tokenizer that loads.
#![no_main]

use bitstack_model::TextTokenizer;
use libfuzzer_sys::fuzz_target;

const TEXT: &str = "fn main() { println!(\"Hello, wörld! 1234 ½ 日本\"); }\n\t<|endoftext|>";

fuzz_target!(|data: &[u8]| {
    let Ok(t) = TextTokenizer::from_bytes(data, "fuzz/tokenizer.json") else {
        return;
    };
    let _ = t.vocab_size();
    let _ = t.token_to_id("<|endoftext|>");
    if let Ok(ids) = t.encode(TEXT) {
        let _ = t.decode(&ids, false);
        let _ = t.decode(&ids, true);
    }
    let _ = t.encode("");
    let _ = t.decode(&[0, 1, 2, u32::MAX], false);
    let _ = format!("{t:?}");
});
