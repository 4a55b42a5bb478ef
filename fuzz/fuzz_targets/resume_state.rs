//! Fuzzes `compress --resume` on damaged progress: the calibrated (paper) pipeline and best
//! mode are run once on a tiny Llama with a word-level tokenizer, and their progress
//! directories (`<output>.partial/`: `run.json`, calibration scales, decompositions, level
//! scores, probe numbers) are kept. Each input picks a pipeline and a record, rewrites the
//! record's payload (replaced, overwritten in part, cut or extended) and seals it with a
//! valid CRC, so that the reader meets well-formed records holding anything: the resumed
//! run must finish or fail with an error, never panic. Whatever it writes is loaded and run.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bitstack::best::{compress_best, BestOptions};
use bitstack::calibrate::{compress_calibrated, CalibrationOptions};
use bitstack::compress::CompressOptions;
use bitstack::decompose::PlaneParams;
use bitstack::engine::model_of;
use bitstack::resume::{progress_dir, Checkpointing};
use bitstack::runtime::{LoadedStack, StackFile};
use libfuzzer_sys::fuzz_target;

mod common;
use common::Input;

const MAGIC: &[u8] = b"BSPART01";
const VOCAB: usize = 16;
const HIDDEN: usize = 8;
const INTERMEDIATE: usize = 12;

/// A deterministic pseudo-random stream (the model's weights and the texts).
fn lcg(seed: &mut u64) -> u32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u32
}

/// Writes a one-layer Llama (f32), its `config.json`, a word-level `tokenizer.json` and two
/// texts into `dir`.
fn write_model(dir: &Path) -> Option<()> {
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        ("model.layers.0.input_layernorm.weight".into(), vec![HIDDEN]),
    ];
    for (name, out, inp) in [
        ("self_attn.q_proj", HIDDEN, HIDDEN),
        ("self_attn.k_proj", HIDDEN / 2, HIDDEN),
        ("self_attn.v_proj", HIDDEN / 2, HIDDEN),
        ("self_attn.o_proj", HIDDEN, HIDDEN),
        ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
        ("mlp.up_proj", INTERMEDIATE, HIDDEN),
        ("mlp.down_proj", HIDDEN, INTERMEDIATE),
    ] {
        tensors.push((format!("model.layers.0.{name}.weight"), vec![out, inp]));
    }
    tensors.push((
        "model.layers.0.post_attention_layernorm.weight".into(),
        vec![HIDDEN],
    ));
    tensors.push(("model.norm.weight".into(), vec![HIDDEN]));
    tensors.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    let mut seed = 7u64;
    let mut header = serde_json::Map::new();
    let mut body = Vec::new();
    for (name, shape) in tensors {
        let start = body.len();
        for _ in 0..shape.iter().product::<usize>() {
            let x = if shape.len() == 1 {
                1.0
            } else {
                (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0
            };
            body.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            name,
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, body.len()]}),
        );
    }
    let file = common::safetensors_file(&header, &body);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
    });
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..VOCAB).map(|i| (format!("w{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    let text: String = (0..200)
        .map(|_| format!("w{} ", lcg(&mut seed) as usize % VOCAB))
        .collect();
    std::fs::create_dir_all(dir).ok()?;
    std::fs::write(dir.join("model.safetensors"), file).ok()?;
    std::fs::write(dir.join("config.json"), config.to_string()).ok()?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).ok()?;
    std::fs::write(dir.join("text.txt"), text).ok()
}

/// The two pipelines with checkpointed progress.
#[derive(Clone, Copy)]
enum Pipeline {
    Calibrated,
    Best,
}

fn options(checkpointing: Checkpointing) -> CompressOptions {
    let mut options = CompressOptions::default();
    options.avd.k = 1;
    options.avd.niter = 3;
    options.checkpointing = checkpointing;
    options
}

fn run(pipeline: Pipeline, model: &Path, out: &Path, checkpointing: Checkpointing) -> bool {
    let text = model.join("text.txt");
    let calibration = CalibrationOptions {
        calib_text: text.clone(),
        calib_windows: 2,
        score_text: text,
        score_windows: 2,
        seq: 16,
    };
    match pipeline {
        Pipeline::Calibrated => {
            compress_calibrated(model, out, &options(checkpointing), &calibration, &|_| {
                copy_progress(out)
            })
            .is_ok()
        }
        Pipeline::Best => {
            let best = BestOptions {
                planes: PlaneParams {
                    group: 8,
                    planes: 3,
                },
                probe_planes: 2,
                head_windows: 1,
                ..BestOptions::default()
            };
            compress_best(
                model,
                out,
                &options(checkpointing),
                &best,
                &calibration,
                &|_| copy_progress(out),
            )
            .is_ok()
        }
    }
}

/// The saved progress of the first, uninterrupted run of each pipeline: copied at every
/// progress report, so the last copy holds every record written before the last report.
fn template_of(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".template");
    out.with_file_name(name)
}

