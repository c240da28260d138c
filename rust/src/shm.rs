//! Shared memory (PROTOCOL.md section 9): sealed memfd segments we lend, read-only mappings of
//! the peer's segments, and [`decide`], the receiver's decision for one SHM frame, kept free of
//! I/O so that the vectors of descriptors.json test it directly.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::wire::{self, code, Descriptor, FLAG_COMPRESSED, NEW_SEGMENT, PEER_SEGMENT};

/// Our own segment: a memfd sealed against shrinking and growing (and against writable
/// mappings other than ours, where the kernel has F_SEAL_FUTURE_WRITE), mapped read-write.
pub struct Segment {
    pub id: u32,
    pub size: u64,
    fd: OwnedFd,
    ptr: *mut u8,
}

// SAFETY: the mapping is plain memory owned by this value; writes happen only while the segment
// is not lent (the pool's bookkeeping ensures one writer and no reader at that time).
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Segment {
    /// Creates a sealed memfd of `size` bytes and maps it.
    pub fn create(id: u32, size: u64) -> io::Result<Segment> {
        // SAFETY: plain syscalls on a descriptor we own.
        unsafe {
            let raw = cvt(libc::memfd_create(
                c"hintens".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            ))?;
            let fd = OwnedFd::from_raw_fd(raw);
            cvt(libc::ftruncate(raw, size as libc::off_t))?;
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            );
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let seg = Segment {
                id,
                size,
                fd,
                ptr: ptr as *mut u8,
            };
            // F_SEAL_FUTURE_WRITE (Linux 5.1), added once our own writable mapping exists: the
            // peer can map the segment read-only only, so it cannot change a payload while we
            // write it or read an echo of it. Older kernels refuse it: go on without it.
            let base = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            if libc::fcntl(raw, libc::F_ADD_SEALS, base | libc::F_SEAL_FUTURE_WRITE) != 0 {
                cvt(libc::fcntl(raw, libc::F_ADD_SEALS, base))?;
            }
            Ok(seg)
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Copies `data` to the start of the segment.
    ///
    /// # Safety
    /// Nobody may read the segment meanwhile (it is not lent).
    pub unsafe fn write(&self, data: &[u8]) {
        assert!(data.len() as u64 <= self.size);
        std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, data.len());
    }

    /// The bytes `offset..offset + len` (checked by the caller against `size`).
    pub fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.size));
        // SAFETY: in bounds of the live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len as usize) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.size as usize);
        }
    }
}

/// The peer segments this process maps, across connections, and their bounds
/// (`shm_receive_total_bytes`, `shm_receive_total_segments` of PROTOCOL.md section 10).
static MAPPED_BYTES: AtomicU64 = AtomicU64::new(0);
static MAPPED_SEGMENTS: AtomicU32 = AtomicU32::new(0);
pub const SHM_RECEIVE_TOTAL_BYTES: u64 = 4 << 30;
pub const SHM_RECEIVE_TOTAL_SEGMENTS: u32 = 4096;

/// (bytes mapped, bound, segments mapped, bound) across the process.
pub fn global_mapped() -> Option<(u64, u64, u32, u32)> {
    Some((
        MAPPED_BYTES.load(Ordering::Relaxed),
        SHM_RECEIVE_TOTAL_BYTES,
        MAPPED_SEGMENTS.load(Ordering::Relaxed),
        SHM_RECEIVE_TOTAL_SEGMENTS,
    ))
}

/// A read-only mapping of one of the peer's segments.
pub struct PeerMapping {
    pub size: u64,
    ptr: *const u8,
}

// SAFETY: read-only shared memory; the peer may write it, which only changes the bytes read.
unsafe impl Send for PeerMapping {}
unsafe impl Sync for PeerMapping {}

impl PeerMapping {
    /// Maps `size` bytes of `fd` read-only (after [`decide`] accepted it).
    pub fn map(fd: &OwnedFd, size: u64) -> io::Result<PeerMapping> {
        let len = usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: mapping a descriptor we hold; checked against its size and seals first.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        MAPPED_BYTES.fetch_add(size, Ordering::Relaxed);
        MAPPED_SEGMENTS.fetch_add(1, Ordering::Relaxed);
        Ok(PeerMapping {
            size,
            ptr: ptr as *const u8,
        })
    }

