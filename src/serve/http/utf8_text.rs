//! Turning a byte stream into text chunks without splitting a UTF-8 character across chunks.

/// Decodes bytes pushed in pieces into lossy UTF-8 text. A piece that ends inside a multi-byte
/// character keeps that incomplete tail until the next piece completes it (or [`finish`]
/// replaces it), so the concatenated output always equals `String::from_utf8_lossy` of all
/// bytes together.
///
/// [`finish`]: Utf8Text::finish
#[derive(Debug, Default)]
pub struct Utf8Text {
    /// An incomplete character held back from the last piece (at most 3 bytes).
    pending: Vec<u8>,
}

impl Utf8Text {
    /// A decoder with nothing held.
    pub fn new() -> Self {
        Self::default()
    }

    /// Text for `bytes`, after any bytes held from the previous piece.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(bytes);
        let mut out = String::with_capacity(buf.len());
        let mut rest = buf.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            // A character cut off at the end of the piece: wait for the rest.
                            self.pending = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// Text for whatever is still held (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&held).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn split_characters_are_held_until_complete() {
        let mut d = Utf8Text::new();
        let euro = "€".as_bytes();
        assert_eq!(d.push(&euro[..1]), "");
        assert_eq!(d.push(&euro[1..2]), "");
        assert_eq!(d.push(&euro[2..]), "€");
        assert_eq!(d.push(b"a\xff"), "a\u{fffd}");
        assert_eq!(d.push(&euro[..2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn concatenation_matches_lossy_decoding_of_the_whole() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let alphabet: Vec<u8> = "aé€😀"
            .bytes()
            .chain([0x80, 0xc3, 0xe2, 0xf0, 0xff])
            .collect();
        for _ in 0..500 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let mut d = Utf8Text::new();
            let mut text = String::new();
            let mut at = 0;
            while at < bytes.len() {
                let step = rng.random_range(1..=4).min(bytes.len() - at);
                let piece = d.push(&bytes[at..at + step]);
                text.push_str(&piece);
                at += step;
            }
            text.push_str(&d.finish());
            assert_eq!(text, String::from_utf8_lossy(&bytes), "bytes {bytes:?}");
        }
    }
}
