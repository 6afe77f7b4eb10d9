//! Named intermediate tensors of a forward pass, for the verification harness.

use mlx_rs::Array;

/// Records intermediate tensors under their names (`embeddings`, `layers.3`,
/// `layers.3.self_attn.q_proj`, …) when enabled; free when disabled, as in generation.
#[derive(Debug, Default)]
pub struct Tap {
    enabled: bool,
    prefix: String,
    records: Vec<(String, Array)>,
}

impl Tap {
    /// A tap that records nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A tap that records every named intermediate.
    pub fn on() -> Self {
        Tap {
            enabled: true,
            ..Self::default()
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Records `x` as `name` under the current scope.
    pub fn record(&mut self, name: &str, x: &Array) {
        if self.enabled {
            let full = if self.prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{}{name}", self.prefix)
            };
            self.records.push((full, x.clone()));
        }
    }

    /// Sets the scope names are recorded under, e.g. `"layers.3."`; `""` for the top.
    pub fn scope(&mut self, prefix: impl FnOnce() -> String) {
        if self.enabled {
            self.prefix = prefix();
        }
    }

    /// The recorded tensors, in the order they were produced.
    pub fn records(&self) -> &[(String, Array)] {
        &self.records
    }

    /// The tensor recorded as `name`.
    pub fn get(&self, name: &str) -> Option<&Array> {
        self.records.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    pub fn into_records(self) -> Vec<(String, Array)> {
        self.records
    }
}