    pub fn slice(&self, offset: u64, len: u64) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|e| e <= self.size));
        // SAFETY: in bounds of the live mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(offset as usize), len as usize) }
    }
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        MAPPED_BYTES.fetch_sub(self.size, Ordering::Relaxed);
        MAPPED_SEGMENTS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: our mapping, unmapped once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.size as usize);
        }
    }
}

/// What a received descriptor is, as far as section 9 cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdInfo {
    pub regular: bool,
    pub size: u64,
    pub seal_shrink: bool,
}

impl FdInfo {
    /// fstat and F_GET_SEALS of a received descriptor.
    pub fn of(fd: &OwnedFd) -> FdInfo {
        // SAFETY: fstat into a zeroed struct; fcntl on a descriptor we hold.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return FdInfo {
                    regular: false,
                    size: 0,
                    seal_shrink: false,
                };
            }
            let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
            FdInfo {
                regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
                size: st.st_size as u64,
                seal_shrink: seals >= 0 && seals & libc::F_SEAL_SHRINK != 0,
            }
        }
    }
}

/// The receiver's side of one connection's shared memory, as [`decide`] needs it.
pub struct ReceiverView<'a> {
    /// SHM was negotiated (both hellos announce it).
    pub negotiated: bool,
    /// We announced COMPRESSION and so did the peer.
    pub compression: bool,
    pub shm_receive_bytes: u64,
    pub shm_receive_segments: u32,
    /// The peer's segments mapped here: id to size.
    pub mapped: &'a HashMap<u32, u64>,
    /// Our segments lent to the peer: id to size.
    pub lent: &'a HashMap<u32, u64>,
    /// Bytes and segments mapped across all connections, and their bounds.
    pub global: Option<(u64, u64, u32, u32)>,
}

/// Where an accepted payload lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lent {
    /// In the peer's segment `id`; `new` when it must be mapped first (NEW_SEGMENT).
    Peer { id: u32, new: bool, size: u64 },
    /// In our own segment `id` (PEER_SEGMENT, an echo).
    Own { id: u32 },
}

/// The decision for one SHM frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Lend {
        at: Lent,
        offset: u64,
        length: u64,
    },
    /// Refused with `code`; `hand_back` is the control Event to send at once for the
    /// descriptor's segment id.
    Refuse {
        code: u32,
        message: String,
        hand_back: Option<(wire::Control, u32)>,
    },
}

/// The segment a refused frame hands back (section 9, "Refused SHM frames").
pub(crate) fn hand_back(payload: &[u8], mapped: &HashMap<u32, u64>) -> Option<(wire::Control, u32)> {
    let d = Descriptor::parse(payload)?;
    if d.segment_id == 0 || d.flags & PEER_SEGMENT != 0 {
        return None;
    }
    if mapped.contains_key(&d.segment_id) {
        Some((wire::Control::Release, d.segment_id))
    } else {
        Some((wire::Control::Reject, d.segment_id))
    }
}

