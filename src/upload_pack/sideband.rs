//! Framing of the pack stream: raw, or multiplexed on sideband channels with progress.

use std::io::{self, Write};

use crate::protocol::pktline;

/// The size of the buffer pack bytes are gathered in when there is no sideband.
const RAW_CHUNK: usize = 64 * 1024;

/// Frames pack bytes written to it into sideband packets (band 1) of at most `payload` bytes,
/// gathering small writes into full packets; without a sideband it passes bytes through in
/// 64 KiB chunks.
pub struct Sideband<W: Write> {
    inner: W,
    payload: Option<usize>,
    buf: Vec<u8>,
    packet: Vec<u8>,
}

/// `message` on `band`, in packets small enough for any sideband (`side-band` as well as
/// `side-band-64k`).
fn band_packets(out: &mut Vec<u8>, band: u8, message: &str) {
    for chunk in message
        .as_bytes()
        .chunks(crate::protocol::SMALL_BAND_PAYLOAD)
    {
        pktline::band(out, band, chunk);
    }
}

/// A progress message on band 2, for a caller that sent the answer's preamble (see
/// [`crate::upload_pack::Request::early_preamble`]) and reports progress before the pack.
pub fn progress_packets(message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    band_packets(&mut out, 2, message);
    out
}

/// An error on band 3 and the flush that ends the answer: why no pack follows the preamble.
pub fn error_packets(message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    band_packets(&mut out, 3, message);
    pktline::flush(&mut out);
    out
}

impl<W: Write> Sideband<W> {
    /// Frame into packets of `payload` bytes, or pass through with `None`.
    pub fn new(inner: W, payload: Option<usize>) -> Self {
        let cap = payload.unwrap_or(RAW_CHUNK);
        Sideband {
            inner,
            payload,
            buf: Vec::with_capacity(cap),
            packet: Vec::with_capacity(cap + 5),
        }
    }

    /// Send a progress message on band 2 (dropped without a sideband).
    pub fn progress(&mut self, message: &str) -> io::Result<()> {
        self.message(2, message)
    }

    fn message(&mut self, band: u8, message: &str) -> io::Result<()> {
        if self.payload.is_none() {
            return Ok(());
        }
        self.emit_data()?;
        self.packet.clear();
        band_packets(&mut self.packet, band, message);
        self.inner.write_all(&self.packet)
    }

    /// Write out everything buffered and, with a sideband, the closing flush packet.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit_data()?;
        if self.payload.is_some() {
            self.inner.write_all(b"0000")?;
        }
        self.inner.flush()?;
        Ok(self.inner)
    }

    fn emit_data(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.payload {
            None => self.inner.write_all(&self.buf)?,
            Some(payload) => {
                self.packet.clear();
                for chunk in self.buf.chunks(payload) {
                    pktline::band(&mut self.packet, 1, chunk);
                }
                self.inner.write_all(&self.packet)?;
            }
        }
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for Sideband<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let cap = self.payload.unwrap_or(RAW_CHUNK);
        let take = data.len().min(cap - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == cap {
            self.emit_data()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Packets are emitted when full; a flush of the pack writer must not produce small ones.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pktline::{Line, Reader};

    #[test]
    fn frames_into_full_packets_and_closes_with_flush() {
        let mut sb = Sideband::new(Vec::new(), Some(10));
        sb.write_all(b"0123456789abcdef").unwrap();
        sb.progress("counting\n").unwrap();
        sb.write_all(b"xyz").unwrap();
        let out = sb.finish().unwrap();
        let mut r = Reader::new(&out);
        let mut got = Vec::new();
        while let Some(line) = r.read().unwrap() {
            got.push(line);
        }
        assert_eq!(
            got,
            vec![
                Line::Data(b"\x010123456789"),
                Line::Data(b"\x01abcdef"),
                Line::Data(b"\x02counting\n"),
                Line::Data(b"\x01xyz"),
                Line::Flush
            ]
        );
    }

    #[test]
    fn passes_through_without_sideband() {
        let mut sb = Sideband::new(Vec::new(), None);
        sb.write_all(b"PACK").unwrap();
        sb.progress("dropped").unwrap();
        assert_eq!(sb.finish().unwrap(), b"PACK");
    }
}
