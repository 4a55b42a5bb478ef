//! Bad input never loses anything: every broken container, budget, checkpoint, calibration
//! text or output path gives a clear error naming the problem (and what to do), a non-zero
//! exit status, no panic and no (partially written) output. docs/BAD_INPUT.md lists every
//! case with the message the user sees.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("fixtures/tiny-qwen2")
}

fn calib() -> PathBuf {
    root().join("fixtures/data/calib.txt")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitstack"))
        .args(args)
        .output()
        .expect("run bitstack")
}

/// Runs `bitstack args`, which must fail cleanly; returns its stderr.
fn fails(args: &[&str]) -> String {
    check_failure(args, run(args))
}

fn check_failure(args: &[&str], out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "bitstack {args:?} should fail; stderr:\n{stderr}"
    );
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "bitstack {args:?} must exit with a non-zero code, not a signal: {:?}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains("error: "), "no error line: {stderr}");
    stderr
}

/// Runs `bitstack args`, which must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "bitstack {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn has_all(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in:\n{text}");
    }
}

/// Neither `path` nor a temporary file of it (`.<name>.tmp-*`, left by an interrupted
/// atomic write) exists.
fn assert_no_output(path: &Path) {
    assert!(!path.exists(), "{} must not exist", path.display());
    let name = path.file_name().unwrap().to_str().unwrap();
    if let Ok(entries) = std::fs::read_dir(path.parent().unwrap()) {
        for e in entries {
            let other = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !other.starts_with(&format!(".{name}.tmp-")),
                "temporary file {other} left behind"
            );
        }
    }
}

/// Compresses the tiny model data-free and fast (k = 1, 2 blocks per matrix).
fn tiny_container(dir: &Path) -> PathBuf {
    let out = dir.join("tiny.bitstack");
    ok(&[
        "compress",
        s(&tiny()),
        "-o",
        s(&out),
        "--k",
        "1",
        "--niter",
        "2",
        "--no-calibration",
    ]);
    out
}

/// Compress arguments of a fast data-free run of `model` into `out`.
fn compress_args<'a>(model: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "compress",
        s(model),
        "-o",
        s(out),
        "--k",
        "1",
        "--niter",
        "1",
        "--no-calibration",
    ]
}

/// Compresses `model`, which must fail cleanly without writing `out`; returns stderr.
fn compress_fails(model: &Path, out: &Path) -> String {
    let e = fails(&compress_args(model, out));
    assert_no_output(out);
    e
}

/// A copy of the tiny model in `dir/model`, without the files in `skip`.
fn tiny_copy(dir: &Path, skip: &[&str]) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&path, out.join(&name)).unwrap();
        }
    }
    out
}

/// One tensor to write: name, dtype, shape, bytes.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// The tensors of the tiny model, in file order.
fn tiny_tensors() -> Vec<Tensor> {
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A copy of the tiny model whose weights are `edit`ed.
fn tiny_with_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) -> PathBuf {
    let model = tiny_copy(dir, &["model.safetensors"]);
    let mut tensors = tiny_tensors();
    edit(&mut tensors);
    write_safetensors(&model.join("model.safetensors"), &tensors);
    model
}

fn tensor<'a>(tensors: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    tensors.iter_mut().find(|t| t.0 == name).unwrap()
}

// ---------------------------------------------------------------------------------------
// Containers: truncated and corrupted.

/// A container's pieces: header length, header JSON, parsed manifest, data start.
struct Parsed {
    header: Value,
    manifest: Value,
    data_start: usize,
}

