//! The receive reorder buffer for `seq`.
//!
//! To-device messages may arrive out of order (and, with retries, twice).
//! Messages of one `call_id` are released in `seq` order. Unlike the
//! reference, which waits for a missing number forever (stalling that call),
//! a gap is skipped once it has been open for `gap_timeout` ms: the buffered
//! messages are then released in order. Every message is self-describing, so
//! the state machine can use what follows a lost candidates batch; if an
//! essential message (an invite or answer) was the one lost, the peer's own
//! timeouts hang up and the designated caller calls again.

use std::collections::BTreeMap;

/// What [`ReorderBuffer::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pushed<T> {
    /// Released, with any buffered messages that followed it, in order.
    Released(Vec<T>),
    /// Buffered until the gap before it fills or times out.
    Buffered,
    /// Dropped as a duplicate (seq already released or already buffered).
    Duplicate,
    /// Dropped because the buffer is full.
    Overflow,
}

/// Reorders one call's messages by `seq`.
#[derive(Debug, Clone)]
pub struct ReorderBuffer<T> {
    next: u64,
    pending: BTreeMap<u64, T>,
    gap_since: Option<u64>,
    capacity: usize,
}

impl<T> ReorderBuffer<T> {
    /// An empty buffer expecting `seq` 0, holding at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        Self {
            next: 0,
            pending: BTreeMap::new(),
            gap_since: None,
            capacity,
        }
    }

    /// The next expected `seq`.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Number of buffered messages.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Is nothing buffered?
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Adds a message received at `now`.
    pub fn push(&mut self, seq: u64, msg: T, now: u64) -> Pushed<T> {
        if seq < self.next || self.pending.contains_key(&seq) {
            return Pushed::Duplicate;
        }
        if seq == self.next {
            let mut out = vec![msg];
            self.next += 1;
            while let Some(m) = self.pending.remove(&self.next) {
                out.push(m);
                self.next += 1;
            }
            self.gap_since = if self.pending.is_empty() {
                None
            } else {
                Some(now)
            };
            return Pushed::Released(out);
        }
        if self.pending.len() >= self.capacity {
            return Pushed::Overflow;
        }
        self.pending.insert(seq, msg);
        if self.gap_since.is_none() {
            self.gap_since = Some(now);
        }
        Pushed::Buffered
    }

    /// When the current gap times out, if there is one.
    pub fn deadline(&self, gap_timeout: u64) -> Option<u64> {
        self.gap_since.map(|t| t.saturating_add(gap_timeout))
    }

    /// Releases everything buffered if the gap has been open for
    /// `gap_timeout` ms at `now`; returns the released messages in order.
    pub fn expire(&mut self, now: u64, gap_timeout: u64) -> Vec<T> {
        match self.deadline(gap_timeout) {
            Some(d) if now >= d => {
                let pending = std::mem::take(&mut self.pending);
                if let Some((&last, _)) = pending.last_key_value() {
                    self.next = last + 1;
                }
                self.gap_since = None;
                pending.into_values().collect()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_reordered() {
        let mut b = ReorderBuffer::new(8);
        assert_eq!(b.push(0, 'a', 0), Pushed::Released(vec!['a']));
        assert_eq!(b.push(2, 'c', 1), Pushed::Buffered);
        assert_eq!(b.push(2, 'c', 1), Pushed::Duplicate);
        assert_eq!(b.push(1, 'b', 2), Pushed::Released(vec!['b', 'c']));
        assert_eq!(b.push(0, 'a', 3), Pushed::Duplicate);
        assert_eq!(b.deadline(100), None);
    }

    #[test]
    fn gap_times_out() {
        let mut b = ReorderBuffer::new(8);
        assert_eq!(b.push(1, 'b', 10), Pushed::Buffered);
        assert_eq!(b.push(3, 'd', 20), Pushed::Buffered);
        assert_eq!(b.deadline(100), Some(110));
        assert!(b.expire(109, 100).is_empty());
        assert_eq!(b.expire(110, 100), vec!['b', 'd']);
        assert_eq!(b.next_seq(), 4);
        assert_eq!(b.push(2, 'c', 120), Pushed::Duplicate);
        assert_eq!(b.push(4, 'e', 120), Pushed::Released(vec!['e']));
    }

    #[test]
    fn capacity() {
        let mut b = ReorderBuffer::new(1);
        assert_eq!(b.push(5, 'x', 0), Pushed::Buffered);
        assert_eq!(b.push(6, 'y', 0), Pushed::Overflow);
    }
}
