//! Which tensors of a checkpoint are stacked, and in which (module) order.

use globset::{Glob, GlobSetBuilder};

use crate::checkpoint::Checkpoint;
use crate::Error;

/// Architectures whose decoder linears are stacked by default.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] =
    ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// The decoder linears of one layer, in the reference's module order.
pub const DECODER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Sort key of a tensor name in module order: decoder linears by (layer, linear); anything
/// else after them, by name with numbers compared as numbers.
fn module_key(name: &str) -> (u8, Vec<(String, u64)>) {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((layer, linear)) = rest.split_once('.') {
            if let (Ok(layer), Some(pos)) = (
                layer.parse::<u64>(),
                DECODER_LINEARS
                    .iter()
                    .position(|l| linear == format!("{l}.weight")),
            ) {
                return (0, vec![(String::new(), layer), (String::new(), pos as u64)]);
            }
        }
    }
    (1, natural_key(name))
}

fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut digits = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            if !digits.is_empty() {
                key.push((
                    std::mem::take(&mut text),
                    digits.parse().unwrap_or(u64::MAX),
                ));
                digits.clear();
            }
            text.push(c);
        }
    }
    key.push((text, digits.parse().unwrap_or(0)));
    key
}

/// Sorts tensor names in module order (layer 0 q, k, v, o, gate, up, down, then layer 1, …).
pub fn sort_module_order(names: &mut [String]) {
    names.sort_by_cached_key(|n| module_key(n));
}

/// The 2-D tensors to stack.
///
/// Without `include` globs: the decoder linears of a supported architecture (config.json's
/// `architectures[0]`); an unsupported or unknown architecture is an error that suggests
/// `--include`. With globs: every 2-D tensor whose name matches one of them.
///
/// With the `model` feature, the files a compressed model needs later are checked first:
/// without globs, config.json must describe the weights ([`Checkpoint::check_config`]); a
/// tokenizer.json, when present, must parse ([`Checkpoint::check_tokenizer`]).
pub fn select_matrices(
    checkpoint: &Checkpoint,
    architecture: Option<&str>,
    include: &[String],
) -> Result<Vec<String>, Error> {
    let mut names: Vec<String> = if include.is_empty() {
        match architecture {
            Some(a) if SUPPORTED_ARCHITECTURES.contains(&a) => {}
            Some(a) => {
                return Err(Error::Unsupported(format!(
                    "architecture {a} is not supported (supported: {}); choose the tensors to \
                     stack with --include GLOB",
                    SUPPORTED_ARCHITECTURES.join(", ")
                )))
            }
            None => {
                return Err(Error::Unsupported(
                    "the checkpoint has no config.json with an `architectures` entry; choose \
                     the tensors to stack with --include GLOB"
                        .to_string(),
                ))
            }
        }
        // The model config must describe these weights (else the compressed file could not
        // be evaluated): checked now rather than after hours of compression.
        #[cfg(feature = "model")]
        checkpoint.check_config()?;
        checkpoint
            .tensors()
            .keys()
            .filter(|n| module_key(n).0 == 0)
            .cloned()
            .collect()
    } else {
        let mut builder = GlobSetBuilder::new();
        for pattern in include {
            let glob = Glob::new(pattern)
                .map_err(|e| Error::Usage(format!("--include {pattern:?}: {e}")))?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| Error::Usage(format!("--include: {e}")))?;
        checkpoint
            .tensors()
            .iter()
            .filter(|(n, info)| set.is_match(n.as_str()) && info.shape.len() == 2)
            .map(|(n, _)| n.clone())
            .collect()
    };
    #[cfg(feature = "model")]
    checkpoint.check_tokenizer()?;
    if names.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no 2-D tensor to stack{}",
            checkpoint.dir().display(),
            if include.is_empty() {
                String::new()
            } else {
                format!(" matches --include {}", include.join(", "))
            }
        )));
    }
    for name in &names {
        let info = checkpoint.info(name)?;
        if info.shape.len() != 2 || info.shape[0] == 0 || info.shape[1] == 0 {
            return Err(Error::Checkpoint(format!(
                "tensor {name} has shape {:?}; a stacked matrix must be 2-D and non-empty",
                info.shape
            )));
        }
    }
    sort_module_order(&mut names);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_order() {
        let mut names: Vec<String> = [
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.self_attn.v_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "encoder.layer.10.x",
            "encoder.layer.9.x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sort_module_order(&mut names);
        assert_eq!(
            names,
            vec![
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.2.self_attn.v_proj.weight",
                "model.layers.2.mlp.down_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "encoder.layer.9.x",
                "encoder.layer.10.x",
            ]
        );
    }
}
