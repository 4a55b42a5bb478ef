//! Shared helpers of the facade's integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;

use bitstack::best::EMBED;
use bitstack::engine::StackTensors;
use bitstack::model::{CausalLm, DenseLinear, Linear, ModelError};
use bitstack::LoadedStack;

/// A model whose every stacked matrix is a dense f32 reconstruction (the naive path).
pub fn dense_model(stack: &Arc<LoadedStack>) -> CausalLm {
    let file = stack.file().clone();
    let config = bitstack::engine::config_of(stack).unwrap();
    let tied = config.tie_word_embeddings;
    let dense = |m: usize| -> Arc<dyn Linear> {
        let (r, c) = file.shape(m);
        Arc::new(DenseLinear::new(stack.reconstruct_f32(m), r, c).unwrap())
    };
    struct DenseEmbedding<'a> {
        inner: StackTensors<'a>,
        embed: Option<(Vec<usize>, Vec<f32>)>,
    }
    impl bitstack::model::TensorSource for DenseEmbedding<'_> {
        fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
            match (&self.embed, name == EMBED) {
                (Some(e), true) => Ok(e.clone()),
                _ => self.inner.tensor_f32(name),
            }
        }
        fn contains(&self, name: &str) -> bool {
            name == EMBED || self.inner.contains(name)
        }
        fn names(&self) -> Vec<String> {
            self.inner.names()
        }
    }
    let embed = file.matrix_index(EMBED).map(|m| {
        let (r, c) = file.shape(m);
        (vec![r, c], stack.reconstruct_f32(m))
    });
    let source = DenseEmbedding {
        inner: StackTensors(stack),
        embed,
    };
    CausalLm::from_source(config, &source, &mut |name, _| {
        let m = file.matrix_index(name).or_else(|| {
            (tied && name == "lm_head.weight")
                .then(|| file.matrix_index(EMBED))
                .flatten()
        });
        Ok(m.map(dense))
    })
    .unwrap()
}
