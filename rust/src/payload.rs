//! [`Payload`]: a received payload. Inline payloads own their bytes; a payload that came
//! through shared memory is a zero-copy view of the segment, lent until the `Payload` is
//! dropped, which hands the segment back to its sender (HREL).

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Weak};

use crate::conn::Conn;
use crate::shm::{PeerMapping, Segment};

/// Releases a segment when the last view of it goes.
pub(crate) struct Release {
    conn: Weak<Conn>,
    id: u32,
    own: bool,
}

impl Release {
    pub(crate) fn new(conn: Weak<Conn>, id: u32, own: bool) -> Self {
        Release { conn, id, own }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(c) = self.conn.upgrade() {
            if self.own {
                c.release_own_view(self.id);
            } else {
                c.release_peer(self.id);
            }
        }
    }
}

enum Inner {
    Inline(Vec<u8>),
    Peer {
        map: Arc<PeerMapping>,
        offset: u64,
        len: u64,
        _rel: Release,
        id: u32,
    },
    Own {
        seg: Arc<Segment>,
        offset: u64,
        len: u64,
        _rel: Release,
    },
}

/// A received payload. It derefs to `&[u8]`.
///
/// **Ownership rule.** When [`Payload::is_shared`] is true, the bytes are the sender's shared
/// memory, mapped read-only, with no copy: the sender does not reuse that segment until this
/// `Payload` is dropped (dropping it sends the release). Keep it only as long as you need the
/// bytes, and copy what you keep longer ([`Payload::into_vec`]): a sender whose segments all
/// stay lent waits, then fails with a timeout. The mapping stays valid while the `Payload`
/// lives, even after the connection closed.
pub struct Payload(Inner);

impl Payload {
    pub(crate) fn inline(v: Vec<u8>) -> Self {
        Payload(Inner::Inline(v))
    }

    pub(crate) fn peer(map: Arc<PeerMapping>, offset: u64, len: u64, rel: Release) -> Self {
        let id = rel.id;
        Payload(Inner::Peer {
            map,
            offset,
            len,
            _rel: rel,
            id,
        })
    }

    pub(crate) fn own(seg: Arc<Segment>, offset: u64, len: u64, rel: Release) -> Self {
        Payload(Inner::Own {
            seg,
            offset,
            len,
            _rel: rel,
        })
    }

    /// True when the bytes are a view of shared memory (see the ownership rule above).
    pub fn is_shared(&self) -> bool {
        !matches!(self.0, Inner::Inline(_))
    }

    /// The bytes as a `Vec`: no copy for an inline payload; a shared one is copied and its
    /// segment released at once.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Inner::Inline(v) => v,
            _ => self.to_vec(),
        }
    }

    /// For an echo on `conn`: the segment of `conn`'s peer this payload lies in (id, size,
    /// offset, length). `None` for a payload of another connection, whose peer does not know
    /// that segment.
    pub(crate) fn peer_segment_on(&self, conn: &Conn) -> Option<(u32, u64, u64, u64)> {
        match &self.0 {
            Inner::Peer {
                map,
                offset,
                len,
                id,
                _rel,
            } if std::ptr::eq(_rel.conn.as_ptr(), conn) => Some((*id, map.size, *offset, *len)),
            _ => None,
        }
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Inline(v) => v,
            Inner::Peer { map, offset, len, .. } => map.slice(*offset, *len),
            Inner::Own { seg, offset, len, .. } => seg.slice(*offset, *len),
        }
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}
