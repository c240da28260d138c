//! The wire format, without I/O (PROTOCOL.md sections 2-8a and the descriptor of section 9):
//! headers, an incremental frame decoder that validates each header before it buffers the
//! payload, Error payloads, the capability hello, control Events and SHM descriptors.

use crate::crc16::crc16;

/// `"HP"`.
pub const MAGIC: u16 = 0x4850;
/// Version 1.0.
pub const VERSION: u16 = 0x0100;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;

pub const REQUEST: u8 = 1;
pub const RESPONSE: u8 = 2;
pub const EVENT: u8 = 3;
pub const ERROR: u8 = 4;

/// Flag bit 0: the payload is a shared-memory descriptor.
pub const FLAG_SHM: u16 = 0x0001;
/// Flag bit 1: the payload is a zstd frame.
pub const FLAG_COMPRESSED: u16 = 0x0002;
const KNOWN_FLAGS: u16 = FLAG_SHM | FLAG_COMPRESSED;

/// Default receive limit for inline payloads (64 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;
/// An Error or control Event is always accepted up to this size (section 6, check 4).
pub const CONTROL_LIMIT: u32 = 4108;
/// Longest Error message a sender sends (section 7).
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Most ids in one HREL, HREJ or HRET (section 8a).
pub const MAX_CONTROL_IDS: usize = 1024;

/// Wire error codes (section 7).
pub mod code {
    pub const GENERIC: u32 = 0;
    pub const CHECKSUM: u32 = 1;
    pub const BAD_HEADER: u32 = 2;
    pub const TOO_LARGE: u32 = 3;
    pub const UNSUPPORTED_FLAGS: u32 = 4;
    pub const HANDLER_ERROR: u32 = 5;
    pub const TIMEOUT: u32 = 6;
    pub const SHM_ERROR: u32 = 7;
    pub const UNAVAILABLE: u32 = 8;
}

/// A frame header's fields (section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub mtype: u32,
    pub flags: u16,
    pub length: u32,
    pub checksum: u16,
    pub request_id: u64,
}

impl Header {
    /// The 24 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        h[2..4].copy_from_slice(&self.version.to_be_bytes());
        h[4..8].copy_from_slice(&self.mtype.to_be_bytes());
        h[8..10].copy_from_slice(&self.flags.to_be_bytes());
        h[10..14].copy_from_slice(&self.length.to_be_bytes());
        h[14..16].copy_from_slice(&self.checksum.to_be_bytes());
        h[16..24].copy_from_slice(&self.request_id.to_be_bytes());
        h
    }

    /// Reads the fields of 24 bytes, without validating them (the magic included).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            version: u16::from_be_bytes([b[2], b[3]]),
            mtype: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            flags: u16::from_be_bytes([b[8], b[9]]),
            length: u32::from_be_bytes([b[10], b[11], b[12], b[13]]),
            checksum: u16::from_be_bytes([b[14], b[15]]),
            request_id: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        }
    }
}

/// The header of a frame carrying `payload` (length and CRC computed).
pub fn header_for(mtype: u8, flags: u16, request_id: u64, payload: &[u8]) -> [u8; HEADER_LEN] {
    Header {
        version: VERSION,
        mtype: mtype as u32,
        flags,
        length: u32::try_from(payload.len()).expect("payload over 4 GiB"),
        checksum: crc16(payload),
        request_id,
    }
    .encode()
}

/// A whole frame's bytes.
pub fn encode_frame(mtype: u8, flags: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header_for(mtype, flags, request_id, payload));
    v.extend_from_slice(payload);
    v
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub version: u16,
    pub mtype: u8,
    pub flags: u16,
    pub request_id: u64,
    pub payload: Vec<u8>,
}