fn parse(bytes: &[u8]) -> Parsed {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let manifest: Value = serde_json::from_str(
        header["__metadata__"]["bitstack.manifest"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    Parsed {
        header,
        manifest,
        data_start: 8 + n,
    }
}

/// The container with its header replaced (re-padded; data unchanged).
fn with_header(bytes: &[u8], header: &Value) -> Vec<u8> {
    let p = parse(bytes);
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[p.data_start..]);
    out
}

/// CRC-32 (IEEE), as the container's checksums.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn truncated_container() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_container(dir.path());
    let bytes = std::fs::read(&file).unwrap();
    let p = parse(&bytes);
    let fixed = p.manifest["fixed_bytes"].as_u64().unwrap() as usize;
    let cut = dir.path().join("cut.bitstack");
    let write = |len: usize| std::fs::write(&cut, &bytes[..len]).unwrap();

    // Inside the 8-byte header length.
    write(3);
    let e = fails(&["inspect", s(&cut)]);
    has_all(&e, &["cut.bitstack", "only 3 bytes are present", "again"]);

    // Inside the JSON header, before the manifest.
    write(40);
    let e = fails(&["inspect", s(&cut)]);
    has_all(
        &e,
        &["cut.bitstack", "truncated inside the header", "again"],
    );

    // Inside the manifest (a string of the header).
    let manifest_at = find(&bytes, b"\"bitstack.manifest\"");
    write(manifest_at + 300);
    let e = fails(&["inspect", s(&cut)]);
    has_all(&e, &["cut.bitstack", "truncated inside the header"]);

    // Inside the fixed part: every command refuses, export writes nothing.
    write(p.data_start + fixed / 2);
    let e = fails(&["inspect", s(&cut)]);
    has_all(
        &e,
        &["cut.bitstack", "truncated inside the fixed part", "again"],
    );
    let e = fails(&["plan", s(&cut), "--budget", "1GB"]);
    has_all(&e, &["truncated inside the fixed part"]);
    let export = dir.path().join("export");
    let e = fails(&["export", s(&cut), "--budget", "1GB", "-o", s(&export)]);
    has_all(&e, &["truncated inside the fixed part"]);
    assert_no_output(&export);

    // Inside a block: the complete prefix of the stack opens; asking for more than it holds
    // is an error that says so, and writes nothing.
    let block = &p.manifest["blocks"][40];
    let end = p.data_start
        + (block["offset"].as_u64().unwrap() + block["length"].as_u64().unwrap() / 2) as usize;
    write(end);
    let info: Value = serde_json::from_str(&ok(&["inspect", s(&cut), "--json"])).unwrap();
    assert_eq!(info["complete"], false);
    assert_eq!(info["blocks"], 40);
    assert!(info["missing_bytes"].as_u64().unwrap() > 0);
    let e = fails(&["export", s(&cut), "--budget", "1GB", "-o", s(&export)]);
    has_all(
        &e,
        &[
            "more bytes of blocks than the file holds",
            "finish the download",
        ],
    );
    assert_no_output(&export);
    // ... while a budget within what is there works.
    let max = info["max_memory_bytes"].as_u64().unwrap().to_string();
    ok(&["export", s(&cut), "--budget", &max, "-o", s(&export)]);
}

