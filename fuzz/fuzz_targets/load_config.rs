//! Fuzzes the `config.json` parser of bitstack-model (`ModelConfig::from_json_bytes`) and
//! everything derived from a config it accepts.
#![no_main]

use bitstack_model::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(c) = ModelConfig::from_json_bytes(data, "fuzz/config.json") else {
        return;
    };
    // An accepted config is consistent, and its derived sizes do not overflow.
    c.validate().expect("a parsed config validates");
    assert!(c.num_heads % c.num_kv_heads == 0);
    let (q, kv) = (c.q_dim(), c.kv_dim());
    assert!(q >= kv);
    // Lazy: a config claiming many layers is fine as long as only a prefix is looked at.
    for (name, shape) in c.expected_tensors().take(64) {
        assert!(!name.is_empty());
        assert!(shape.iter().all(|&d| d > 0), "{name} {shape:?}");
    }
    // Allocates head_dim / 2 values: only for head sizes a real model could have.
    if c.head_dim <= 1 << 16 {
        let inv = c.rope_inv_freq();
        assert_eq!(inv.len(), c.head_dim / 2);
    }
    let _ = format!("{c:?}");
});