/// A receive-side violation (section 6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Section 7's code.
    pub code: u32,
    /// The receiver can no longer trust frame boundaries.
    pub fatal: bool,
    /// The frame's request id; `None` when the header was unreadable.
    pub request_id: Option<u64>,
    /// The frame's message type, when known.
    pub mtype: Option<u8>,
    /// The frame's flags, when known (a refused SHM frame's segment is handed back).
    pub flags: u16,
    /// For a CRC failure, the payload that failed (the descriptor of an SHM frame is still
    /// needed to hand its segment back).
    pub payload: Vec<u8>,
    pub message: String,
}

enum State {
    /// Waiting for (the rest of) a header.
    Header,
    /// The header is valid; its payload follows, into `big` (a buffer of its own for payloads
    /// over `BIG_PAYLOAD` not yet received) or the shared buffer.
    Payload { hdr: Header, big: Option<Vec<u8>> },
    /// Skipping the payload of a refused frame without buffering it.
    Skip { remaining: u64 },
    /// A fatal error was reported; nothing more is decoded.
    Dead,
}

/// Payloads longer than this that are not already buffered get a buffer of their own, which
/// grows as bytes arrive and is handed to the frame without a copy.
const BIG_PAYLOAD: usize = 64 * 1024;

/// The bytes of unfinished large frames held across the decoders that share it
/// (`max_pending_bytes`, PROTOCOL.md sections 6 and 10).
#[derive(Debug)]
pub struct PendingBudget {
    used: std::sync::atomic::AtomicU64,
    cap: u64,
}

impl PendingBudget {
    pub fn new(cap: u64) -> std::sync::Arc<PendingBudget> {
        std::sync::Arc::new(PendingBudget { used: 0.into(), cap })
    }

    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.used
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.cap)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Bytes taken now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Incremental frame decoder (section 6). Feed bytes with [`FrameDecoder::feed`] (or receive
/// straight into [`FrameDecoder::spare`]), then call [`FrameDecoder::next_frame`] until it
/// returns `Ok(None)`. After a recoverable error, keep calling it; after a fatal one it
/// returns the same error again.
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
    state: State,
    max_payload: u32,
    fatal: Option<DecodeError>,
    into_big: bool,
    budget: Option<std::sync::Arc<PendingBudget>>,
    /// Bytes this decoder holds of `budget` (the frame in progress).
    taken: u64,
}

