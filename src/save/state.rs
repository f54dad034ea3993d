//! What a caller hands to `save`: named tensors, blobs and metadata, all
//! borrowed. The bytes are copied into staging before `save` returns.

use crate::dtype::DType;
use crate::format::manifest::ShardInfo;

/// A borrowed tensor: name, dtype, shape and its bytes (row-major,
/// little-endian, `dtype.size() * product(shape)` of them).
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of `data`.
    pub shape: Vec<u64>,
    /// The bytes.
    pub data: &'a [u8],
    /// For a shard of a larger tensor, where it sits.
    pub shard: Option<ShardInfo>,
}

/// Everything one checkpoint holds.
#[derive(Debug, Clone, Default)]
pub struct SaveState<'a> {
    /// Tensors in caller order.
    pub tensors: Vec<TensorView<'a>>,
    /// Opaque blobs (RNG state, data-loader position, ...).
    pub blobs: Vec<(String, &'a [u8])>,
    /// JSON metadata stored in the manifest.
    pub metadata: serde_json::Value,
    /// Training metrics stored in the manifest (loss, grad norm, ...), by
    /// which [`crate::MetricFilter`] selects steps.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// For a part of a sharded step ([`crate::Store::save_part`]): the save
    /// attempt it belongs to, named alike by every rank of the attempt
    /// ([`SaveState::attempt`]). `None` on a plain save.
    pub attempt: Option<String>,
}

impl<'a> SaveState<'a> {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a tensor.
    pub fn tensor(
        mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[u64],
        data: &'a [u8],
    ) -> Self {
        self.tensors.push(TensorView {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
            shard: None,
        });
        self
    }

    /// Add a shard of a larger tensor.
    pub fn shard(
        mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[u64],
        data: &'a [u8],
        shard: ShardInfo,
    ) -> Self {
        self.tensors.push(TensorView {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
            shard: Some(shard),
        });
        self
    }

    /// Add an opaque blob.
    pub fn blob(mut self, name: impl Into<String>, data: &'a [u8]) -> Self {
        self.blobs.push((name.into(), data));
        self
    }

    /// Set the JSON metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }

    /// Name the save attempt this part belongs to (1 to 64 ASCII letters,
    /// digits, `-` or `_`). Every rank of one attempt names the same one
    /// (the DCP writer's coordinator draws it and hands it to the ranks),
    /// and [`crate::Store::commit_attempt`] commits that attempt's parts
    /// only: the parts of an earlier attempt of the step, abandoned before
    /// its commit with other contents, are then left aside instead of
    /// refused. Only a part has an attempt; a plain save naming one is
    /// refused.
    pub fn attempt(mut self, attempt: impl Into<String>) -> Self {
        self.attempt = Some(attempt.into());
        self
    }

    /// Record a training metric (`"loss"`, `"grad_norm"`, ...).
    pub fn metric(mut self, name: impl Into<String>, value: f64) -> Self {
        self.metrics.insert(name.into(), value);
        self
    }

    /// Total bytes of tensors and blobs.
    pub fn logical_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.data.len() as u64)
            .sum::<u64>()
            + self.blobs.iter().map(|b| b.1.len() as u64).sum::<u64>()
    }
}
