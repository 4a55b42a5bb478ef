//! Fuzzes loading a checkpoint: a tiny Llama or Qwen2 `config.json` (one or two layers,
//! tied or untied embeddings, usual dimensions or ones that do not fit together) and a `model.safetensors` built from the input, whose tensors
//! have the right shapes or shapes off by one, F16 / BF16 / F32 or an unsupported dtype,
//! are sometimes missing, and hold the input's bytes as values (NaN and infinities
//! included). Whatever loads is run (a forward pass, a window's loss, cached decoding), and
//! the checkpoint is compressed (data-free, k = 1, two blocks) and the stack loaded and run.
#![no_main]

use std::sync::Arc;

use bitstack::compress::{compress, CompressOptions};
use bitstack::engine::model_of;
use bitstack::model::CausalLm;
use bitstack::runtime::{LoadedStack, StackFile};
use libfuzzer_sys::fuzz_target;

mod common;
use common::Input;

fuzz_target!(|data: &[u8]| {
    let mut d = Input(data);
    let qwen = d.byte() % 2 == 0;
    let tied = d.byte() % 2 == 0;
    let layers = 1 + d.byte() as usize % 2;
    // Dimensions: the usual ones (byte 0), or others that may not fit together (heads
    // that do not divide the width, key/value heads that do not divide the heads, a
    // vocabulary of one token, two positions for four tokens).
    let odd = d.byte();
    let pick = |bits: u8, usual: usize, others: &[usize]| {
        let i = (odd >> bits) as usize & 3;
        if i == 0 {
            usual
        } else {
            others[(i - 1) % others.len()]
        }
    };
    let hidden = pick(0, 8, &[12, 6, 16]);
    let heads = pick(2, 2, &[3, 4, 1]);
    let kv_heads = pick(4, 1, &[2, 3]);
    let (intermediate, vocab, positions) = if odd >> 6 == 0 {
        (12, 16, 64)
    } else {
        [(1, 16, 64), (12, 1, 64), (12, 16, 2)][(odd >> 6) as usize - 1]
    };
    let head_dim = hidden / heads;
    let kv = kv_heads * head_dim;
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
        for (name, out, inp) in [
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", intermediate, hidden),
            ("mlp.up_proj", intermediate, hidden),
            ("mlp.down_proj", hidden, intermediate),
        ] {
            tensors.push((format!("{p}.{name}.weight"), vec![out, inp]));
            if qwen && name.starts_with("self_attn") && name != "self_attn.o_proj" {
                tensors.push((format!("{p}.{name}.bias"), vec![out]));
            }
        }
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
    }
    tensors.push(("model.norm.weight".into(), vec![hidden]));
    if !tied {
        tensors.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    // The safetensors file: header, then the tensors' bytes in order. The input's next
    // bytes choose each tensor's fate (0: right shape, F16), the rest are the values.
    let choices: Vec<u8> = tensors.iter().map(|_| d.byte()).collect();
    let mut header = serde_json::Map::new();
    let mut body = Vec::new();
    for ((name, mut shape), choice) in tensors.into_iter().zip(choices) {
        match choice % 16 {
            15 => continue, // missing
            14 => shape[0] += 1,
            _ => {}
        }
        let (dtype, size) = match (choice / 16) % 8 {
            7 => ("F32", 4),
            6 => ("BF16", 2),
            5 => ("I32", 4),
            _ => ("F16", 2),
        };
        let len = shape.iter().product::<usize>() * size;
        let start = body.len();
        // Past the input: small regular values (so that most models are finite).
        body.extend(d.bytes(len, |i| [0x00, 0x2c, 0x00, 0xac][i % 4]));
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, body.len()]}),
        );
    }
    let file = common::safetensors_file(&header, &body);
    let config = serde_json::json!({
        "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen { "qwen2" } else { "llama" },
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    });
    let dir = common::scratch_dir("model");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join("config.json"), config.to_string()).is_err()
        || std::fs::write(dir.join("model.safetensors"), &file).is_err()
    {
        return;
    }
    let tokens = [1u32, 2, 3, (vocab - 1) as u32];
    let run = |model: &CausalLm| {
        let _ = model.forward(&tokens);
        let _ = model.window_nll(&tokens);
        let mut cache = model.new_cache();
        let _ = model.forward_cached(&tokens[..2], &mut cache);
        let _ = model.forward_next(3, &mut cache);
    };
    if let Ok(model) = CausalLm::load(&dir) {
        run(&model);
    }
    let out = dir.join("out.bitstack");
    let mut options = CompressOptions::default();
    options.avd.k = 1;
    options.avd.niter = 2;
    if compress(&dir, &out, &options, &|_| {}).is_ok() {
        if let Ok(file) = StackFile::open(&out) {
            let file = Arc::new(file);
            let max = file.layout().max_memory();
            if let Ok(stack) = LoadedStack::load(file, max) {
                if let Ok(model) = model_of(&Arc::new(stack)) {
                    run(&model);
                }
            }
        }
    }
});