#[test]
fn corrupted_container() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_container(dir.path());
    let bytes = std::fs::read(&file).unwrap();
    let p = parse(&bytes);
    let bad = dir.path().join("bad.bitstack");
    let export = dir.path().join("export");
    let check = |broken: Vec<u8>, expected: &[&str]| {
        std::fs::write(&bad, broken).unwrap();
        let e = fails(&["inspect", s(&bad)]);
        has_all(&e, &["bad.bitstack"]);
        has_all(&e, expected);
        let e = fails(&["export", s(&bad), "--budget", "1GB", "-o", s(&export)]);
        has_all(&e, expected);
        assert_no_output(&export);
    };

    // The format tag ("magic") of the header.
    let mut b = bytes.clone();
    let at = find(&b, b"\"format\":\"bitstack\"") + 10;
    b[at..at + 8].copy_from_slice(b"notbitst");
    check(b, &["not a bitstack container", "not a .bitstack file"]);

    // The header length.
    let mut b = bytes.clone();
    b[..8].copy_from_slice(b"BITSTACK");
    check(b, &["more than the limit", "not a .bitstack file"]);

    // One byte of the manifest: its checksum catches it.
    let mut b = bytes.clone();
    let at = find(&b, br#"\"matrices\""#) + 3;
    b[at] = b'X';
    check(
        b,
        &["manifest checksum mismatch", "damaged", "download or copy"],
    );

    // A manifest that is not JSON (checksum re-stamped to match).
    let mut header = p.header.clone();
    let text = header["__metadata__"]["bitstack.manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let cut = &text[..text.len() / 2];
    header["__metadata__"]["bitstack.manifest"] = cut.into();
    header["__metadata__"]["bitstack.manifest.crc32"] =
        format!("{:08x}", crc32(cut.as_bytes())).into();
    check(
        with_header(&bytes, &header),
        &["invalid manifest", "bad JSON", "damaged"],
    );

    // A byte of the fixed part.
    let mut b = bytes.clone();
    let fixed = p.manifest["fixed_bytes"].as_u64().unwrap() as usize;
    b[p.data_start + fixed / 2] ^= 0xff;
    check(b, &["fixed part checksum mismatch", "damaged"]);

    // A byte of a block: the file opens (blocks are checked when loaded), loading the
    // block fails naming it, and nothing is exported.
    let mut b = bytes.clone();
    let block = &p.manifest["blocks"][40];
    b[p.data_start + block["offset"].as_u64().unwrap() as usize + 5] ^= 0xff;
    std::fs::write(&bad, b).unwrap();
    ok(&["inspect", s(&bad)]);
    let e = fails(&["export", s(&bad), "--budget", "1GB", "-o", s(&export)]);
    has_all(
        &e,
        &[
            "bad.bitstack: block 40 (",
            "checksum mismatch",
            "damaged",
            "download or copy",
        ],
    );
    assert_no_output(&export);
    // A budget that stops before the damaged block still loads.
    let info: Value = serde_json::from_str(&ok(&["inspect", s(&bad), "--json"])).unwrap();
    let min = info["min_memory_bytes"].as_u64().unwrap().to_string();
    ok(&["export", s(&bad), "--budget", &min, "-o", s(&export)]);
}

#[test]
fn bad_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_container(dir.path());
    let f = s(&file);
    let export = dir.path().join("export");
    for budget in ["1kB", "0"] {
        let e = fails(&["plan", f, "--budget", budget]);
        has_all(&e, &["is below the minimum of", "the base model"]);
        let e = fails(&["export", f, "--budget", budget, "-o", s(&export)]);
        has_all(&e, &["is below the minimum of"]);
        assert_no_output(&export);
    }
    for budget in ["lots", "12XB", "MB", ""] {
        let e = fails(&["plan", f, "--budget", budget]);
        has_all(&e, &["--budget", "cannot read size", "examples: 30MB"]);
        let e = fails(&["export", f, "--budget", budget, "-o", s(&export)]);
        has_all(&e, &["cannot read size"]);
        assert_no_output(&export);
    }
}

// ---------------------------------------------------------------------------------------
// Checkpoints: config.json, tokenizer.json, safetensors.

#[test]
fn missing_or_malformed_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let model = tiny_copy(dir.path(), &["config.json"]);
    let e = compress_fails(&model, &out);
    has_all(&e, &["config.json", "--include"]);

    std::fs::write(
        model.join("config.json"),
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256,"#,
    )
    .unwrap();
    let e = compress_fails(&model, &out);
    has_all(&e, &["config.json", "not valid JSON"]);

    let mut config: Value =
        serde_json::from_slice(&std::fs::read(tiny().join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let e = compress_fails(&model, &out);
    has_all(
        &e,
        &[
            "config.json",
            "missing `hidden_size`",
            "Hugging Face config",
        ],
    );
    // The calibrated mode says the same.
    let e = fails(&["compress", s(&model), "-o", s(&out), "--calib", s(&calib())]);
    has_all(&e, &["config.json", "missing `hidden_size`"]);
    assert_no_output(&out);

    // A key of the wrong type.
    config["num_hidden_layers"] = "four".into();
    config["hidden_size"] = 256.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let e = compress_fails(&model, &out);
    has_all(&e, &["config.json", "`num_hidden_layers`", "\"four\""]);
}

#[test]
fn missing_or_malformed_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let model = tiny_copy(dir.path(), &["tokenizer.json"]);
    // Data-free compression does not need it; the file then says what is missing when a
    // tokenizer is needed.
    ok(&compress_args(&model, &out));
    let valid = root().join("fixtures/data/valid.txt");
    let e = fails(&[
        "eval",
        s(&out),
        "--text",
        s(&valid),
        "--windows",
        "1",
        "--seq",
        "16",
    ]);
    has_all(
        &e,
        &["carries no tokenizer.json", "compress from a directory"],
    );
    std::fs::remove_file(&out).unwrap();
    // The calibrated mode needs it.
    let e = fails(&["compress", s(&model), "-o", s(&out), "--calib", s(&calib())]);
    has_all(&e, &["tokenizer.json", "file not found"]);
    assert_no_output(&out);

    // Malformed: not JSON, and JSON that is not a tokenizer. Both modes refuse it.
    for text in [
        r#"{"version": "1.0", "model": {"type": "BPE""#,
        r#"{"version": "1.0", "model": {"type": "Nope"}}"#,
        "[]",
        // The tokenizers crate panics on these two (found by fuzzing): caught, no panic.
        r#"{"version":"1.0","decoder":{"type":"ByteLevel","use_regex":fa"pattern"}}"#,
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":{"type":"Precompiled","precompiled_charsmap":"!!"},
            "pre_tokenizer":null,"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#,
    ] {
        std::fs::write(model.join("tokenizer.json"), text).unwrap();
        let e = compress_fails(&model, &out);
        has_all(
            &e,
            &["tokenizer.json", "cannot parse", "original tokenizer.json"],
        );
        let e = fails(&["compress", s(&model), "-o", s(&out), "--calib", s(&calib())]);
        has_all(&e, &["tokenizer.json", "cannot parse"]);
        assert_no_output(&out);
    }
}

