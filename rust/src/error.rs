//! Errors. A failure that has a wire code (section 7 of PROTOCOL.md) carries it: the peer's
//! Error frames as [`Error::Remote`], violations this side detected as [`Error::Protocol`].

use crate::wire::code;

/// Section 7's codes, for matching on [`Error::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Generic,
    Checksum,
    BadHeader,
    TooLarge,
    UnsupportedFlags,
    HandlerError,
    Timeout,
    ShmError,
    Unavailable,
    /// 9-999, reserved: treated as generic.
    Reserved(u32),
    /// 1000 and above.
    Application(u32),
}

impl ErrorCode {
    pub fn from_u32(c: u32) -> ErrorCode {
        match c {
            code::GENERIC => ErrorCode::Generic,
            code::CHECKSUM => ErrorCode::Checksum,
            code::BAD_HEADER => ErrorCode::BadHeader,
            code::TOO_LARGE => ErrorCode::TooLarge,
            code::UNSUPPORTED_FLAGS => ErrorCode::UnsupportedFlags,
            code::HANDLER_ERROR => ErrorCode::HandlerError,
            code::TIMEOUT => ErrorCode::Timeout,
            code::SHM_ERROR => ErrorCode::ShmError,
            code::UNAVAILABLE => ErrorCode::Unavailable,
            c if c >= 1000 => ErrorCode::Application(c),
            c => ErrorCode::Reserved(c),
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            ErrorCode::Generic => code::GENERIC,
            ErrorCode::Checksum => code::CHECKSUM,
            ErrorCode::BadHeader => code::BAD_HEADER,
            ErrorCode::TooLarge => code::TOO_LARGE,
            ErrorCode::UnsupportedFlags => code::UNSUPPORTED_FLAGS,
            ErrorCode::HandlerError => code::HANDLER_ERROR,
            ErrorCode::Timeout => code::TIMEOUT,
            ErrorCode::ShmError => code::SHM_ERROR,
            ErrorCode::Unavailable => code::UNAVAILABLE,
            ErrorCode::Reserved(c) | ErrorCode::Application(c) => c,
        }
    }
}

/// Everything a hintens call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer answered with an Error frame.
    #[error("remote error {code}: {message}")]
    Remote { code: u32, message: String },
    /// This side refused a frame the peer sent for this request (a bad CRC, a refused
    /// shared-memory descriptor, ...), with the code it would have answered.
    #[error("protocol error {code}: {message}")]
    Protocol { code: u32, message: String },
    /// The payload is over what the peer accepts and shared memory cannot carry it; nothing
    /// was sent and the connection stays usable.
    #[error("payload of {len} bytes is over the peer's limit of {limit} bytes")]
    TooLarge { len: usize, limit: u64 },
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The connection is closed (by either side, or the peer died).
    #[error("connection closed: {0}")]
    Closed(String),
    /// The server's uid is neither ours nor root.
    #[error("untrusted server: uid {0}")]
    UntrustedServer(u32),
    /// bincode could not encode or decode the value.
    #[error("bincode: {0}")]
    Codec(#[from] bincode::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The wire code, for errors that have one (a local timeout counts as TIMEOUT, a local
    /// size refusal as TOO_LARGE).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote { code, .. } | Error::Protocol { code, .. } => Some(ErrorCode::from_u32(*code)),
            Error::TooLarge { .. } => Some(ErrorCode::TooLarge),
            Error::Timeout(_) => Some(ErrorCode::Timeout),
            _ => None,
        }
    }

    /// The message of a Remote or Protocol error.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Remote { message, .. } | Error::Protocol { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A handler's failure, answered as an Error frame.
#[derive(Debug, Clone)]
pub struct HandlerError {
    pub code: u32,
    pub message: String,
}

impl HandlerError {
    /// The handler failed: HANDLER_ERROR (5) with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            code: code::HANDLER_ERROR,
            message: message.into(),
        }
    }

    /// An application error code (1000 or more).
    pub fn app(code: u32, message: impl Into<String>) -> Self {
        HandlerError {
            code,
            message: message.into(),
        }
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new(e.to_string())
    }
}
