//! Frame splitting by header only: a tag byte and a checked big-endian length.
//!
//! Two tools share one length check. [`split_frame`] cuts whole frames out of a buffer. The
//! startup and authentication phases use it, where frames are small and bounded.
//! [`Scanner`] follows frame boundaries across arbitrary read chunks for the relay. It never
//! buffers a body, so the forwarding path moves bytes untouched and allocates nothing per
//! message.

use bytes::{Bytes, BytesMut};

use super::codes;

/// A tagged frame's header: 1 tag byte and an int32 length that counts itself.
pub const HEADER_LEN: usize = 5;

/// The largest length a frame can declare. A negative int32 is never a length.
pub const MAX_DECLARED_LEN: usize = i32::MAX as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message {tag:?} declares length {len}, below the minimum of 4")]
    TooShort { tag: char, len: i64 },
    #[error("message {tag:?} declares length {len}, above the limit of {limit} bytes")]
    TooLong { tag: char, len: i64, limit: usize },
}

/// Checks a declared length before anything is reserved for it.
/// Returns the body length, which excludes the 4 length bytes.
pub fn check_len(tag: u8, raw_len: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let len = i32::from_be_bytes(raw_len);
    if len < 4 {
        return Err(FrameError::TooShort {
            tag: tag as char,
            len: len.into(),
        });
    }
    let len = len as usize;
    if len > limit {
        return Err(FrameError::TooLong {
            tag: tag as char,
            len: len as i64,
            limit,
        });
    }
    Ok(len - 4)
}

/// One complete tagged frame, header included, exactly as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// Cuts the next complete frame off the front of `buf`.
/// An incomplete frame is `Ok(None)`: read more and call again.
pub fn split_frame(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let body_len = check_len(tag, [buf[1], buf[2], buf[3], buf[4]], limit)?;
    let total = HEADER_LEN + body_len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        bytes: buf.split_to(total).freeze(),
    }))
}

/// The tag and whole length (header included) of the frame starting `buf`, when its header
/// is there, it is longer than `above` and it is not all there yet: a frame to let through
/// as it comes rather than hold.
pub fn long_frame(
    buf: &[u8],
    above: usize,
    limit: usize,
) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let total = HEADER_LEN
        + check_len(
            header[0],
            [header[1], header[2], header[3], header[4]],
            limit,
        )?;
    Ok((total > above && total > buf.len()).then_some((header[0], total)))
}

/// What the scanner reports about the frames passing through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A frame header passed: its tag and full declared length.
    Header { tag: u8, len: usize },
    /// A ReadyForQuery passed, with its transaction status byte.
    ReadyForQuery(u8),
}

/// Follows frame boundaries over a byte stream that arrives in arbitrary chunks.
#[derive(Debug, Clone)]
pub struct Scanner {
    limit: usize,
    header: [u8; HEADER_LEN],
    header_have: usize,
    /// Body bytes of the current frame not yet seen.
    remaining: usize,
    /// The current frame is a ReadyForQuery whose status byte has not been seen yet.
    want_status: bool,
    /// Frames whose body (up to a prefix length) is copied aside: (tag, prefix).
    capture: Vec<(u8, usize)>,
    /// The current frame's tag, prefix length and captured prefix, while it is copied.
    capturing: Option<(u8, usize, Vec<u8>)>,
    captured: Vec<(u8, Vec<u8>)>,
}

impl Scanner {
    pub fn new(limit: usize) -> Self {
        Scanner {
            limit,
            header: [0; HEADER_LEN],
            header_have: 0,
            remaining: 0,
            want_status: false,
            capture: Vec::new(),
            capturing: None,
            captured: Vec::new(),
        }
    }

    /// Also copies aside the first `prefix` body bytes of every `tag` frame (the bytes still
    /// pass untouched); `take_captured` hands them over once their frame has passed. Call it
    /// once per tag.
    pub fn capturing(mut self, tag: u8, prefix: usize) -> Self {
        self.capture.push((tag, prefix));
        self
    }

    /// The captured body prefixes of the frames that have passed completely, in order.
    pub fn take_captured(&mut self) -> Vec<(u8, Vec<u8>)> {
        std::mem::take(&mut self.captured)
    }