#[test]
fn missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let model = tiny_copy(dir.path(), &["model.safetensors"]);
    let tensors = tiny_tensors();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (part, name) in [first, second].iter().zip(names) {
        for t in *part {
            weight_map.insert(t.0.clone(), name.into());
        }
    }
    std::fs::write(
        model.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    write_safetensors(&model.join(names[0]), first);
    // The second shard is absent.
    let e = compress_fails(&model, &out);
    has_all(
        &e,
        &[
            "model.safetensors.index.json",
            "missing",
            names[1],
            "download",
        ],
    );
    let e = fails(&["compress", s(&model), "-o", s(&out), "--calib", s(&calib())]);
    has_all(&e, &[names[1]]);
    assert_no_output(&out);
    // Present, but not the shard the index describes.
    write_safetensors(&model.join(names[1]), &second[1..]);
    let e = compress_fails(&model, &out);
    has_all(&e, &[&second[0].0, names[1], "does not match the index"]);
    // Complete: compresses.
    write_safetensors(&model.join(names[1]), second);
    ok(&compress_args(&model, &out));
}

#[test]
fn truncated_or_malformed_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let model = tiny_copy(dir.path(), &[]);
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    for broken in [
        &bytes[..bytes.len() / 2],
        &bytes[..100],
        &bytes[..5],
        b"this is not a safetensors file",
    ] {
        std::fs::write(model.join("model.safetensors"), broken).unwrap();
        let e = compress_fails(&model, &out);
        has_all(
            &e,
            &[
                "model.safetensors",
                "not a valid safetensors file",
                "download or copy it again",
            ],
        );
    }
}

#[test]
fn tensor_with_wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let name = "model.layers.1.self_attn.q_proj.weight";
    let model = tiny_with_tensors(dir.path(), |t| {
        let q = tensor(t, name);
        q.2 = vec![128, 256];
        q.3.truncate(128 * 256 * 2);
    });
    let e = compress_fails(&model, &out);
    has_all(
        &e,
        &[
            name,
            "[128, 256]",
            "config.json implies [256, 256]",
            "do not match config.json",
        ],
    );
    let e = fails(&["compress", s(&model), "-o", s(&out), "--calib", s(&calib())]);
    has_all(&e, &[name, "[128, 256]"]);
    assert_no_output(&out);

    // A tensor the config needs is absent.
    let dir = tempfile::tempdir().unwrap();
    let norm = "model.layers.2.post_attention_layernorm.weight";
    let model = tiny_with_tensors(dir.path(), |t| t.retain(|x| x.0 != norm));
    let e = compress_fails(&model, &out);
    has_all(&e, &[norm, "is missing", "config.json"]);
}

