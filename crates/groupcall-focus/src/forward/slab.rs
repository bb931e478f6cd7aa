//! A slab with generation-checked keys: stale keys (of removed entries
//! whose slot was reused) never reach the new entry.

/// A key into a [`Slab`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    idx: u32,
    generation: u32,
}

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    val: Option<T>,
}

/// Entries addressed by [`Key`]; removed slots are reused.
#[derive(Debug)]
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Inserts a value, returning its key.
    pub fn insert(&mut self, val: T) -> Key {
        if let Some(idx) = self.free.pop()
            && let Some(e) = self.entries.get_mut(idx as usize)
        {
            e.generation = e.generation.wrapping_add(1);
            e.val = Some(val);
            return Key {
                idx,
                generation: e.generation,
            };
        }
        let idx = self.entries.len() as u32;
        self.entries.push(Entry {
            generation: 0,
            val: Some(val),
        });
        Key { idx, generation: 0 }
    }

    /// The value of a live key.
    pub fn get(&self, k: impl Into<Key>) -> Option<&T> {
        let k: Key = k.into();
        let e = self.entries.get(k.idx as usize)?;
        if e.generation != k.generation {
            return None;
        }
        e.val.as_ref()
    }

    /// The value of a live key, mutably.
    pub fn get_mut(&mut self, k: impl Into<Key>) -> Option<&mut T> {
        let k: Key = k.into();
        let e = self.entries.get_mut(k.idx as usize)?;
        if e.generation != k.generation {
            return None;
        }
        e.val.as_mut()
    }

    /// Removes and returns the value of a live key.
    pub fn remove(&mut self, k: impl Into<Key>) -> Option<T> {
        let k: Key = k.into();
        let e = self.entries.get_mut(k.idx as usize)?;
        if e.generation != k.generation {
            return None;
        }
        let v = e.val.take()?;
        self.free.push(k.idx);
        Some(v)
    }

    /// Every live value.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().filter_map(|e| e.val.as_ref())
    }

    /// Every live key and value.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| {
            let generation = e.generation;
            e.val.as_ref().map(|v| {
                (
                    Key {
                        idx: i as u32,
                        generation,
                    },
                    v,
                )
            })
        })
    }

    /// Every live key and value, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.entries.iter_mut().enumerate().filter_map(|(i, e)| {
            let generation = e.generation;
            e.val.as_mut().map(|v| {
                (
                    Key {
                        idx: i as u32,
                        generation,
                    },
                    v,
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss() {
        let mut s = Slab::default();
        let a = s.insert(1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2);
        assert_ne!(a, b);
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&2));
        assert_eq!(s.values().count(), 1);
    }
}
