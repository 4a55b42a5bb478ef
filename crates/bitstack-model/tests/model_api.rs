//! Loading variants, the linear hook, layer-by-layer execution and calibration sites.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bitstack_model::{
    CausalLm, DenseLinear, Linear, LinearSlot, ModelConfig, ModelError, SafetensorsDir, Site,
    TensorSource,
};

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models")
        .join(name)
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitstack-model-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const PROMPT: [u32; 12] = [47, 702, 6655, 323, 262, 1151, 324, 2579, 408, 1622, 400, 78];

/// Writes the tensors of `src` as f32 into `n` shards, optionally with an index.
fn write_shards(src: &SafetensorsDir, dir: &Path, n: usize, with_index: bool) {
    let names = src.names();
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in names.chunks(names.len().div_ceil(n)).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|name| {
                let (shape, v) = src.tensor_f32(name).unwrap();
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
                (
                    name.clone(),
                    shape,
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(name, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }
    if with_index {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

#[test]
fn sharded_checkpoints_load_identically() {
    let dir = model_dir("tiny-qwen2");
    let reference = CausalLm::load(&dir).unwrap().forward(&PROMPT).unwrap();
    let src = SafetensorsDir::open(&dir).unwrap();
    for with_index in [true, false] {
        let out = scratch_dir(if with_index { "index" } else { "glob" });
        write_shards(&src, &out, 3, with_index);
        // Old-style config keys: rope_theta top level, torch_dtype.
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("dtype");
        o.insert("rope_theta".into(), 10000.0.into());
        o.insert("torch_dtype".into(), "float32".into());
        std::fs::write(out.join("config.json"), v.to_string()).unwrap();
        let m = CausalLm::load(&out).unwrap();
        assert_eq!(
            m.forward(&PROMPT).unwrap(),
            reference,
            "with_index={with_index}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn missing_tensor_and_bad_architecture_are_named() {
    let dir = model_dir("tiny-qwen2");
    let src = SafetensorsDir::open(&dir).unwrap();
    let out = scratch_dir("missing");
    write_shards(&src, &out, 1, false);
    std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
    // Drop one tensor by rewriting with an index that omits nothing but a file that lacks it.
    let src2 = SafetensorsDir::open(&out).unwrap();
    let cfg = ModelConfig::from_file(out.join("config.json")).unwrap();
    struct Without<'a>(&'a SafetensorsDir, &'a str);
    impl TensorSource for Without<'_> {
        fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
            if name == self.1 {
                return Err(ModelError::MissingTensor { name: name.into() });
            }
            self.0.tensor_f32(name)
        }
        fn contains(&self, name: &str) -> bool {
            name != self.1 && self.0.contains(name)
        }
        fn names(&self) -> Vec<String> {
            self.0.names().into_iter().filter(|n| n != self.1).collect()
        }
    }
    let missing = "model.layers.2.mlp.up_proj.weight";
    let e = CausalLm::from_source(cfg.clone(), &Without(&src2, missing), &mut |_, _| Ok(None))
        .unwrap_err();
    assert!(e.to_string().contains(missing), "{e}");
    let e = CausalLm::from_source(
        cfg,
        &Without(&src2, "model.layers.0.self_attn.k_proj.bias"),
        &mut |_, _| Ok(None),
    )
    .unwrap_err();
    assert!(e.to_string().contains("k_proj.bias"), "{e}");

    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    std::fs::write(
        out.join("config.json"),
        text.replace("Qwen2ForCausalLM", "PhiForCausalLM"),
    )
    .unwrap();
    let e = CausalLm::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("PhiForCausalLM") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);

    let e = bitstack_model::TextTokenizer::from_file(dir.join("config.json")).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}

/// A linear that counts its calls and delegates to a dense one.
struct Counting {
    inner: DenseLinear,
    calls: AtomicUsize,
}

impl Linear for Counting {
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }
    fn out_features(&self) -> usize {
        self.inner.out_features()
    }
    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.forward(x, tokens, y);
    }
}

/// A dense linear that reports a shared [`Linear::token_steps_limit`] and records the most
/// tokens any of its products took.
struct Stepping {
    inner: DenseLinear,
    limit: Arc<AtomicUsize>,
    widest: Arc<AtomicUsize>,
}

impl Linear for Stepping {
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }
    fn out_features(&self) -> usize {
        self.inner.out_features()
    }
    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        self.widest.fetch_max(tokens, Ordering::Relaxed);
        self.inner.forward(x, tokens, y);
    }
    fn token_steps_limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }
}