#[test]
fn tensor_with_unsupported_dtype() {
    let name = "model.layers.1.mlp.up_proj.weight";
    for (dtype, shape, label) in [
        (Dtype::I32, vec![768, 128], "I32"),
        (Dtype::F64, vec![768, 64], "F64"),
        (Dtype::I8, vec![768, 512], "I8"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.bitstack");
        let model = tiny_with_tensors(dir.path(), |t| {
            let w = tensor(t, name);
            w.1 = dtype;
            w.2 = shape;
        });
        let e = compress_fails(&model, &out);
        has_all(
            &e,
            &[
                name,
                &format!("dtype {label}"),
                "F16, BF16 and F32",
                "convert",
            ],
        );
    }
}

#[test]
fn non_finite_fixed_tensor_is_refused() {
    // (A NaN in a stacked matrix: cli.rs, non_finite_weights_are_refused.)
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let name = "model.norm.weight";
    let model = tiny_with_tensors(dir.path(), |t| {
        tensor(t, name).3[6..8].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    });
    let e = compress_fails(&model, &out);
    has_all(
        &e,
        &[name, "non-finite value (inf) at flat index 3", "NaN/Inf"],
    );
}

// ---------------------------------------------------------------------------------------
// Calibration text.

#[test]
fn empty_or_missing_calibration_text() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = fails(&["compress", s(&tiny()), "-o", s(&out), "--calib", s(&empty)]);
    has_all(
        &e,
        &[
            "empty.txt",
            "0 tokens",
            "calibration windows",
            "use a longer text or fewer windows",
        ],
    );
    assert_no_output(&out);
    // The scoring text is checked the same way.
    let (model, text) = (tiny(), calib());
    let score_fails = |score: &Path| {
        let e = fails(&[
            "compress",
            s(&model),
            "-o",
            s(&out),
            "--calib",
            s(&text),
            "--calib-windows",
            "1",
            "--score",
            s(score),
        ]);
        assert_no_output(&out);
        e
    };
    has_all(&score_fails(&empty), &["empty.txt", "scoring windows"]);
    let absent = dir.path().join("absent.txt");
    let e = fails(&["compress", s(&tiny()), "-o", s(&out), "--calib", s(&absent)]);
    has_all(&e, &["absent.txt", "No such file"]);
    assert_no_output(&out);
    // Not UTF-8: Latin-1 text (byte 9 is `é`), and the start of a binary file.
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"Hello caf\xe9 world").unwrap();
    let e = fails(&["compress", s(&tiny()), "-o", s(&out), "--calib", s(&latin1)]);
    has_all(
        &e,
        &[
            "latin1.txt: the calibration text is not UTF-8",
            "offset 9 of 16",
            "plain-text file in UTF-8",
        ],
    );
    assert_no_output(&out);
    let binary = dir.path().join("weights.txt");
    let head = std::fs::read(tiny().join("model.safetensors")).unwrap();
    std::fs::write(&binary, &head[..4096]).unwrap();
    has_all(
        &score_fails(&binary),
        &["weights.txt: the scoring text is not UTF-8", "of 4096"],
    );
    // `eval` reads its text the same way.
    let stack = tiny_container(dir.path());
    let e = fails(&["eval", s(&stack), "--text", s(&latin1)]);
    has_all(
        &e,
        &["latin1.txt: the evaluation text is not UTF-8", "offset 9"],
    );
}

/// A block count whose blocks cannot fit in memory is refused before any work (it used to
/// run until memory ran out), in both modes; so are ranks no matrix can take.
#[test]
fn impossible_decomposition_parameters_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let (model, text) = (tiny(), calib());
    for mode in [vec!["--no-calibration"], vec!["--calib", s(&text)]] {
        let mut args = vec!["compress", s(&model), "-o", s(&out)];
        args.extend(mode.iter().copied());
        let mut absurd = args.clone();
        absurd.extend(["--k", "1", "--niter", "100000000"]);
        let e = fails(&absurd);
        has_all(
            &e,
            &[
                "into 100000000 blocks of rank 1 needs about",
                "GiB is available",
                "fewer blocks per matrix (--niter)",
            ],
        );
        assert_no_output(&out);
        let mut rank = args.clone();
        rank.extend(["--k", "0"]);
        has_all(&fails(&rank), &["rank k = 0 is invalid", "need 1 ≤ k ≤"]);
        assert_no_output(&out);
    }
}

