//! Golden tests against the reference PyTorch logits in `shared/reference`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bitstack_model::{argmax, CausalLm, KvCache, TextTokenizer};
use safetensors::{Dtype, SafeTensors};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

struct Golden {
    input_ids: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn golden(model: &str) -> Golden {
    let path = shared().join(format!("reference/golden-{model}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.dtype(), Dtype::I64);
    let input_ids: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
        .collect();
    let lg = st.tensor("logits").unwrap();
    assert_eq!(lg.dtype(), Dtype::F32);
    assert_eq!(lg.shape(), &[input_ids.len(), 8192]);
    let logits = lg
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Golden {
        input_ids,
        logits,
        vocab: 8192,
    }
}

fn check_model(name: &str) {
    let dir = shared().join("models").join(name);
    let model = CausalLm::load(&dir).unwrap();
    let g = golden(name);
    let t = g.input_ids.len();

    // Tokenizer reproduces the reference ids of the reference text.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("reference/golden_logits.json")).unwrap(),
    )
    .unwrap();
    let text = json[name]["text"].as_str().unwrap();
    let ref_ids: Vec<u32> = json[name]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let tok = TextTokenizer::from_model_dir(&dir).unwrap();
    assert_eq!(tok.encode(text).unwrap(), ref_ids, "{name}: tokenizer");
    assert_eq!(ref_ids, g.input_ids, "{name}: json vs safetensors ids");

    // Full-sequence logits.
    let ours = model.forward(&g.input_ids).unwrap();
    assert_eq!(ours.len(), t * g.vocab);
    let max_ref = g.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let max_dev = ours
        .iter()
        .zip(&g.logits)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!(
        "{name}: max |ours - golden| = {max_dev:.3e}, max |golden| = {max_ref:.3}, ratio {:.3e}",
        max_dev / max_ref
    );
    assert!(
        max_dev <= 1e-3 * max_ref,
        "{name}: deviation {max_dev} vs max {max_ref}"
    );
    let argmax_next: Vec<u32> = json[name]["argmax_next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    for i in 0..t {
        let row = &ours[i * g.vocab..(i + 1) * g.vocab];
        let grow = &g.logits[i * g.vocab..(i + 1) * g.vocab];
        assert_eq!(argmax(row), argmax(grow), "{name}: argmax at {i}");
        assert_eq!(argmax(row), argmax_next[i], "{name}: argmax_next at {i}");
    }

    // Incremental decoding with the KV cache (one token at a time, and a batched prefill
    // followed by single tokens) matches the full forward.
    let max_ours = ours.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let mut cache = model.new_cache();
    for (i, &tokn) in g.input_ids.iter().enumerate() {
        let step = model.forward_next(tokn, &mut cache).unwrap();
        let full = &ours[i * g.vocab..(i + 1) * g.vocab];
        let dev = step
            .iter()
            .zip(full)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            dev <= 1e-4 * max_ours,
            "{name}: KV step {i} deviates by {dev}"
        );
    }
    assert_eq!(cache.len(), t);
    let mut cache = KvCache::new(model.config());
    let split = t / 2;
    let last = model
        .forward_cached(&g.input_ids[..split], &mut cache)
        .unwrap();
    let full = &ours[(split - 1) * g.vocab..split * g.vocab];
    let dev = last
        .iter()
        .zip(full)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(dev <= 1e-4 * max_ours, "{name}: prefill deviates by {dev}");
    for i in split..t {
        let step = model.forward_next(g.input_ids[i], &mut cache).unwrap();
        let full = &ours[i * g.vocab..(i + 1) * g.vocab];
        let dev = step
            .iter()
            .zip(full)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            dev <= 1e-4 * max_ours,
            "{name}: KV step {i} after prefill deviates by {dev}"
        );
    }
}

#[test]
fn golden_tiny_qwen2() {
    check_model("tiny-qwen2");
}

#[test]
fn golden_small_llama() {
    check_model("small-llama");
}
