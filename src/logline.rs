//! The log's writer: one event, one line. A value a client chose (a user name, or a
//! server's error that quotes one) cannot begin a line of its own: a line break inside an
//! event is written as `\n` (a carriage return as `\r`).

use std::io::{self, Write};

/// Writes each event (one `write` call, ending with its newline) as one line.
pub struct OneLine<W>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Standard error, one event per line: what `patroxy run` logs to.
pub fn stderr() -> OneLine<io::Stderr> {
    OneLine(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_break_inside_an_event_is_escaped() {
        let mut w = OneLine(Vec::new());
        w.write_all(b"WARN user=\"x\nFAKE INFO all is well\r\" failed\n")
            .unwrap();
        w.write_all(b"next\n").unwrap();
        let text = String::from_utf8(w.0).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.starts_with("WARN user=\"x\\nFAKE INFO all is well\\r\" failed\n"));
    }
}