/// Section 9's checks for a frame of type `mtype` with the SHM flag and `payload`; `fd` is
/// the descriptor that came for it (NEW_SEGMENT frames take one), described by `fd_info`.
pub fn decide(
    view: &ReceiverView<'_>,
    mtype: u8,
    request_id: u64,
    flags: u16,
    payload: &[u8],
    fd_info: Option<FdInfo>,
) -> Decision {
    let refuse = |code: u32, message: &str| Decision::Refuse {
        code,
        message: message.to_string(),
        hand_back: hand_back(payload, view.mapped),
    };
    if mtype == wire::ERROR {
        return refuse(code::UNSUPPORTED_FLAGS, "an Error frame never uses shared memory");
    }
    if mtype == wire::EVENT && request_id == 0 {
        return refuse(
            code::UNSUPPORTED_FLAGS,
            "a control Event never uses shared memory",
        );
    }
    if flags & FLAG_COMPRESSED != 0 {
        return refuse(code::UNSUPPORTED_FLAGS, "COMPRESSED together with SHM");
    }
    if !view.negotiated {
        return refuse(code::SHM_ERROR, "shared memory was not negotiated");
    }
    let Some(d) = Descriptor::parse(payload) else {
        return refuse(code::SHM_ERROR, "a descriptor is 32 bytes");
    };
    if !d.is_valid() {
        return refuse(code::SHM_ERROR, "invalid descriptor flags or segment id 0");
    }
    if d.flags & PEER_SEGMENT != 0 {
        return match view.lent.get(&d.segment_id) {
            Some(&size) if size == d.size && d.region_in(size) => Decision::Lend {
                at: Lent::Own { id: d.segment_id },
                offset: d.offset,
                length: d.length,
            },
            Some(_) => refuse(code::SHM_ERROR, "PEER_SEGMENT region or size out of bounds"),
            None => refuse(
                code::SHM_ERROR,
                "PEER_SEGMENT names no segment of ours that is lent",
            ),
        };
    }
    if d.flags & NEW_SEGMENT != 0 {
        let Some(info) = fd_info else {
            return refuse(code::SHM_ERROR, "NEW_SEGMENT without a file descriptor");
        };
        if view.mapped.contains_key(&d.segment_id) {
            return refuse(code::SHM_ERROR, "NEW_SEGMENT for a segment id already mapped");
        }
        if d.size == 0 {
            return refuse(code::SHM_ERROR, "segment size 0");
        }
        if !info.regular {
            return refuse(code::SHM_ERROR, "the descriptor is not a regular file");
        }
        if !info.seal_shrink {
            return refuse(code::SHM_ERROR, "the memfd is not sealed against shrinking");
        }
        if info.size < d.size {
            return refuse(code::SHM_ERROR, "the memfd is smaller than the segment size");
        }
        let bytes: u64 = view.mapped.values().sum();
        if bytes
            .checked_add(d.size)
            .map_or(true, |b| b > view.shm_receive_bytes)
            || view.mapped.len() as u64 + 1 > view.shm_receive_segments as u64
        {
            return refuse(
                code::SHM_ERROR,
                "the segment is over this connection's mapping bounds",
            );
        }
        if let Some((gb, gmax, gs, gsmax)) = view.global {
            if gb.checked_add(d.size).map_or(true, |b| b > gmax) || gs >= gsmax {
                return refuse(
                    code::SHM_ERROR,
                    "the segment is over the process's mapping bounds",
                );
            }
        }
        if usize::try_from(d.size).is_err() {
            return refuse(code::SHM_ERROR, "segment size over the address space");
        }
        if !d.region_in(d.size) {
            return refuse(code::SHM_ERROR, "offset + length past the segment size");
        }
        return Decision::Lend {
            at: Lent::Peer {
                id: d.segment_id,
                new: true,
                size: d.size,
            },
            offset: d.offset,
            length: d.length,
        };
    }
    match view.mapped.get(&d.segment_id) {
        None => refuse(code::SHM_ERROR, "unknown segment id"),
        Some(&size) if size != d.size => refuse(code::SHM_ERROR, "segment size differs from its mapping"),
        Some(&size) if !d.region_in(size) => refuse(code::SHM_ERROR, "offset + length past the segment size"),
        Some(&size) => Decision::Lend {
            at: Lent::Peer {
                id: d.segment_id,
                new: false,
                size,
            },
            offset: d.offset,
            length: d.length,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_segments_are_sealed_and_closed_to_other_writers() {
        let seg = Segment::create(1, 1 << 20).unwrap();
        // SAFETY: fcntl and mmap on the segment's descriptor.
        unsafe {
            let seals = libc::fcntl(seg.raw_fd(), libc::F_GET_SEALS);
            assert_eq!(seals & libc::F_SEAL_SHRINK, libc::F_SEAL_SHRINK);
            assert_eq!(seals & libc::F_SEAL_SEAL, libc::F_SEAL_SEAL);
            if seals & libc::F_SEAL_FUTURE_WRITE != 0 {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    seg.raw_fd(),
                    0,
                );
                assert_eq!(p, libc::MAP_FAILED, "a second writable mapping must be refused");
            }
            seg.write(b"still writable here");
        }
        assert_eq!(seg.slice(0, 19), b"still writable here");
        let info = FdInfo::of(&seg.fd);
        assert!(info.regular && info.seal_shrink && info.size == 1 << 20);
    }
}
