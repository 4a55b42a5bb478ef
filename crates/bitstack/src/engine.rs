//! Wiring the runtime into the transformer: a loaded stack as a [`CausalLm`].

use std::sync::Arc;

use bitstack_model::{
    CausalLm, HalfKind, HalfMatrix, Linear, ModelConfig, ModelError, RowLookup, TensorSource,
    TextTokenizer,
};
use bitstack_runtime::LoadedStack;

use crate::Error;

/// One stacked matrix of a [`LoadedStack`] as a model [`Linear`]: one token uses the packed
/// matrix-vector product, several tokens the batch path.
#[derive(Debug, Clone)]
pub struct StackLinear {
    stack: Arc<LoadedStack>,
    matrix: usize,
    rows: usize,
    cols: usize,
}

impl StackLinear {
    /// The linear of matrix `matrix` of `stack`.
    pub fn new(stack: Arc<LoadedStack>, matrix: usize) -> Self {
        let (rows, cols) = stack.file().shape(matrix);
        Self {
            stack,
            matrix,
            rows,
            cols,
        }
    }
}

impl Linear for StackLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], tokens: usize, y: &mut [f32]) {
        self.stack.matmul(self.matrix, x, tokens, y);
    }

    fn token_steps_limit(&self) -> usize {
        self.stack.token_steps_limit(self.matrix)
    }
}

/// One stacked matrix of a [`LoadedStack`] as rows rebuilt on demand (a stacked embedding
/// table: a token lookup reconstructs only its row).
#[derive(Debug, Clone)]
pub struct StackRows {
    stack: Arc<LoadedStack>,
    matrix: usize,
}

impl RowLookup for StackRows {
    fn rows(&self) -> usize {
        self.stack.file().shape(self.matrix).0
    }

    fn cols(&self) -> usize {
        self.stack.file().shape(self.matrix).1
    }

    fn row_into(&self, row: usize, out: &mut [f32]) {
        self.stack.row_into(self.matrix, row, out);
    }
}

/// The fixed tensors of a loaded stack as a model [`TensorSource`].
pub struct StackTensors<'a>(pub &'a Arc<LoadedStack>);

impl TensorSource for StackTensors<'_> {
    /// Stacked matrices (e.g. the embedding table in `--mode best`) are rebuilt per row.
    fn tensor_rows(&self, name: &str) -> Option<Arc<dyn RowLookup>> {
        let matrix = self.0.file().matrix_index(name)?;
        Some(Arc::new(StackRows {
            stack: self.0.clone(),
            matrix,
        }))
    }

    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let tensor = self
            .0
            .fixed(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let values = tensor.to_f32().ok_or_else(|| ModelError::MissingTensor {
            name: format!("{name} (stored as {}, not a float)", tensor.dtype),
        })?;
        Ok((tensor.shape.clone(), values))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.fixed(name).is_some()
    }

    fn names(&self) -> Vec<String> {
        self.0.fixed_names().map(str::to_string).collect()
    }

    /// 16-bit 2-D tensors (embeddings, lm_head) are shared with the stack, not widened.
    fn tensor_half(&self, name: &str) -> Option<HalfMatrix> {
        let t = self.0.fixed(name)?;
        let kind = match t.dtype.as_str() {
            "F16" => HalfKind::F16,
            "BF16" => HalfKind::Bf16,
            _ => return None,
        };
        let [rows, cols] = t.shape[..] else {
            return None;
        };
        HalfMatrix::new(kind, rows, cols, t.bytes.clone()).ok()
    }
}

/// The model configuration carried inside the container (`config.json`).
pub fn config_of(stack: &LoadedStack) -> Result<ModelConfig, Error> {
    let bytes = stack
        .file()
        .container()
        .aux_file("config.json")
        .ok_or_else(|| {
            Error::Unsupported(
                "this .bitstack file carries no config.json: it was compressed from a checkpoint \
             without one (e.g. with --include) and cannot run as a language model"
                    .to_string(),
            )
        })?;
    Ok(ModelConfig::from_json_bytes(
        bytes,
        format!("{}#config.json", stack.file().container().name()),
    )?)
}

/// The tokenizer carried inside the container (`tokenizer.json`).
pub fn tokenizer_of(stack: &LoadedStack) -> Result<TextTokenizer, Error> {
    let bytes = stack
        .file()
        .container()
        .aux_file("tokenizer.json")
        .ok_or_else(|| {
            Error::Unsupported(
                "this .bitstack file carries no tokenizer.json (the checkpoint had none); \
                 compress from a directory that holds the model's tokenizer.json"
                    .to_string(),
            )
        })?;
    Ok(TextTokenizer::from_bytes(
        bytes,
        format!("{}#tokenizer.json", stack.file().container().name()),
    )?)
}

/// A [`CausalLm`] whose decoder linears are the stack's matrices (at the loaded budget) and
/// whose other tensors are the stack's fixed tensors.
pub fn model_of(stack: &Arc<LoadedStack>) -> Result<CausalLm, Error> {
    let config = config_of(stack)?;
    let file = stack.file().clone();
    let source = StackTensors(stack);
    let tied = config.tie_word_embeddings;
    let mut choose =
        |name: &str, _shape: [usize; 2]| -> Result<Option<Arc<dyn Linear>>, ModelError> {
            // A tied lm_head is the stacked embedding table when that is stacked.
            let matrix = file.matrix_index(name).or_else(|| {
                (tied && name == "lm_head.weight")
                    .then(|| file.matrix_index("model.embed_tokens.weight"))
                    .flatten()
            });
            Ok(matrix.map(|m| Arc::new(StackLinear::new(stack.clone(), m)) as Arc<dyn Linear>))
        };
    Ok(CausalLm::from_source(config, &source, &mut choose)?)
}