impl FrameDecoder {
    pub fn new(max_payload: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            pos: 0,
            state: State::Header,
            max_payload,
            fatal: None,
            into_big: false,
            budget: None,
            taken: 0,
        }
    }

    /// Shares `budget` for unfinished frames over 64 KiB whose payload does not arrive with
    /// their header: a frame that would take it over its cap is refused with UNAVAILABLE
    /// (recoverable) and its payload skipped unread.
    pub fn with_budget(mut self, budget: std::sync::Arc<PendingBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    fn give_back(&mut self) {
        if self.taken > 0 {
            if let Some(b) = &self.budget {
                b.give(self.taken);
            }
            self.taken = 0;
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// True while part of a frame has been received and not decoded yet.
    pub fn in_frame(&self) -> bool {
        match &self.state {
            State::Header => self.buf.len() > self.pos,
            State::Dead => false,
            _ => true,
        }
    }

    fn compact(&mut self) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= 1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Room to receive into: a pointer and the number of bytes that may be written there.
    /// Report how many were written with [`FrameDecoder::commit`], before any other call.
    pub fn spare(&mut self) -> (*mut u8, usize) {
        if let State::Payload { hdr, big: Some(v) } = &mut self.state {
            if self.pos == self.buf.len() {
                let want = hdr.length as usize - v.len();
                // Grow as bytes arrive, at most doubling: a peer that declares 64 MiB and
                // sends nothing costs only what it sent.
                v.reserve(want.min(v.len().max(BIG_PAYLOAD)));
                let room = (v.capacity() - v.len()).min(want);
                self.into_big = true;
                // SAFETY: within the allocation, at the end of the initialised bytes.
                return (unsafe { v.as_mut_ptr().add(v.len()) }, room);
            }
        }
        self.into_big = false;
        self.compact();
        self.buf.reserve(BIG_PAYLOAD);
        let room = self.buf.capacity() - self.buf.len();
        // SAFETY: as above.
        (unsafe { self.buf.as_mut_ptr().add(self.buf.len()) }, room)
    }

    /// `n` bytes were written at the pointer [`FrameDecoder::spare`] returned.
    ///
    /// # Safety
    /// `n` must not exceed the room `spare` returned, and those bytes must have been written.
    pub unsafe fn commit(&mut self, n: usize) {
        if self.into_big {
            if let State::Payload { big: Some(v), .. } = &mut self.state {
                v.set_len(v.len() + n);
                return;
            }
        }
        self.buf.set_len(self.buf.len() + n);
    }

    fn die(&mut self, code: u32, request_id: Option<u64>, mtype: Option<u8>, message: String) -> DecodeError {
        let e = DecodeError {
            code,
            fatal: true,
            request_id,
            mtype,
            flags: 0,
            payload: Vec::new(),
            message,
        };
        self.fatal = Some(e.clone());
        self.state = State::Dead;
        e
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or the first violation.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        loop {
            match &mut self.state {
                State::Dead => return Err(self.fatal.clone().expect("dead decoder has an error")),
                State::Skip { remaining } => {
                    let n = ((self.buf.len() - self.pos) as u64).min(*remaining);
                    self.pos += n as usize;
                    *remaining -= n;
                    if *remaining > 0 {
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Header => {
                    let avail = &self.buf[self.pos..];
                    if avail.len() >= 2 && u16::from_be_bytes([avail[0], avail[1]]) != MAGIC {
                        let m = format!("bad magic 0x{:02x}{:02x}", avail[0], avail[1]);
                        return Err(self.die(code::BAD_HEADER, None, None, m));
                    }
                    if avail.len() >= 3 && avail[2] != 1 {
                        let m = format!("unsupported major version {}", avail[2]);
                        return Err(self.die(code::BAD_HEADER, None, None, m));
                    }
                    if avail.len() < HEADER_LEN {
                        return Ok(None);
                    }
                    let hdr = Header::parse(avail[..HEADER_LEN].try_into().unwrap());
                    let rid = hdr.request_id;
                    if !(1..=4).contains(&hdr.mtype) {
                        let m = format!("unknown message type {}", hdr.mtype);
                        return Err(self.die(code::BAD_HEADER, Some(rid), None, m));
                    }
                    let mtype = hdr.mtype as u8;
                    let limit = if mtype == ERROR || (mtype == EVENT && rid == 0) {
                        self.max_payload.max(CONTROL_LIMIT)
                    } else {
                        self.max_payload
                    };
                    if hdr.length > limit {
                        let m = format!("payload of {} bytes over the limit of {}", hdr.length, limit);
                        return Err(self.die(code::TOO_LARGE, Some(rid), Some(mtype), m));
                    }
                    self.pos += HEADER_LEN;
                    if hdr.flags & !KNOWN_FLAGS != 0 {
                        self.state = State::Skip {
                            remaining: hdr.length as u64,
                        };
                        return Err(DecodeError {
                            code: code::UNSUPPORTED_FLAGS,
                            fatal: false,
                            request_id: Some(rid),
                            mtype: Some(mtype),
                            flags: hdr.flags,
                            payload: Vec::new(),
                            message: format!("reserved flag bits set: 0x{:04x}", hdr.flags),
                        });
                    }
                    let len = hdr.length as usize;
                    let big = if len > BIG_PAYLOAD && self.buf.len() - self.pos < len {
                        if let Some(b) = &self.budget {
                            if !b.take(len as u64) {
                                self.state = State::Skip {
                                    remaining: len as u64,
                                };
                                return Err(DecodeError {
                                    code: code::UNAVAILABLE,
                                    fatal: false,
                                    request_id: Some(rid),
                                    mtype: Some(mtype),
                                    flags: hdr.flags,
                                    payload: Vec::new(),
                                    message: format!(
                                        "no room to buffer a frame of {len} bytes now (max_pending_bytes)"
                                    ),
                                });
                            }
                            self.taken = len as u64;
                        }
                        Some(Vec::new())
                    } else {
                        None
                    };
                    self.state = State::Payload { hdr, big };
                }
                State::Payload { hdr, big } => {
                    let len = hdr.length as usize;
                    let hdr = *hdr;
                    let payload = if let Some(v) = big {
                        let n = (len - v.len()).min(self.buf.len() - self.pos);
                        v.extend_from_slice(&self.buf[self.pos..self.pos + n]);
                        self.pos += n;
                        if v.len() < len {
                            return Ok(None);
                        }
                        let v = std::mem::take(v);
                        self.give_back();
                        v
                    } else {
                        if self.buf.len() - self.pos < len {
                            return Ok(None);
                        }
                        let p = self.buf[self.pos..self.pos + len].to_vec();
                        self.pos += len;
                        p
                    };
                    self.state = State::Header;
                    let crc = crc16(&payload);
                    if crc != hdr.checksum {
                        return Err(DecodeError {
                            code: code::CHECKSUM,
                            fatal: false,
                            request_id: Some(hdr.request_id),
                            mtype: Some(hdr.mtype as u8),
                            flags: hdr.flags,
                            message: format!(
                                "payload CRC16 is 0x{:04x} but the header says 0x{:04x}",
                                crc, hdr.checksum
                            ),
                            payload,
                        });
                    }
                    return Ok(Some(Frame {
                        version: hdr.version,
                        mtype: hdr.mtype as u8,
                        flags: hdr.flags,
                        request_id: hdr.request_id,
                        payload,
                    }));
                }
            }
        }
    }
}

impl Drop for FrameDecoder {
    fn drop(&mut self) {
        self.give_back();
    }
}

// -- Error payloads (section 7) ---------------------------------------------------------------

/// Cuts `message` to at most 4096 bytes on a UTF-8 character boundary.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The payload of an Error frame: bincode `(u32, String)`, the message cut to 4096 bytes.
pub fn encode_error(code: u32, message: &str) -> Vec<u8> {
    let m = truncate_message(message).as_bytes();
    let mut v = Vec::with_capacity(12 + m.len());
    v.extend_from_slice(&code.to_le_bytes());
    v.extend_from_slice(&(m.len() as u64).to_le_bytes());
    v.extend_from_slice(m);
    v
}

/// Decodes an Error payload; `None` when it is not a well-formed `(u32, String)`. Invalid
/// UTF-8 is replaced.
pub fn decode_error(payload: &[u8]) -> Option<(u32, String)> {
    if payload.len() < 12 {
        return None;
    }
    let code = u32::from_le_bytes(payload[0..4].try_into().unwrap());
    let n = u64::from_le_bytes(payload[4..12].try_into().unwrap());
    if n != (payload.len() - 12) as u64 {
        return None;
    }
    Some((code, String::from_utf8_lossy(&payload[12..]).into_owned()))
}

// -- The capability hello (section 8) ---------------------------------------------------------

pub const FEATURE_SHM: u32 = 1;
pub const FEATURE_COMPRESSION: u32 = 2;
/// RING, the shared-memory ring (section 9b). This crate does not implement the ring: its
/// hello never announces it, so RING is never negotiated on its connections.
pub const FEATURE_RING: u32 = 4;
pub const DEFAULT_SHM_RECEIVE_BYTES: u64 = 1 << 30;
pub const DEFAULT_SHM_RECEIVE_SEGMENTS: u32 = 64;
const HELLO_MAX_ENTRIES: u64 = 64;
const HELLO_MAX_BYTES: usize = 4096;

/// What a hello announces, with the table's defaults for absent keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub minor: u8,
    pub features: u32,
    pub max_payload: u32,
    pub session_id: Option<[u8; 16]>,
    pub instance_id: Option<[u8; 16]>,
    pub shm_receive_bytes: u64,
    pub shm_receive_segments: u32,
}

impl Default for Hello {
    fn default() -> Self {
        Hello {
            minor: 0,
            features: 0,
            max_payload: DEFAULT_MAX_PAYLOAD,
            session_id: None,
            instance_id: None,
            shm_receive_bytes: DEFAULT_SHM_RECEIVE_BYTES,
            shm_receive_segments: DEFAULT_SHM_RECEIVE_SEGMENTS,
        }
    }
}

/// The entries of a hello payload, in payload order; `None` when it is not a hello (section 8,
/// "Not a hello").
pub fn hello_entries(payload: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    if payload.len() > HELLO_MAX_BYTES || payload.len() < 12 || &payload[..4] != b"HELO" {
        return None;
    }
    let count = u64::from_le_bytes(payload[4..12].try_into().unwrap());
    if count > HELLO_MAX_ENTRIES {
        return None;
    }
    let mut entries: Vec<(u16, &[u8])> = Vec::with_capacity(count as usize);
    let mut p = 12usize;
    for _ in 0..count {
        if payload.len() - p < 10 {
            return None;
        }
        let key = u16::from_le_bytes([payload[p], payload[p + 1]]);
        let n = u64::from_le_bytes(payload[p + 2..p + 10].try_into().unwrap());
        p += 10;
        if n > (payload.len() - p) as u64 {
            return None;
        }
        let n = n as usize;
        if entries.iter().any(|(k, _)| *k == key) {
            return None;
        }
        entries.push((key, &payload[p..p + n]));
        p += n;
    }
    if p != payload.len() {
        return None;
    }
    Some(entries)
}

impl Hello {
    /// Reads a hello payload; `None` when it is not one.
    pub fn decode(payload: &[u8]) -> Option<Hello> {
        let mut h = Hello::default();
        for (key, v) in hello_entries(payload)? {
            match (key, v.len()) {
                (1, 1) => h.minor = v[0],
                (2, 4) => h.features = u32::from_le_bytes(v.try_into().unwrap()),
                (3, 4) => h.max_payload = u32::from_le_bytes(v.try_into().unwrap()),
                (4, 16) => h.session_id = Some(v.try_into().unwrap()),
                (5, 16) => h.instance_id = Some(v.try_into().unwrap()),
                (6, 8) => h.shm_receive_bytes = u64::from_le_bytes(v.try_into().unwrap()),
                (7, 4) => h.shm_receive_segments = u32::from_le_bytes(v.try_into().unwrap()),
                _ => {}
            }
        }
        Some(h)
    }

    /// The hello payload hintens sends: keys 1, 2, 3, 4 and 5 when set, then 6 and 7 only
    /// when it announces SHM, plus `extra` entries, all in increasing key order.
    pub fn encode_with(&self, extra: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut entries: Vec<(u16, Vec<u8>)> = vec![
            (1, vec![self.minor]),
            (2, self.features.to_le_bytes().to_vec()),
            (3, self.max_payload.to_le_bytes().to_vec()),
        ];
        if let Some(s) = self.session_id {
            entries.push((4, s.to_vec()));
        }
        if let Some(s) = self.instance_id {
            entries.push((5, s.to_vec()));
        }
        if self.features & FEATURE_SHM != 0 {
            entries.push((6, self.shm_receive_bytes.to_le_bytes().to_vec()));
            entries.push((7, self.shm_receive_segments.to_le_bytes().to_vec()));
        }
        entries.extend(extra.iter().cloned());
        entries.sort_by_key(|e| e.0);
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(b"HELO");
        v.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (k, val) in entries {
            v.extend_from_slice(&k.to_le_bytes());
            v.extend_from_slice(&(val.len() as u64).to_le_bytes());
            v.extend_from_slice(&val);
        }
        v
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(&[])
    }
}

// -- Control Events (section 8a) --------------------------------------------------------------

/// The kind of a release, reject or retire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// HREL: the receiver no longer reads these segments.
    Release,
    /// HREJ: the receiver does not map these segments.
    Reject,
    /// HRET: the sender retired these segments.
    Retire,
}

impl Control {
    pub fn magic(self) -> &'static [u8; 4] {
        match self {
            Control::Release => b"HREL",
            Control::Reject => b"HREJ",
            Control::Retire => b"HRET",
        }
    }
}

/// Encodes a release, reject or retire (at most 1024 ids).
pub fn encode_control(kind: Control, ids: &[u32]) -> Vec<u8> {
    assert!(ids.len() <= MAX_CONTROL_IDS);
    let mut v = Vec::with_capacity(8 + 4 * ids.len());
    v.extend_from_slice(kind.magic());
    v.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Decodes a release, reject or retire; `None` for anything else (to be ignored).
pub fn decode_control(payload: &[u8]) -> Option<(Control, Vec<u32>)> {
    if payload.len() < 8 {
        return None;
    }
    let kind = match &payload[..4] {
        b"HREL" => Control::Release,
        b"HREJ" => Control::Reject,
        b"HRET" => Control::Retire,
        _ => return None,
    };
    let count = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
    if count > MAX_CONTROL_IDS || payload.len() != 8 + 4 * count {
        return None;
    }
    let ids = payload[8..]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Some((kind, ids))
}

/// Whether a control Event's payload is an HRNG, the ring's switch (sections 8a, 9b), of any
/// shape: the magic alone decides. RING is never negotiated on this crate's connections, so
/// every HRNG it receives is a fatal violation (section 8a): its sender's next bytes would not
/// come on the socket.
pub fn is_ring_switch(payload: &[u8]) -> bool {
    payload.starts_with(b"HRNG")
}

// -- SHM descriptors (section 9) --------------------------------------------------------------

pub const NEW_SEGMENT: u32 = 1;
pub const PEER_SEGMENT: u32 = 2;
pub const DESCRIPTOR_LEN: usize = 32;

/// The 32-byte descriptor of an SHM frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub segment_id: u32,
    pub flags: u32,
    pub size: u64,
    pub offset: u64,
    pub length: u64,
}

impl Descriptor {
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut d = [0u8; DESCRIPTOR_LEN];
        d[0..4].copy_from_slice(&self.segment_id.to_le_bytes());
        d[4..8].copy_from_slice(&self.flags.to_le_bytes());
        d[8..16].copy_from_slice(&self.size.to_le_bytes());
        d[16..24].copy_from_slice(&self.offset.to_le_bytes());
        d[24..32].copy_from_slice(&self.length.to_le_bytes());
        d
    }

    /// The fields of 32 bytes, unvalidated; `None` for another length.
    pub fn parse(b: &[u8]) -> Option<Descriptor> {
        if b.len() != DESCRIPTOR_LEN {
            return None;
        }
        Some(Descriptor {
            segment_id: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            flags: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            size: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            length: u64::from_le_bytes(b[24..32].try_into().unwrap()),
        })
    }

    /// The first "Receiving" check of section 9.
    pub fn is_valid(&self) -> bool {
        self.flags & !(NEW_SEGMENT | PEER_SEGMENT) == 0
            && self.flags != NEW_SEGMENT | PEER_SEGMENT
            && self.segment_id != 0
    }

    /// `offset + length <= size`, without overflow.
    pub fn region_in(&self, size: u64) -> bool {
        self.offset
            .checked_add(self.length)
            .is_some_and(|end| end <= size)
    }
}
