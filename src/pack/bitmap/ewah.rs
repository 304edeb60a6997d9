//! EWAH-compressed bitmaps as git's `.bitmap` files store them (JavaEWAH's serialization:
//! bit count, word count, the words, the position of the last run-length word; all big
//! endian). gix has no encoder, and `gix-bitmap`'s decoder refuses any run that reaches past
//! the bit count (a run of zero words over a partial last word) and yields bits one by one,
//! so both small codecs live here, the decoder lenient about zero padding and bounded by the
//! pack's object count; gix-bitmap is the oracle of their unit tests.

use super::Bits;

/// The most words one run-length word can announce as a run (32 bits).
const MAX_RUN: u64 = (1 << 32) - 1;
/// The most literal words one run-length word can announce (31 bits).
const MAX_LITERALS: u64 = (1 << 31) - 1;

/// Append the EWAH serialization of the first `num_bits` bits of `bits` to `out`.
pub fn encode(bits: &Bits, num_bits: u32, out: &mut Vec<u8>) {
    let nwords = (num_bits as usize).div_ceil(64);
    // A partial last word is always a literal: a run over it would announce more bits than
    // there are, which strict decoders (gix-bitmap's) refuse.
    let full = num_bits as usize / 64;
    let word = |i: usize| bits.words().get(i).copied().unwrap_or(0);
    let clean = |i: usize| i < full && (word(i) == 0 || word(i) == u64::MAX);
    let mut words: Vec<u64> = Vec::new();
    let mut last_rlw = 0usize;
    let mut i = 0;
    while i < nwords || words.is_empty() {
        let run_bit = u64::from(clean(i) && word(i) == u64::MAX);
        let mut run = 0u64;
        while clean(i) && word(i) & 1 == run_bit && run < MAX_RUN {
            run += 1;
            i += 1;
        }
        last_rlw = words.len();
        words.push(0);
        let mut literals = 0u64;
        while i < nwords && !clean(i) && literals < MAX_LITERALS {
            words.push(word(i));
            literals += 1;
            i += 1;
        }
        words[last_rlw] = run_bit | (run << 1) | (literals << 33);
    }
    out.extend_from_slice(&num_bits.to_be_bytes());
    // At most one run-length word per literal word, and 2^32 bits: fits in u32.
    out.extend_from_slice(&(words.len() as u32).to_be_bytes());
    for w in &words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(&(last_rlw as u32).to_be_bytes());
}

/// Decode the EWAH bitmap at the start of `data` into a set of at most `limit` bits: its bits
/// and the bytes after it. Zeros past `limit` are accepted (a bitmap may be longer than
/// needed), set bits there are not.
pub fn decode(data: &[u8], limit: usize) -> Result<(Bits, &[u8]), String> {
    let len = skip(data).ok_or("EWAH bitmap cut off")?;
    let words = data[8..len - 4]
        .chunks_exact(8)
        .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()));
    let mut bits = Bits::with_len(limit);
    let mut index = 0usize;
    let mut words = words.into_iter();
    let beyond = || format!("EWAH bitmap sets bits beyond the {limit} objects of its pack");
    while let Some(rlw) = words.next() {
        let run = usize::try_from((rlw >> 1) & MAX_RUN)
            .ok()
            .and_then(|r| r.checked_mul(64))
            .ok_or("EWAH run too long")?;
        let end = index.checked_add(run).ok_or("EWAH run too long")?;
        if rlw & 1 == 1 {
            if end > limit {
                return Err(beyond());
            }
            for i in index..end {
                bits.set(i);
            }
        }
        index = end;
        for _ in 0..(rlw >> 33) {
            let mut w = words.next().ok_or("EWAH literal words cut off")?;
            while w != 0 {
                let at = index + w.trailing_zeros() as usize;
                if at >= limit {
                    return Err(beyond());
                }
                bits.set(at);
                w &= w - 1;
            }
            index = index.saturating_add(64);
        }
    }
    Ok((bits, &data[len..]))
}

/// The length in bytes of the EWAH bitmap at the start of `data`, without decoding it.
pub fn skip(data: &[u8]) -> Option<usize> {
    let words = u32::from_be_bytes(data.get(4..8)?.try_into().ok()?) as usize;
    let len = words.checked_mul(8)?.checked_add(12)?;
    (data.len() >= len).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(bits: &Bits, n: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(bits, n, &mut out);
        assert_eq!(skip(&out), Some(out.len()));
        let (back, rest) = decode(&out, n as usize).expect("decodes");
        assert!(rest.is_empty());
        let expected: Vec<usize> = bits.ones().collect();
        assert_eq!(back.ones().collect::<Vec<_>>(), expected);
        // gix-bitmap's decoder, strict about the bit count, reads the same.
        let (theirs, rest) = gix_bitmap::ewah::decode(&out).expect("gix-bitmap decodes");
        assert!(rest.is_empty());
        let mut set = Vec::new();
        theirs
            .for_each_set_bit(|i| {
                set.push(i);
                Some(())
            })
            .expect("well-formed for gix-bitmap");
        assert_eq!(set, expected);
        out
    }

    #[test]
    fn round_trips_through_gix_bitmap() {
        round_trip(&Bits::default(), 0);
        round_trip(&Bits::default(), 1000);
        let mut b = Bits::default();
        for i in [0, 1, 63, 64, 65, 200, 4095] {
            b.set(i);
        }
        round_trip(&b, 4096);
        // Long runs of ones and zeros compress to a few words.
        let mut runs = Bits::default();
        for i in (0..64 * 100)
            .chain(64 * 1000..64 * 1200)
            .chain([64 * 5000 + 3])
        {
            runs.set(i);
        }
        let out = round_trip(&runs, 64 * 5000 + 10);
        assert!(out.len() < 64, "{} bytes", out.len());
        // Pseudo-random content.
        let mut r = Bits::default();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) || (3000..5000).contains(&i) {
                r.set(i);
            }
        }
        round_trip(&r, 10_000);
    }

    #[test]
    fn git_layout_of_a_small_bitmap() {
        // Bits 0 and 2 of 3: one run-length word announcing one literal word, then the word.
        let mut b = Bits::default();
        b.set(0);
        b.set(2);
        let mut out = Vec::new();
        encode(&b, 3, &mut out);
        let mut expected = Vec::new();
        expected.extend_from_slice(&3u32.to_be_bytes());
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&(1u64 << 33).to_be_bytes());
        expected.extend_from_slice(&5u64.to_be_bytes());
        expected.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(decode(&[0, 0], 10).is_err());
        // Two bits announced, a literal word with bit 5 set.
        let mut bad = Vec::new();
        bad.extend_from_slice(&2u32.to_be_bytes());
        bad.extend_from_slice(&2u32.to_be_bytes());
        bad.extend_from_slice(&(1u64 << 33).to_be_bytes());
        bad.extend_from_slice(&(1u64 << 5).to_be_bytes());
        bad.extend_from_slice(&0u32.to_be_bytes());
        assert!(decode(&bad, 2).is_err());
    }
}