fn copy_progress(out: &Path) {
    let from = progress_dir(out);
    let to = template_of(out);
    if !from.is_dir() {
        return;
    }
    let _ = std::fs::create_dir_all(&to);
    if let Ok(entries) = std::fs::read_dir(&from) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with('.') {
                let _ = std::fs::copy(entry.path(), to.join(name));
            }
        }
    }
}

/// Per pipeline: the model directory and the template's records (name, bytes).
struct Setup {
    model: PathBuf,
    templates: Vec<Vec<(String, Vec<u8>)>>,
}

fn setup() -> Option<Setup> {
    let base = common::scratch_dir("resume");
    let _ = std::fs::remove_dir_all(&base);
    let model = base.join("model");
    write_model(&model)?;
    let mut templates = Vec::new();
    for (i, pipeline) in [Pipeline::Calibrated, Pipeline::Best]
        .into_iter()
        .enumerate()
    {
        let out = base.join(format!("first-{i}.bitstack"));
        if !run(pipeline, &model, &out, Checkpointing::Fresh) {
            return None;
        }
        let mut records: Vec<(String, Vec<u8>)> = std::fs::read_dir(template_of(&out))
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                Some((name, std::fs::read(e.path()).ok()?))
            })
            .collect();
        records.sort();
        eprintln!(
            "resume_state: pipeline {i} saved {:?}",
            records.iter().map(|r| &r.0).collect::<Vec<_>>()
        );
        templates.push(records);
    }
    Some(Setup { model, templates })
}

fuzz_target!(|data: &[u8]| {
    static SETUP: OnceLock<Option<Setup>> = OnceLock::new();
    let Some(setup) = SETUP.get_or_init(setup) else {
        panic!("resume_state: the first, uninterrupted runs failed");
    };
    let mut d = Input(data);
    let which = d.byte() as usize % 2;
    let pipeline = [Pipeline::Calibrated, Pipeline::Best][which];
    let records = &setup.templates[which];
    if records.is_empty() {
        return;
    }
    let out = common::scratch_dir("resume").join("resumed.bitstack");
    let _ = std::fs::remove_file(&out);
    let partial = progress_dir(&out);
    let _ = std::fs::remove_dir_all(&partial);
    if std::fs::create_dir_all(&partial).is_err() {
        return;
    }
    let target = d.byte() as usize % records.len();
    let how = d.byte();
    for (i, (name, bytes)) in records.iter().enumerate() {
        let bytes = if i != target {
            bytes.clone()
        } else if name == "run.json" {
            // Not a record: damaged text is refused (or, if still equal, accepted).
            let mut b = bytes.clone();
            let at = d.byte() as usize % b.len().max(1);
            b.truncate(at);
            b.extend_from_slice(d.0);
            b
        } else {
            let payload = bytes
                .get(MAGIC.len()..bytes.len().saturating_sub(4))
                .unwrap_or_default();
            let mut p = payload.to_vec();
            match how % 4 {
                0 => p = d.0.to_vec(),
                1 => {
                    let at = (u16::from(d.byte()) << 8 | u16::from(d.byte())) as usize;
                    let at = at % p.len().max(1);
                    for (j, &b) in d.0.iter().enumerate() {
                        match p.get_mut(at + j) {
                            Some(x) => *x = b,
                            None => p.push(b),
                        }
                    }
                }
                2 => {
                    let at = (u16::from(d.byte()) << 8 | u16::from(d.byte())) as usize;
                    p.truncate(at % p.len().max(1));
                }
                _ => p.extend_from_slice(d.0),
            }
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&p);
            b.extend_from_slice(&crc32(&p).to_le_bytes());
            b
        };
        if std::fs::write(partial.join(name), bytes).is_err() {
            return;
        }
    }
    if run(pipeline, &setup.model, &out, Checkpointing::Resume) {
        if let Ok(file) = StackFile::open(&out) {
            let file = Arc::new(file);
            let max = file.layout().max_memory();
            if let Ok(stack) = LoadedStack::load(file, max) {
                if let Ok(model) = model_of(&Arc::new(stack)) {
                    let tokens = [1u32, 2, 3, 15];
                    let _ = model.forward(&tokens);
                    let _ = model.window_nll(&tokens);
                }
            }
        }
    }
});

/// CRC-32 (IEEE), as the progress records carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}
