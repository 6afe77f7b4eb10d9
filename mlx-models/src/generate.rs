//! Text generation.

use crate::error::{Error, Result};
use crate::models::LanguageModel;
use crate::tap::Tap;
use mlx_rs::{ops::indexing::argmax_axis, Array};

/// The `count` tokens greedy decoding appends to `prompt`.
pub fn greedy(model: &dyn LanguageModel, prompt: &[u32], count: usize) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let mut cache = model.new_cache();
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let mut input = Array::from_slice(&ids, &[1, ids.len() as i32]);
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let logits = model.forward(&input, &mut cache, &mut Tap::off())?;
        let last = logits.index_last_token()?;
        let next = argmax_axis(&last, -1, None)?;
        next.eval()?;
        let token = next.as_dtype(mlx_rs::Dtype::Uint32)?.as_slice::<u32>()[0];
        out.push(token);
        input = Array::from_slice(&[token as i32], &[1, 1]);
    }
    Ok(out)
}

trait LastToken {
    fn index_last_token(&self) -> Result<Array>;
}

impl LastToken for Array {
    /// `[batch, tokens, vocab]` → the last token's `[batch, vocab]`.
    fn index_last_token(&self) -> Result<Array> {
        let len = self.dim(1);
        Ok(self.take_axis(&Array::from_int(len - 1), 1)?)
    }
}