/// Window counts and lengths are checked against the model before any work, in `compress`
/// (both modes) and `eval`; `generate` stops where the model's context ends.
#[test]
fn windows_must_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bitstack");
    let (model, text) = (tiny(), calib());
    let context = "context of 1024 tokens (max_position_embeddings in config.json)";
    for mode in ["paper", "best"] {
        for (extra, message) in [
            (
                ["--calib-windows", "0"],
                "--calib-windows 0: at least one window",
            ),
            (
                ["--score-windows", "0"],
                "--score-windows 0: at least one window",
            ),
            (["--seq", "1"], "--seq 1: a window needs at least 2 tokens"),
            (["--seq", "1025"], "--seq 1025 is longer than the model's"),
        ] {
            let mut args = vec!["compress", s(&model), "-o", s(&out), "--mode", mode];
            args.extend(["--calib", s(&text)]);
            args.extend(extra);
            let e = fails(&args);
            has_all(&e, &[message]);
            if extra[1] == "1025" {
                has_all(&e, &[context, "use --seq 1024 or less"]);
            }
            assert_no_output(&out);
            assert!(!dir.path().join("x.bitstack.partial").exists(), "{extra:?}");
        }
    }
    let stack = tiny_container(dir.path());
    let test = root().join("fixtures/data/test.txt");
    for target in [s(&stack), s(&model)] {
        let e = fails(&["eval", target, "--text", s(&test), "--seq", "1025"]);
        has_all(&e, &["--seq 1025 is longer than the model's", context]);
        let e = fails(&["eval", target, "--text", s(&test), "--seq", "1"]);
        has_all(&e, &["--seq 1: a window needs at least 2 tokens"]);
        let e = fails(&["eval", target, "--text", s(&test), "--windows", "0"]);
        has_all(&e, &["--windows 0: at least one window is needed"]);
    }
    let e = fails(&["eval", s(&stack), "--text", s(&test), "--sweep", "0"]);
    has_all(&e, &["--sweep 0: at least one budget is needed"]);
    // A prompt and 2000 new tokens do not fit in 1024 positions: generation stops at the
    // end of the context and says so.
    let out = run(&[
        "generate",
        s(&stack),
        "--prompt",
        "Ownership is",
        "--max-tokens",
        "2000",
        "--seed",
        "1",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fill the model's context of 1024 tokens"),
        "{stderr}"
    );
    let prompt = stderr
        .lines()
        .find_map(|l| {
            let rest = l.split(": prompt ").nth(1)?;
            rest.split(' ').next()?.parse::<usize>().ok()
        })
        .unwrap();
    assert!(
        stderr.contains(&format!("[{} tokens in", 1024 - prompt)),
        "{stderr}"
    );
    // A prompt that fills the context alone is refused.
    let long = "Ownership is ".repeat(600);
    let e = fails(&["generate", s(&stack), "--prompt", &long]);
    has_all(
        &e,
        &["the model's context is 1024 tokens", "no room to generate"],
    );
}

