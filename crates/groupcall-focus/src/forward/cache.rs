//! The per-layer packet cache that answers NACKs: a ring of preallocated
//! slots indexed by the publisher's sequence number (the capacity is a
//! power of two that divides 65536, so the index survives the wrap).
//! Storing a packet copies its payload into its slot; nothing allocates
//! after [`PacketCache::new`].

/// A cached packet, as received from the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached<'a> {
    /// The publisher's SSRC.
    pub ssrc: u32,
    /// The publisher's sequence number.
    pub seq: u16,
    /// The publisher's RTP timestamp.
    pub timestamp: u32,
    /// The marker bit.
    pub marker: bool,
    /// The payload type.
    pub payload_type: u8,
    /// The payload.
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    valid: bool,
    ssrc: u32,
    seq: u16,
    timestamp: u32,
    marker: bool,
    payload_type: u8,
    len: u16,
}

/// A bounded ring of the last packets of one publisher layer.
#[derive(Debug)]
pub struct PacketCache {
    slots: Vec<Slot>,
    bytes: Vec<u8>,
    mtu: usize,
}

impl PacketCache {
    /// A cache of `packets` slots (rounded up to a power of two, 1 to
    /// 32768; 0 makes a cache that stores nothing) of `mtu` bytes each
    /// (payloads larger than that are not cached).
    pub fn new(packets: usize, mtu: usize) -> Self {
        let n = if packets == 0 {
            0
        } else {
            packets.clamp(1, 1 << 15).next_power_of_two()
        };
        let mtu = mtu.min(usize::from(u16::MAX));
        Self {
            slots: vec![Slot::default(); n],
            bytes: vec![0; n * mtu],
            mtu,
        }
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Stores a packet, replacing whatever had its slot. Returns false if
    /// it is too large for a slot (or the cache has none).
    pub fn insert(&mut self, p: Cached<'_>) -> bool {
        let n = self.slots.len();
        if n == 0 || p.payload.len() > self.mtu {
            return false;
        }
        let i = usize::from(p.seq) & (n - 1);
        let at = i * self.mtu;
        let Some(dst) = self.bytes.get_mut(at..at + p.payload.len()) else {
            return false;
        };
        dst.copy_from_slice(p.payload);
        self.slots[i] = Slot {
            valid: true,
            ssrc: p.ssrc,
            seq: p.seq,
            timestamp: p.timestamp,
            marker: p.marker,
            payload_type: p.payload_type,
            len: p.payload.len() as u16,
        };
        true
    }

    /// The cached packet with this SSRC and sequence number, if its slot
    /// still holds it.
    pub fn get(&self, ssrc: u32, seq: u16) -> Option<Cached<'_>> {
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let i = usize::from(seq) & (n - 1);
        let s = self.slots[i];
        if !s.valid || s.ssrc != ssrc || s.seq != seq {
            return None;
        }
        let at = i * self.mtu;
        Some(Cached {
            ssrc,
            seq,
            timestamp: s.timestamp,
            marker: s.marker,
            payload_type: s.payload_type,
            payload: self.bytes.get(at..at + usize::from(s.len))?,
        })
    }

    /// Forgets every packet (the slots stay allocated).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.valid = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16, payload: &[u8]) -> Cached<'_> {
        Cached {
            ssrc: 7,
            seq,
            timestamp: u32::from(seq) * 10,
            marker: seq.is_multiple_of(2),
            payload_type: 96,
            payload,
        }
    }

    #[test]
    fn keeps_the_last_capacity_packets_across_the_wrap() {
        let mut c = PacketCache::new(5, 8);
        assert_eq!(c.capacity(), 8);
        for i in 0..20u16 {
            let seq = 65530u16.wrapping_add(i);
            assert!(c.insert(pkt(seq, &seq.to_be_bytes())));
        }
        for i in 0..20u16 {
            let seq = 65530u16.wrapping_add(i);
            let got = c.get(7, seq);
            if i >= 12 {
                let got = got.unwrap();
                assert_eq!(got, pkt(seq, &seq.to_be_bytes()));
            } else {
                assert_eq!(got, None, "seq {seq} was overwritten");
            }
        }
        assert_eq!(c.get(8, 65530u16.wrapping_add(19)), None, "other SSRC");
        assert!(!c.insert(pkt(1, &[0; 9])), "larger than a slot");
        c.clear();
        assert_eq!(c.get(7, 65530u16.wrapping_add(19)), None);
        let mut none = PacketCache::new(0, 1500);
        assert!(!none.insert(pkt(1, b"x")));
        assert_eq!(none.get(7, 1), None);
    }
}
