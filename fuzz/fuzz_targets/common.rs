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