/// `forward_cached_into` feeds a run of at most `token_steps_limit` tokens one at a time
/// (the same logits as `forward_next` token by token, close to the batch's), longer runs
/// and models whose linears do not say so as one batch; a bad token in a stepped run is
/// refused before anything enters the cache.
#[test]
fn short_runs_go_one_token_at_a_time_where_the_linears_say_so() {
    let dir = model_dir("small-llama");
    let src = SafetensorsDir::open(&dir).unwrap();
    let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let (limit, widest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut model = CausalLm::from_source(cfg.clone(), &src, &mut |name, _| {
        if name == "lm_head.weight" {
            return Ok(None);
        }
        let (shape, w) = src.tensor_f32(name).unwrap();
        Ok(Some(Arc::new(Stepping {
            inner: DenseLinear::new(w, shape[0], shape[1]).unwrap(),
            limit: limit.clone(),
            widest: widest.clone(),
        }) as Arc<dyn Linear>))
    })
    .unwrap();
    let run = |model: &CausalLm, tokens: &[u32]| {
        widest.store(0, Ordering::Relaxed);
        let mut cache = model.new_cache();
        let logits = model.forward_cached(tokens, &mut cache).unwrap();
        assert_eq!(cache.len(), tokens.len());
        (logits, widest.load(Ordering::Relaxed))
    };
    let prompt = &PROMPT[..8];
    assert_eq!(model.token_steps_limit(), 0);
    let (batch, width) = run(&model, prompt);
    assert_eq!(width, 8, "no limit: one batch");

    limit.store(8, Ordering::Relaxed);
    assert_eq!(model.token_steps_limit(), 8);
    let (stepped, width) = run(&model, prompt);
    assert_eq!(width, 1, "8 tokens within the limit: one at a time");
    let mut cache = model.new_cache();
    let mut one_by_one = Vec::new();
    for &t in prompt {
        one_by_one = model.forward_next(t, &mut cache).unwrap();
    }
    assert_eq!(stepped, one_by_one);
    let scale = batch.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in stepped.iter().zip(&batch) {
        assert!((a - b).abs() <= 1e-4 * scale, "stepped {a} vs batch {b}");
    }
    let (_, width) = run(&model, &PROMPT[..9]);
    assert_eq!(width, 9, "9 tokens over the limit: one batch");

    let mut cache = model.new_cache();
    let bad = [47, 702, cfg.vocab_size as u32];
    let Err(e) = model.forward_cached(&bad, &mut cache) else {
        panic!("a token out of range was fed");
    };
    assert!(matches!(e, ModelError::TokenOutOfRange { .. }), "{e}");
    assert_eq!(cache.len(), 0, "a refused run left tokens in the cache");

    // The smallest over the decoder's linears: one plain linear means never.
    let (shape, w) = src.tensor_f32("model.layers.3.mlp.up_proj.weight").unwrap();
    let plain = Arc::new(DenseLinear::new(w, shape[0], shape[1]).unwrap());
    model.set_linear(3, LinearSlot::UpProj, plain).unwrap();
    assert_eq!(model.token_steps_limit(), 0);
    let (_, width) = run(&model, prompt);
    assert_eq!(width, 8);
}

#[test]
fn hook_set_linear_layers_and_sites() {
    let dir = model_dir("small-llama");
    let src = SafetensorsDir::open(&dir).unwrap();
    let cfg = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let mut seen = Vec::new();
    let counting: Arc<Counting> = {
        let (shape, w) = src
            .tensor_f32("model.layers.1.self_attn.q_proj.weight")
            .unwrap();
        Arc::new(Counting {
            inner: DenseLinear::new(w, shape[0], shape[1]).unwrap(),
            calls: AtomicUsize::new(0),
        })
    };
    let mut model = CausalLm::from_source(cfg.clone(), &src, &mut |name, shape| {
        seen.push((name.to_owned(), shape));
        if name == "model.layers.1.self_attn.q_proj.weight" {
            return Ok(Some(counting.clone() as Arc<dyn Linear>));
        }
        Ok(None)
    })
    .unwrap();
    assert_eq!(seen.len(), 7 * cfg.num_layers + 1);
    assert_eq!(
        seen[0],
        (
            "model.layers.0.self_attn.q_proj.weight".to_owned(),
            [512, 512]
        )
    );
    assert_eq!(seen[1].1, [256, 512]);
    assert_eq!(
        seen.last().unwrap(),
        &("lm_head.weight".to_owned(), [8192, 512])
    );
    assert_eq!(
        LinearSlot::parse_weight_name(&seen[6].0),
        Some((0, LinearSlot::DownProj))
    );

    let full = model.forward(&PROMPT).unwrap();
    assert_eq!(counting.calls.load(Ordering::Relaxed), 1);

    // Layer by layer with an observer gives the same logits and sees every site.
    let mut sites = Vec::new();
    let mut hidden = model.embed(&PROMPT).unwrap();
    for l in 0..model.num_layers() {
        model
            .forward_layer(
                l,
                &mut hidden,
                PROMPT.len(),
                Some(&mut |layer, site, x: &[f32], t| {
                    sites.push((layer, site, x.len() / t));
                }),
            )
            .unwrap();
    }
    assert_eq!(model.final_logits(&hidden, PROMPT.len()).unwrap(), full);
    assert_eq!(sites.len(), 4 * cfg.num_layers);
    assert_eq!(sites[0], (0, Site::AttnInput, 512));
    assert_eq!(sites[1], (0, Site::OProjInput, 512));
    assert_eq!(sites[2], (0, Site::MlpInput, 512));
    assert_eq!(sites[3], (0, Site::DownInput, 1536));
    let nll = model.window_nll(&PROMPT).unwrap();
    let nll2 = model.hidden_nll(&hidden, &PROMPT).unwrap();
    assert!((nll - nll2).abs() < 1e-9, "{nll} vs {nll2}");

    // Swapping a matrix changes the output; swapping it back restores it exactly.
    let zero = Arc::new(DenseLinear::new(vec![0.0; 1536 * 512], 1536, 512).unwrap());
    let old = model.set_linear(3, LinearSlot::UpProj, zero).unwrap();
    assert_ne!(model.forward(&PROMPT).unwrap(), full);
    model.set_linear(3, LinearSlot::UpProj, old).unwrap();
    assert_eq!(model.forward(&PROMPT).unwrap(), full);
    let wrong = Arc::new(DenseLinear::new(vec![0.0; 4], 2, 2).unwrap());
    let Err(e) = model.set_linear(0, LinearSlot::QProj, wrong) else {
        panic!("shape mismatch accepted");
    };
    assert!(e.to_string().contains("q_proj"), "{e}");
    assert!(model.set_linear(99, LinearSlot::QProj, counting).is_err());
    assert!(model.embed(&[9000]).is_err());
}

/// Windows run through the layers together (`windows_nll`, and `perplexity`, which batches
/// consecutive windows of one length) score as each window alone: positions and causal
/// attention stay per window. Both models (Qwen2 with biases, Llama with grouped-query
/// attention); windows of one length and a last shorter one.
#[test]
fn stacked_windows_score_as_each_alone() {
    for name in ["tiny-qwen2", "small-llama"] {
        let model = CausalLm::load(model_dir(name)).unwrap();
        let vocab = model.config().vocab_size as u32;
        let ids: Vec<u32> = (0..4 * 37 + 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect();
        let mut wins: Vec<&[u32]> = ids.chunks(37).collect();
        assert_eq!(wins.last().unwrap().len(), 20);
        let alone: Vec<f64> = wins.iter().map(|w| model.window_nll(w).unwrap()).collect();
        let together = model.windows_nll(&wins[..4]).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert!(
                ((a - b) / a).abs() < 1e-5,
                "{name}: window {i}: {a} alone, {b} together"
            );
        }
        let p = model.perplexity(&wins).unwrap();
        let count: usize = wins.iter().map(|w| w.len() - 1).sum();
        let want = (alone.iter().sum::<f64>() / count as f64).exp();
        assert_eq!(p.predicted_tokens, count);
        assert!(
            (p.ppl / want - 1.0).abs() < 1e-5,
            "{name}: {} vs {want}",
            p.ppl
        );
        // Windows of different lengths are refused, not mixed up.
        wins.swap(0, 4);
        assert!(model.windows_nll(&wins[..2]).is_err());
    }
}

/// A layer run again from one changed linear (`forward_layer_from`, what the perplexity
/// scorer does for its candidates) computes what the whole layer computes with that change,
/// bit for bit; the kept run's output is the plain layer's. Every slot, in a middle layer of
/// both models (Qwen2 with q/k/v biases, Llama with grouped-query attention).
#[test]
fn a_layer_run_again_from_a_changed_linear_matches_the_whole_layer() {
    let mut runs = Vec::new();
    for name in ["tiny-qwen2", "small-llama"] {
        let dir = model_dir(name);
        let src = SafetensorsDir::open(&dir).unwrap();
        let mut model = CausalLm::load(&dir).unwrap();
        let layer = model.num_layers() / 2;
        let t = PROMPT.len();
        let mut input = model.embed(&PROMPT).unwrap();
        for l in 0..layer {
            model.forward_layer(l, &mut input, t, None).unwrap();
        }
        let run = model
            .forward_layer_keeping(layer, input.clone(), t)
            .unwrap();
        assert_eq!((run.layer(), run.tokens()), (layer, t));
        let mut plain = input.clone();
        model.forward_layer(layer, &mut plain, t, None).unwrap();
        assert_eq!(run.output(), plain.as_slice(), "{name}: kept run");

        for slot in LinearSlot::ALL {
            let weight = format!("model.layers.{layer}.{}.weight", slot.module());
            let (shape, w) = src.tensor_f32(&weight).unwrap();
            // A different matrix of the same shape: each weight scaled by its own factor.
            let changed: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, &x)| x * (0.5 + (i % 7) as f32 * 0.15))
                .collect();
            let lin = Arc::new(DenseLinear::new(changed, shape[0], shape[1]).unwrap());
            let old = model.set_linear(layer, slot, lin).unwrap();
            let mut whole = input.clone();
            model.forward_layer(layer, &mut whole, t, None).unwrap();
            let mut again = vec![1.0; 3];
            model.forward_layer_from(slot, &run, &mut again).unwrap();
            assert_ne!(
                whole, plain,
                "{name} {slot:?}: the change changes the layer"
            );
            assert_eq!(again, whole, "{name} {slot:?}");
            model.set_linear(layer, slot, old).unwrap();
        }
        // Wrong input sizes and layers are errors.
        assert!(model.forward_layer_keeping(layer, vec![0.0; 5], t).is_err());
        assert!(model.forward_layer_keeping(99, input.clone(), t).is_err());
        runs.push((model, run));
    }
    // A run of one model given to another is an error that says so, not a panic.
    let (qwen, qwen_run) = &runs[0];
    let (llama, llama_run) = &runs[1];
    let mut out = Vec::new();
    for slot in LinearSlot::ALL {
        let e = llama
            .forward_layer_from(slot, qwen_run, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains("another model"), "{e}");
        assert!(qwen.forward_layer_from(slot, llama_run, &mut out).is_err());
    }
}