/// Sampling options outside their range are refused (the sampler would clamp `--top-p` and
/// treat a NaN temperature as a temperature), and the edges of the ranges are accepted.
#[test]
fn sampling_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let stack = tiny_container(dir.path());
    let base = ["generate", s(&stack), "--prompt", "Hi", "--max-tokens", "2"];
    for (option, value, message) in [
        ("--top-p", "2", "is not a nucleus mass"),
        ("--top-p", "0", "is not a nucleus mass"),
        ("--top-p", "nan", "is not a nucleus mass"),
        ("--temperature", "nan", "is not a temperature"),
        ("--temperature", "inf", "is not a temperature"),
        ("--temperature", "-0.5", "is not a temperature"),
    ] {
        let flag = format!("{option}={value}");
        let mut args = base.to_vec();
        args.push(&flag);
        has_all(&fails(&args), &[message, option]);
    }
    for extra in [["--top-p", "1"], ["--temperature", "0"]] {
        let mut args = base.to_vec();
        args.extend(extra);
        assert!(run(&args).status.success(), "{extra:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Output paths.

#[test]
fn output_in_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/out.bitstack");
    let e = compress_fails(&tiny(), &out);
    has_all(&e, &["no/such/dir/out.bitstack"]);
    assert!(!dir.path().join("no").exists(), "directories were created");
}

#[test]
fn output_under_a_regular_file() {
    // Fails for root too (unlike a read-only directory).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("out.bitstack");
    let e = compress_fails(&tiny(), &out);
    has_all(&e, &["file.txt/out.bitstack", "Not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    let container = tiny_container(dir.path());
    let export = file.join("export");
    let e = fails(&["export", s(&container), "--budget", "1GB", "-o", s(&export)]);
    has_all(&e, &["file.txt/export", "Not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // `-o` naming the file itself.
    let e = fails(&["export", s(&container), "--budget", "1GB", "-o", s(&file)]);
    has_all(&e, &["file.txt exists and is not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

/// Every command that reads a .bitstack file, given a model directory, says that it is a
/// directory (it said "cannot memory-map: No such device"); and where a model directory is
/// read, a file says that it is a file (it said "Not a directory" of a path inside it).
#[test]
fn directories_and_files_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny();
    let weights = model.join("model.safetensors");
    let out = dir.path().join("x.bitstack");
    let text = calib();
    let is_a_file = "model.safetensors is a file, not a model directory";
    for mode in [vec!["--no-calibration"], vec!["--calib", s(&text)]] {
        let mut args = vec!["compress", s(&weights), "-o", s(&out)];
        args.extend(mode);
        has_all(&fails(&args), &[is_a_file, "holds config.json"]);
        assert_no_output(&out);
    }
    let stack = tiny_container(dir.path());
    let test = root().join("fixtures/data/test.txt");
    let e = fails(&[
        "eval",
        s(&stack),
        "--text",
        s(&test),
        "--sweep",
        "2",
        "--original",
        s(&stack),
    ]);
    has_all(&e, &["tiny.bitstack is a file, not a model directory"]);
    for args in [
        vec!["inspect", s(&model)],
        vec!["plan", s(&model), "--budget", "6MB"],
        vec!["generate", s(&model), "--prompt", "Hi"],
    ] {
        let e = fails(&args);
        has_all(
            &e,
            &[
                "tiny-qwen2 is a directory, not a .bitstack file",
                "bitstack compress",
            ],
        );
    }
}

/// `compress -o` naming one of the model's own files is refused (the atomic rename would
/// replace it); a .bitstack file beside them is fine.
#[test]
fn compress_never_writes_over_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_copy(dir.path(), &[]);
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    for name in ["model.safetensors", "config.json"] {
        let out = model.join(name);
        let e = fails(&compress_args(&model, &out));
        has_all(
            &e,
            &[
                &format!("{name} is a file of the model being compressed"),
                "write the .bitstack file elsewhere",
            ],
        );
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    let beside = model.join("beside.bitstack");
    ok(&compress_args(&model, &beside));
    assert!(beside.exists());
}

/// `export` writes a new checkpoint directory, never over files: not into the original
/// model's directory (whose weights it would replace), not over an earlier export; an
/// existing empty directory is fine.
#[test]
fn export_never_overwrites_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let container = tiny_container(dir.path());
    let model = tiny_copy(dir.path(), &[]);
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let e = fails(&["export", s(&container), "--budget", "5MB", "-o", s(&model)]);
    has_all(
        &e,
        &[
            "exists and is not empty",
            "does not overwrite files",
            "choose another -o",
        ],
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&["export", s(&container), "--budget", "5MB", "-o", s(&empty)]);
    let exported = std::fs::read(empty.join("model.safetensors")).unwrap();
    let e = fails(&["export", s(&container), "--budget", "1GB", "-o", s(&empty)]);
    has_all(&e, &["exists and is not empty"]);
    assert_eq!(
        std::fs::read(empty.join("model.safetensors")).unwrap(),
        exported
    );
}

#[cfg(unix)]
#[test]
fn output_in_a_read_only_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::File::create(ro.join("probe")).is_ok() {
        // Root ignores permissions: output_under_a_regular_file covers a path no one can
        // write.
        std::fs::remove_file(ro.join("probe")).unwrap();
        eprintln!("running as root: read-only directory not enforced, skipping");
        return;
    }
    let out = ro.join("out.bitstack");
    let e = compress_fails(&tiny(), &out);
    has_all(&e, &["ro/out.bitstack", "Permission denied"]);
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

/// Disk full while the container is written, simulated with a file size limit (`ulimit
/// -f`, SIGXFSZ ignored so that the write fails with EFBIG instead of killing the process):
/// the same write path as a full disk (ENOSPC), checked on the real binary.
#[cfg(target_os = "linux")]
#[test]
fn disk_full_while_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.bitstack");
    let model = tiny();
    let mut args = compress_args(&model, &out);
    args.remove(0);
    let output = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2048 && exec \"$0\" compress \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bitstack"))
        .args(&args)
        .output()
        .expect("run sh");
    let e = check_failure(&args, output);
    has_all(&e, &["out.bitstack", "cannot write", "File too large"]);
    assert_no_output(&out);
}
