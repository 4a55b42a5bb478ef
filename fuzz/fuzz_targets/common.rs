//! What the structured targets (`load_stack`, `load_model`, `resume_state`) share.

/// Reads a fuzz input from the front; zeros once it is used up.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// The next byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    /// The next `n` bytes; past the end, byte `i` of the result is `fill(i)`.
    #[allow(dead_code)] // not every target reads byte strings
    pub fn bytes(&mut self, n: usize, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let take = n.min(self.0.len());
        let (head, rest) = self.0.split_at(take);
        self.0 = rest;
        let mut v = head.to_vec();
        v.extend((v.len()..n).map(fill));
        v
    }
}

/// A scratch directory of this process named after `what`: in `/dev/shm` where there is one
/// (the targets write and read files for every input), else in the temporary directory.
#[allow(dead_code)] // not every target writes files
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("bitstack-fuzz-{what}-{}", std::process::id()))
}

/// A safetensors file: the length of the JSON `header`, the header (padded with spaces to a
/// multiple of 8 bytes), then `body`, the tensors' bytes.
#[allow(dead_code)] // not every target writes checkpoints
pub fn safetensors_file(
    header: &serde_json::Map<String, serde_json::Value>,
    body: &[u8],
) -> Vec<u8> {
    let mut head = serde_json::to_vec(header).unwrap_or_default();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend(head);
    file.extend_from_slice(body);
    file
}
