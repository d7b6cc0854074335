//! Mutual challenge–response between agents with the per-job secret (HMAC-SHA256), which yields
//! per-direction keys for the frame MACs; an agent of another job, or without the secret, is refused.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::{Conn, HANDSHAKE_MAX_BODY, LinkKeys, Message};
use crate::{Error, Result};

/// The per-job secret, mounted from a file by the operator.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Needs at least 16 bytes so that guessing is hopeless.
    pub fn new(bytes: Vec<u8>) -> Result<Secret> {
        if bytes.len() < 16 {
            return Err(Error::Config(format!(
                "the job secret has {} bytes, at least 16 are needed; generate one with `head -c 32 /dev/urandom | base64`",
                bytes.len()
            )));
        }
        Ok(Secret(bytes))
    }

    /// Reads the secret file; surrounding whitespace (a trailing newline) is not part of it.
    pub fn from_file(path: &Path) -> Result<Secret> {
        let raw = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the secret file {}: {e}",
                path.display()
            ))
        })?;
        let text = raw.trim_ascii().to_vec();
        Secret::new(text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    fn tag(&self, label: &str, job: &str, client: &[u8; 32], server: &[u8; 32]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [label.as_bytes(), job.as_bytes(), client, server] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, label: &str, job: &str, c: &[u8; 32], s: &[u8; 32], tag: &[u8; 32]) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [label.as_bytes(), job.as_bytes(), c, s] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac.verify_slice(tag).is_ok()
    }

    fn keys(&self, job: &str, c: &[u8; 32], s: &[u8; 32], am_client: bool) -> LinkKeys {
        let c2s = self.tag("petl-snapshot key client->server", job, c, s);
        let s2c = self.tag("petl-snapshot key server->client", job, c, s);
        if am_client {
            LinkKeys {
                send: c2s,
                recv: s2c,
            }
        } else {
            LinkKeys {
                send: s2c,
                recv: c2s,
            }
        }
    }
}

/// Proofs and keys for other links keyed by the job secret (the trainers' collective), so that
/// every part of petl authenticates with the one secret the same way.
impl Secret {
    /// HMAC-SHA256 under the secret over `label` and `parts`, each prefixed with its length so
    /// that no two different part lists give the same input. Serves as a proof of knowledge of
    /// the secret and, with its own label, as a derived key.
    pub fn prove(&self, label: &str, parts: &[&[u8]]) -> [u8; 32] {
        self.parts_mac(label, parts).finalize().into_bytes().into()
    }

    /// Whether `proof` is [`Secret::prove`] of the same label and parts (compared in constant time).
    pub fn check_proof(&self, label: &str, parts: &[&[u8]], proof: &[u8]) -> bool {
        self.parts_mac(label, parts).verify_slice(proof).is_ok()
    }

    fn parts_mac(&self, label: &str, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

fn nonce() -> [u8; 32] {
    rand::random()
}

/// Dialler's side: proves knowledge of the secret, checks the listener's proof, keys the link.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &Secret,
    job: &str,
    rank: u32,
) -> Result<()> {
    let client = nonce();
    conn.send(&Message::Hello {
        job: job.to_string(),
        rank,
        nonce: client,
    })
    .await?;
    let (server, proof) = match conn.recv_limited(HANDSHAKE_MAX_BODY).await? {
        Message::Challenge { nonce, proof } => (nonce, proof),
        Message::Error { message, .. } => {
            return Err(Error::Auth(format!("peer refused: {message}")));
        }
        other => {
            return Err(other
                .unexpected("during the handshake, for Challenge")
                .into());
        }
    };
    if !secret.verify("petl-snapshot server", job, &client, &server, &proof) {
        return Err(Error::Auth(format!(
            "the peer does not know the secret of job {job:?}; check --peers and --secret-file"
        )));
    }
    let proof = secret.tag("petl-snapshot client", job, &client, &server);
    conn.send(&Message::Proof { proof }).await?;
    conn.authenticate(secret.keys(job, &client, &server, true));
    Ok(())
}

/// Listener's side: refuses another job or a wrong proof; returns the peer's claimed rank.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &Secret,
    job: &str,
) -> Result<u32> {
    let (peer_job, rank, client) = match conn.recv_limited(HANDSHAKE_MAX_BODY).await? {
        Message::Hello { job, rank, nonce } => (job, rank, nonce),
        other => return Err(other.unexpected("during the handshake, for Hello").into()),
    };
    if peer_job != job {
        let message = format!("this agent serves job {job:?}, not {peer_job:?}");
        let error = Error::Auth(message);
        let _ = conn.send(&Message::error(&error)).await;
        return Err(error);
    }
    let server = nonce();
    let proof = secret.tag("petl-snapshot server", job, &client, &server);
    conn.send(&Message::Challenge {
        nonce: server,
        proof,
    })
    .await?;
    match conn.recv_limited(HANDSHAKE_MAX_BODY).await? {
        Message::Proof { proof }
            if secret.verify("petl-snapshot client", job, &client, &server, &proof) => {}
        Message::Proof { .. } => {
            return Err(Error::Auth(format!(
                "rank {rank} sent a wrong proof for job {job:?} (another secret)"
            )));
        }
        other => return Err(other.unexpected("during the handshake, for Proof").into()),
    }
    conn.authenticate(secret.keys(job, &client, &server, false));
    Ok(rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handshake(client_secret: &[u8], client_job: &str) -> (Result<()>, Result<u32>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut ca = Conn::new(a, 1 << 20);
        let mut cb = Conn::new(b, 1 << 20);
        let cs = Secret::new(client_secret.to_vec()).unwrap();
        let ss = Secret::new(b"0123456789abcdef-job-secret".to_vec()).unwrap();
        let job = client_job.to_string();
        let client = tokio::spawn(async move { connect(&mut ca, &cs, &job, 3).await.map(|_| ca) });
        let server = accept(&mut cb, &ss, "job-a").await;
        (client.await.unwrap().map(|_| ()), server)
    }

    #[tokio::test]
    async fn the_right_secret_and_job_authenticate() {
        let (c, s) = handshake(b"0123456789abcdef-job-secret", "job-a").await;
        c.unwrap();
        assert_eq!(s.unwrap(), 3);
    }

    #[tokio::test]
    async fn another_job_is_refused() {
        let (c, s) = handshake(b"0123456789abcdef-job-secret", "job-b").await;
        assert!(c.unwrap_err().to_string().contains("not \"job-b\""));
        assert!(matches!(s, Err(Error::Auth(_))));
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_by_both_sides() {
        let (c, s) = handshake(b"another-secret-of-16+", "job-a").await;
        assert!(matches!(c, Err(Error::Auth(_))));
        assert!(s.is_err());
    }

    #[test]
    fn proofs_bind_label_parts_and_secret() {
        let a = Secret::new(b"0123456789abcdef-job-secret".to_vec()).unwrap();
        let b = Secret::new(b"another-secret-of-16+".to_vec()).unwrap();
        let proof = a.prove("label", &[b"job", b"x"]);
        assert!(a.check_proof("label", &[b"job", b"x"], &proof));
        assert!(!b.check_proof("label", &[b"job", b"x"], &proof));
        assert!(!a.check_proof("other", &[b"job", b"x"], &proof));
        // Length prefixes: moving a byte across a part boundary changes the proof.
        assert!(!a.check_proof("label", &[b"jo", b"bx"], &proof));
        assert!(!a.check_proof("label", &[b"job", b"x"], &proof[..31]));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"short".to_vec()).is_err());
    }
}
