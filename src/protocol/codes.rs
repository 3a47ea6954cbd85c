//! Named constants of the PostgreSQL wire protocol and the SQLSTATEs patroxy sends.

/// First-packet codes (the int32 after the length in an untagged packet).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const PROTOCOL_3_0: u32 = 196_608;
pub const PROTOCOL_3_2: u32 = 196_610;

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH` in pqcomm.h).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// A CancelRequest is 16 bytes in protocol 3.0 and up to 12 + 256 in 3.2.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// Backend message tags patroxy looks at.
pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const ERROR_RESPONSE: u8 = b'E';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const NOTICE_RESPONSE: u8 = b'N';

/// Frontend message tags patroxy looks at.
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const FUNCTION_CALL: u8 = b'F';
pub const TERMINATE: u8 = b'X';
/// The extended protocol: everything from one of these to the next Sync is one request.
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const EXECUTE: u8 = b'E';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const FLUSH: u8 = b'H';
/// The end of the data of a COPY FROM STDIN; the server ignores Syncs until one of these.
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const COPY_IN_RESPONSE: u8 = b'G';

/// `AuthenticationOk`'s code inside an `R` message.
pub const AUTH_OK: u32 = 0;

/// ReadyForQuery transaction status bytes.
pub const TX_IDLE: u8 = b'I';
pub const TX_IN_BLOCK: u8 = b'T';
pub const TX_FAILED: u8 = b'E';

/// SQLSTATEs.
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const CONNECTION_FAILURE: &str = "08006";
/// The connection was lost while a transaction was being committed, or ran: whether it
/// committed is not known.
pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
pub const SQLCLIENT_UNABLE_TO_ESTABLISH: &str = "08001";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// A statement canceled (PostgreSQL's `statement_timeout`, a cancel request).
pub const QUERY_CANCELED: &str = "57014";
/// PostgreSQL's `idle_in_transaction_session_timeout`.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
/// PostgreSQL's `idle_session_timeout`.
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
/// A limit of patroxy's was reached.
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// A database that does not exist.
pub const INVALID_CATALOG_NAME: &str = "3D000";
pub const SYNTAX_ERROR: &str = "42601";
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const INVALID_AUTHORIZATION: &str = "28000";
pub const INVALID_PASSWORD: &str = "28P01";

/// The SQLSTATE a pooled client is told when a server refused patroxy's login on its
/// behalf: the server's own where it speaks of the client's credentials, else 08006.
pub fn refusal_passed_on(sqlstate: &str) -> &'static str {
    match sqlstate {
        INVALID_PASSWORD => INVALID_PASSWORD,
        INVALID_AUTHORIZATION => INVALID_AUTHORIZATION,
        INVALID_CATALOG_NAME => INVALID_CATALOG_NAME,
        _ => CONNECTION_FAILURE,
    }
}
