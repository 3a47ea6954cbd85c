//! One bounded `GET` to a member's REST API: a fresh connection (TLS for `https://`, with a
//! client certificate if configured), basic auth if configured, the whole exchange within a
//! time limit, and the body within a size limit.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{RestConfig, ServerTlsConfig, ServerTlsMode};

/// Larger answers are refused: Patroni's `/cluster` of a few dozen members is a few KiB.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("{0}: not an http:// or https:// URL with a host and port")]
    Url(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is over {MAX_BODY} bytes")]
    TooLarge,
}

/// How patroxy asks one cluster's members: TLS, credentials, time limit.
#[derive(Clone)]
pub struct Getter {
    tls: Option<TlsConnector>,
    authorization: Option<String>,
    limit: Duration,
}

impl Getter {
    /// Reads the TLS files `rest` names (a CA verifies the members' certificates in full).
    pub fn new(rest: &RestConfig) -> Result<Getter, crate::tls::TlsError> {
        let tls_config = ServerTlsConfig {
            mode: match rest.ca_file {
                Some(_) => ServerTlsMode::VerifyFull,
                None => ServerTlsMode::Require,
            },
            ca_file: rest.ca_file.clone(),
            cert_file: rest.cert_file.clone(),
            key_file: rest.key_file.clone(),
            require_auth: Vec::new(),
        };
        let tls = crate::tls::connector(&tls_config)?.connector;
        let authorization = match (&rest.username, &rest.password) {
            (Some(u), Some(p)) => Some(format!(
                "Basic {}",
                B64.encode(format!("{u}:{}", p.expose()))
            )),
            _ => None,
        };
        Ok(Getter {
            tls,
            authorization,
            limit: rest.request_timeout,
        })
    }

    /// `GET base + path`: the status code and the body. The credentials go only with
    /// `authorized` (to the members the configuration names, not to addresses read from
    /// the DCS).
    pub async fn get(&self, base: &str, path: &str) -> Result<(u16, Bytes), GetError> {
        self.get_as(base, path, true).await
    }

    pub async fn get_as(
        &self,
        base: &str,
        path: &str,
        authorized: bool,
    ) -> Result<(u16, Bytes), GetError> {
        match tokio::time::timeout(self.limit, self.exchange(base, path, authorized)).await {
            Ok(r) => r,
            Err(_) => Err(GetError::Timeout(self.limit)),
        }
    }

    async fn exchange(
        &self,
        base: &str,
        path: &str,
        authorized: bool,
    ) -> Result<(u16, Bytes), GetError> {
        let (https, host, port) = split(base).ok_or_else(|| GetError::Url(base.to_owned()))?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(GetError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let authority = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let mut req = Request::get(path).header(hyper::header::HOST, authority);
        if let Some(a) = self.authorization.as_ref().filter(|_| authorized) {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| GetError::Http(e.to_string()))?;
        match (https, &self.tls) {
            (false, _) => send(TokioIo::new(tcp), req).await,
            (true, Some(tls)) => {
                let name = crate::tls::server_name(&host).map_err(GetError::Tls)?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| GetError::Tls(e.to_string()))?;
                send(TokioIo::new(stream), req).await
            }
            (true, None) => Err(GetError::Tls("no TLS connector".into())),
        }
    }
}

async fn send<IO>(io: IO, req: Request<Empty<Bytes>>) -> Result<(u16, Bytes), GetError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| GetError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http)?;
    // The connection's driver ends with the exchange (or with this future, when dropped).
    let driver = tokio::spawn(conn);
    let _stop = AbortOnDrop(driver);
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => GetError::TooLarge,
                None => GetError::Http(e.to_string()),
            },
        )?;
    Ok((status, body.to_bytes()))
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `http(s)://host:port[/...]` into (https, host, port); brackets stripped from IPv6.
fn split(base: &str) -> Option<(bool, String, u16)> {
    let (https, rest) = match base.split_once("://")? {
        ("http", r) => (false, r),
        ("https", r) => (true, r),
        _ => return None,
    };
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then(|| (https, host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that answers with more than `MAX_BODY` bytes is refused, not read whole.
    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                2 * MAX_BODY
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&vec![b'x'; 2 * MAX_BODY]).await;
        });
        let getter = Getter::new(&RestConfig::default()).unwrap();
        let got = getter.get(&base, "/cluster").await;
        assert!(matches!(got, Err(GetError::TooLarge)), "{got:?}");
    }

    #[test]
    fn splits_bases() {
        assert_eq!(
            split("http://127.0.0.1:8008"),
            Some((false, "127.0.0.1".into(), 8008))
        );
        assert_eq!(
            split("https://[::1]:8443/patroni"),
            Some((true, "::1".into(), 8443))
        );
        assert_eq!(split("http://host"), None);
        assert_eq!(split("http://:80"), None);
        assert_eq!(split("gopher://h:1"), None);
        assert_eq!(split("http://h:0"), None);
    }
}