    /// True between frames: a message injected now lands on a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.remaining == 0
    }

    /// Walks `chunk`, reporting each header (and each ReadyForQuery status) to `seen`.
    pub fn scan(&mut self, chunk: &[u8], mut seen: impl FnMut(Seen)) -> Result<(), FrameError> {
        let mut i = 0;
        while i < chunk.len() {
            if self.remaining > 0 {
                if self.want_status {
                    self.want_status = false;
                    seen(Seen::ReadyForQuery(chunk[i]));
                }
                let step = self.remaining.min(chunk.len() - i);
                if let Some((_, prefix, body)) = self.capturing.as_mut() {
                    let room = prefix.saturating_sub(body.len()).min(step);
                    body.extend_from_slice(&chunk[i..i + room]);
                    if self.remaining == step {
                        let (tag, _, body) = self.capturing.take().expect("capturing");
                        self.captured.push((tag, body));
                    }
                }
                self.remaining -= step;
                i += step;
                continue;
            }
            // At a header. The common case has the whole header in this chunk.
            let (tag, raw_len) = if self.header_have == 0 && chunk.len() - i >= HEADER_LEN {
                let h = &chunk[i..i + HEADER_LEN];
                i += HEADER_LEN;
                (h[0], [h[1], h[2], h[3], h[4]])
            } else {
                let step = (HEADER_LEN - self.header_have).min(chunk.len() - i);
                self.header[self.header_have..self.header_have + step]
                    .copy_from_slice(&chunk[i..i + step]);
                self.header_have += step;
                i += step;
                if self.header_have < HEADER_LEN {
                    return Ok(());
                }
                self.header_have = 0;
                let h = self.header;
                (h[0], [h[1], h[2], h[3], h[4]])
            };
            let body_len = check_len(tag, raw_len, self.limit)?;
            seen(Seen::Header {
                tag,
                len: body_len + 4,
            });
            self.remaining = body_len;
            self.want_status = tag == codes::READY_FOR_QUERY && body_len > 0;
            if let Some(&(_, prefix)) = self.capture.iter().find(|(t, _)| *t == tag) {
                match body_len {
                    0 => self.captured.push((tag, Vec::new())),
                    n => self.capturing = Some((tag, prefix, Vec::with_capacity(n.min(prefix)))),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn split_cuts_exact_frames_and_waits_for_more() {
        let mut wire = frame(b'Z', b"I");
        wire.extend(frame(b'S', b"a\0b\0"));
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        let first = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(first.tag, b'Z');
        assert_eq!(first.body(), b"I");
        assert_eq!(split_frame(&mut buf, 1024).unwrap(), None, "truncated body");
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        let second = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(second.body(), b"a\0b\0");
        assert!(buf.is_empty());
    }

    #[test]
    fn captured_prefixes_survive_any_cut_of_the_stream() {
        let mut wire = frame(b'S', b"TimeZone\0UTC\0");
        wire.extend(frame(b'Z', b"I"));
        wire.extend(frame(b'S', b"application_name\0a-rather-long-value\0"));
        wire.extend(frame(b'S', b""));
        wire.extend(frame(b'C', b"LISTEN\0"));
        for cut in 0..wire.len() {
            let mut s = Scanner::new(1024).capturing(b'S', 20).capturing(b'C', 4);
            s.scan(&wire[..cut], |_| {}).unwrap();
            let mut got = s.take_captured();
            s.scan(&wire[cut..], |_| {}).unwrap();
            got.extend(s.take_captured());
            assert_eq!(
                got,
                vec![
                    (b'S', b"TimeZone\0UTC\0".to_vec()),
                    (b'S', b"application_name\0a-r".to_vec()),
                    (b'S', Vec::new()),
                    (b'C', b"LIST".to_vec()),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn split_waits_on_a_partial_header() {
        let mut buf = BytesMut::from(&b"Z\0\0"[..]);
        assert_eq!(split_frame(&mut buf, 1024).unwrap(), None);
    }

    #[test]
    fn split_accepts_an_empty_body() {
        let mut buf = BytesMut::from(&frame(b'c', b"")[..]);
        assert_eq!(split_frame(&mut buf, 1024).unwrap().unwrap().body(), b"");
    }

    #[test]
    fn lengths_below_four_are_refused() {
        for len in [0i32, 1, 3, -1, i32::MIN] {
            let mut buf = BytesMut::new();
            buf.extend_from_slice(b"Q");
            buf.extend_from_slice(&len.to_be_bytes());
            let err = split_frame(&mut buf, 1024).unwrap_err();
            assert!(matches!(err, FrameError::TooShort { .. }), "{len}: {err}");
        }
    }

    #[test]
    fn lengths_above_the_limit_are_refused_before_any_body_arrives() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"p");
        buf.extend_from_slice(&i32::MAX.to_be_bytes());
        let err = split_frame(&mut buf, 65_536).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                tag: 'p',
                len: i32::MAX as i64,
                limit: 65_536
            }
        );
    }

    fn scan_all(chunks: &[&[u8]]) -> (Vec<Seen>, Scanner) {
        let mut s = Scanner::new(MAX_DECLARED_LEN);
        let mut out = Vec::new();
        for c in chunks {
            s.scan(c, |e| out.push(e)).unwrap();
        }
        (out, s)
    }

    #[test]
    fn scanner_reports_headers_and_status_across_any_split() {
        let mut wire = frame(b'D', &[7u8; 300]);
        wire.extend(frame(b'C', b"SELECT 1\0"));
        wire.extend(frame(b'Z', b"T"));
        let (whole, s) = scan_all(&[&wire]);
        assert!(s.at_boundary());
        assert_eq!(
            whole,
            vec![
                Seen::Header {
                    tag: b'D',
                    len: 304
                },
                Seen::Header { tag: b'C', len: 13 },
                Seen::Header { tag: b'Z', len: 5 },
                Seen::ReadyForQuery(b'T'),
            ]
        );
        // Every two-way split, and byte-at-a-time, must see the same events.
        for cut in 0..=wire.len() {
            let (split, s) = scan_all(&[&wire[..cut], &wire[cut..]]);
            assert_eq!(split, whole, "cut at {cut}");
            assert!(s.at_boundary());
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(scan_all(&bytes).0, whole);
    }

    #[test]
    fn scanner_knows_when_it_is_mid_frame() {
        let wire = frame(b'D', b"abcdef");
        let mut s = Scanner::new(MAX_DECLARED_LEN);
        s.scan(&wire[..3], |_| {}).unwrap();
        assert!(!s.at_boundary(), "inside a header");
        s.scan(&wire[3..7], |_| {}).unwrap();
        assert!(!s.at_boundary(), "inside a body");
        s.scan(&wire[7..], |_| {}).unwrap();
        assert!(s.at_boundary());
    }

    #[test]
    fn scanner_refuses_bad_lengths() {
        for len in [0i32, 3, -5] {
            let mut wire = vec![b'Q'];
            wire.extend_from_slice(&len.to_be_bytes());
            let mut s = Scanner::new(MAX_DECLARED_LEN);
            assert!(s.scan(&wire, |_| {}).is_err(), "{len}");
        }
        let mut wire = vec![b'Q'];
        wire.extend_from_slice(&1_000_000i32.to_be_bytes());
        assert!(Scanner::new(1024).scan(&wire, |_| {}).is_err());
    }

    #[test]
    fn a_long_frame_is_known_by_its_header_before_it_has_come() {
        let mut b = vec![b'D'];
        b.extend_from_slice(&1_000_000u32.to_be_bytes());
        assert_eq!(
            long_frame(&b[..4], 100, MAX_DECLARED_LEN),
            Ok(None),
            "no header yet"
        );
        assert_eq!(
            long_frame(&b, 100, MAX_DECLARED_LEN),
            Ok(Some((b'D', 1_000_001)))
        );
        assert_eq!(
            long_frame(&b, 2_000_000, MAX_DECLARED_LEN),
            Ok(None),
            "not long"
        );
        // All there: a frame like any other.
        let mut short = vec![b'C', 0, 0, 0, 8];
        short.extend_from_slice(b"abcd");
        assert_eq!(long_frame(&short, 4, MAX_DECLARED_LEN), Ok(None));
        assert!(long_frame(&[b'D', 0, 0, 0, 1], 4, MAX_DECLARED_LEN).is_err());
    }
}
