//! pkt-line framing (gitprotocol-common): a pure decoder over byte slices and encoders that
//! append to a `Vec<u8>`.
//!
//! Decoding is delegated to `gix-packetline`; this module turns its results into our own
//! [`Line`] and [`Error`] types so that nothing above it depends on `gix_error`.

use gix_packetline::{decode, PacketLineRef};

/// The largest payload of one data pkt-line: 65520 bytes in total minus the 4-byte length.
pub const MAX_DATA_LEN: usize = 65516;

/// One decoded pkt-line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// A data line, its trailing newline (if any) still attached.
    Data(&'a [u8]),
    /// `0000`
    Flush,
    /// `0001`
    Delim,
    /// `0002`
    ResponseEnd,
}

impl<'a> Line<'a> {
    /// The payload of a data line without its trailing `\n`, or `None` for special packets.
    pub fn text(&self) -> Option<&'a [u8]> {
        match self {
            Line::Data(d) => Some(d.strip_suffix(b"\n").unwrap_or(d)),
            _ => None,
        }
    }
}

/// Why a byte sequence is not a valid pkt-line stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The stream ended inside a packet.
    #[error("truncated pkt-line: {bytes_needed} more bytes were expected")]
    Truncated {
        /// How many bytes are missing.
        bytes_needed: usize,
    },
    /// The length prefix or the packet itself is malformed.
    #[error("malformed pkt-line: {0}")]
    Malformed(String),
}

/// An iterator over the pkt-lines of a complete buffer.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Read pkt-lines from `buf`, which must hold whole packets.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Whether all input has been consumed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next line, `Ok(None)` at the end of input.
    pub fn read(&mut self) -> Result<Option<Line<'a>>, Error> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match decode::streaming(self.buf).map_err(|e| Error::Malformed(e.to_string()))? {
            decode::Stream::Complete {
                line,
                bytes_consumed,
            } => {
                self.buf = &self.buf[bytes_consumed..];
                Ok(Some(match line {
                    PacketLineRef::Data(d) => Line::Data(d),
                    PacketLineRef::Flush => Line::Flush,
                    PacketLineRef::Delimiter => Line::Delim,
                    PacketLineRef::ResponseEnd => Line::ResponseEnd,
                }))
            }
            decode::Stream::Incomplete { bytes_needed } => Err(Error::Truncated { bytes_needed }),
        }
    }
}

/// Append a data pkt-line holding `data` to `out`. `data` must not exceed [`MAX_DATA_LEN`].
pub fn data(out: &mut Vec<u8>, data: &[u8]) {
    debug_assert!(data.len() <= MAX_DATA_LEN, "callers split their payloads");
    let len = data.len() + 4;
    out.extend_from_slice(&hex4(len));
    out.extend_from_slice(data);
}

/// Append a data pkt-line made of `parts` (concatenated) to `out`.
pub fn data_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + 4;
    debug_assert!(len - 4 <= MAX_DATA_LEN, "callers split their payloads");
    out.extend_from_slice(&hex4(len));
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Append `line` followed by `\n` as one pkt-line.
pub fn text(out: &mut Vec<u8>, line: &str) {
    data_parts(out, &[line.as_bytes(), b"\n"]);
}

/// Append a flush packet.
pub fn flush(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0000");
}

/// Append a delimiter packet.
pub fn delim(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0001");
}

/// Append an `ERR <message>` packet, which git clients print as `remote error: <message>`.
pub fn err(out: &mut Vec<u8>, message: &str) {
    let message = truncate(message, MAX_DATA_LEN - 5);
    data_parts(out, &[b"ERR ", message.as_bytes(), b"\n"]);
}

/// Append a sideband packet on `band` (1 data, 2 progress, 3 error).
pub fn band(out: &mut Vec<u8>, band: u8, payload: &[u8]) {
    data_parts(out, &[&[band], payload]);
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn hex4(n: usize) -> [u8; 4] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [
        HEX[(n >> 12) & 0xf],
        HEX[(n >> 8) & 0xf],
        HEX[(n >> 4) & 0xf],
        HEX[n & 0xf],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_round_trips() {
        let mut out = Vec::new();
        text(&mut out, "command=ls-refs");
        delim(&mut out);
        data(&mut out, b"peel");
        flush(&mut out);
        assert_eq!(&out[..4], b"0014");
        let mut r = Reader::new(&out);
        assert_eq!(r.read().unwrap(), Some(Line::Data(b"command=ls-refs\n")));
        assert_eq!(r.read().unwrap(), Some(Line::Delim));
        assert_eq!(r.read().unwrap().and_then(|l| l.text()), Some(&b"peel"[..]));
        assert_eq!(r.read().unwrap(), Some(Line::Flush));
        assert_eq!(r.read().unwrap(), None);
        assert!(r.is_empty());
    }

    #[test]
    fn truncated_and_malformed_input_is_an_error() {
        assert!(matches!(
            Reader::new(b"0010want").read(),
            Err(Error::Truncated { bytes_needed: 8 })
        ));
        assert!(matches!(
            Reader::new(b"00").read(),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(b"zzzzabc").read(),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            Reader::new(b"0003").read(),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn err_and_band_packets() {
        let mut out = Vec::new();
        err(&mut out, "upload-pack: not our ref");
        assert_eq!(out, b"0021ERR upload-pack: not our ref\n");
        out.clear();
        band(&mut out, 2, b"hi\n");
        assert_eq!(out, b"0008\x02hi\n");
    }

    #[test]
    fn long_err_messages_are_truncated_on_a_char_boundary() {
        let mut out = Vec::new();
        err(&mut out, &"é".repeat(40_000));
        let line = Reader::new(&out).read().unwrap().unwrap();
        assert!(matches!(line, Line::Data(d) if d.len() <= MAX_DATA_LEN));
    }
}
