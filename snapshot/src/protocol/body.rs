//! The byte layout of every message body (little-endian integers, length-prefixed strings,
//! JSON for the agreement's status): written in up to three parts, a small lead, a large payload
//! that is sent as it is, and a shard's digest after it; read field by field, each short read
//! naming its field.

use bytes::Bytes;
use serde::Deserialize;

use super::ProtocolError;
use super::message::{Fault, Kind, Message, ShardHeader, Tier};
use crate::Result;

/// Bytes of a shard header on the wire before its payload (all its fields but the digest).
pub(super) const SHARD_LEAD_LEN: usize = 4 + 8 + 4 + 2 + 2 + 8;
/// Bytes of a shard's digest, which follows its payload.
pub(super) const DIGEST_LEN: usize = 32;

/// Frames whose payload is bound by the BLAKE3 digest that follows it: the MAC covers the
/// frame header, the leading part and that digest, and the receiver hashes the payload as it
/// arrives and compares. A shard is thus hashed once when encoded and once per receipt, never
/// again for a MAC; and as the digest comes last, the sender can hash a shard while it sends it
/// (`Conn::send_shard`) instead of before. Returns the length of the leading part.
pub(super) fn bound_payload(kind: Kind) -> Option<usize> {
    matches!(kind, Kind::StoreShard | Kind::Shard).then_some(SHARD_LEAD_LEN)
}

/// A message body in the parts it is written in.
pub(super) struct Body {
    pub lead: Vec<u8>,
    pub payload: Option<Bytes>,
    /// A bound payload's digest (empty otherwise).
    pub trailer: Vec<u8>,
}

impl Body {
    pub fn len(&self) -> usize {
        self.lead.len() + self.payload.as_ref().map_or(0, Bytes::len) + self.trailer.len()
    }
}

impl Message {
    /// The small leading part of the body, the large payload that follows it unchanged, and a
    /// shard's digest after that.
    pub(super) fn body(&self) -> Body {
        let mut w = Vec::new();
        let mut trailer = Vec::new();
        let payload = match self {
            Message::Hello { job, rank, nonce } => {
                put_str(&mut w, job);
                w.extend_from_slice(&rank.to_le_bytes());
                w.extend_from_slice(nonce);
                None
            }
            Message::Challenge { nonce, proof } => {
                w.extend_from_slice(nonce);
                w.extend_from_slice(proof);
                None
            }
            Message::Proof { proof } => {
                w.extend_from_slice(proof);
                None
            }
            Message::StoreShard { header, data } | Message::Shard { header, data } => {
                put_shard_lead(&mut w, header);
                trailer.extend_from_slice(&header.checksum);
                Some(data.clone())
            }
            Message::Ack | Message::NotFound | Message::StatusQuery => None,
            Message::Commit { owner, generation } | Message::Rollback { owner, generation } => {
                w.extend_from_slice(&owner.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                None
            }
            Message::FetchShard {
                owner,
                generation,
                index,
            } => {
                w.extend_from_slice(&owner.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&index.to_le_bytes());
                None
            }
            Message::Status(status) => {
                w = serde_json::to_vec(status).expect("status serialises");
                None
            }
            Message::Agreement(agreement) => {
                w = serde_json::to_vec(agreement).expect("agreement serialises");
                None
            }
            Message::Error { fault, message } => {
                w.push(*fault as u8);
                w.extend_from_slice(message.as_bytes());
                None
            }
            Message::Put { snapshot } => Some(snapshot.clone()),
            Message::PutAck {
                generation,
                durable_every,
                data_shards,
                parity_shards,
            } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&durable_every.to_le_bytes());
                w.extend_from_slice(&data_shards.to_le_bytes());
                w.extend_from_slice(&parity_shards.to_le_bytes());
                None
            }
            Message::PutFd { len } => {
                w.extend_from_slice(&len.to_le_bytes());
                None
            }
            Message::Agree { timeout_ms } => {
                w.extend_from_slice(&timeout_ms.to_le_bytes());
                None
            }
            Message::Restore { generation, from } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.push(*from as u8);
                None
            }
            Message::Restored { tier, snapshot } => {
                w.push(*tier as u8);
                Some(snapshot.clone())
            }
            Message::WaitCommitted {
                generation,
                timeout_ms,
            } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&timeout_ms.to_le_bytes());
                None
            }
            Message::Committed { newest, pending } => {
                put_option(&mut w, *newest);
                put_option(&mut w, *pending);
                None
            }
        };
        Body {
            lead: w,
            payload,
            trailer,
        }
    }

    /// Reads a body of `kind`; every field must be there and nothing may follow the last.
    pub(super) fn decode(kind: Kind, body: Bytes) -> Result<Message> {
        let mut r = BodyReader { kind, body, pos: 0 };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                job: r.string("job")?,
                rank: r.u32("rank")?,
                nonce: r.array("nonce")?,
            },
            Kind::Challenge => Message::Challenge {
                nonce: r.array("nonce")?,
                proof: r.array("proof")?,
            },
            Kind::Proof => Message::Proof {
                proof: r.array("proof")?,
            },
            Kind::StoreShard => {
                let (header, data) = r.shard()?;
                Message::StoreShard { header, data }
            }
            Kind::Ack => Message::Ack,
            Kind::Commit => Message::Commit {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
            },
            Kind::FetchShard => Message::FetchShard {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
                index: r.u32("index")?,
            },
            Kind::Shard => {
                let (header, data) = r.shard()?;
                Message::Shard { header, data }
            }
            Kind::Rollback => Message::Rollback {
                owner: r.u32("owner")?,
                generation: r.u64("generation")?,
            },
            Kind::NotFound => Message::NotFound,
            Kind::StatusQuery => Message::StatusQuery,
            Kind::Status => Message::Status(r.json("status")?),
            Kind::Error => Message::Error {
                fault: Fault::from_code(r.u8("fault")?),
                message: String::from_utf8_lossy(&r.rest()).into_owned(),
            },
            Kind::Put => Message::Put { snapshot: r.rest() },
            Kind::PutFd => Message::PutFd { len: r.u64("len")? },
            Kind::PutAck => Message::PutAck {
                generation: r.u64("generation")?,
                durable_every: r.u64("durable_every")?,
                data_shards: r.u16("data_shards")?,
                parity_shards: r.u16("parity_shards")?,
            },
            Kind::Agree => Message::Agree {
                timeout_ms: r.u64("timeout_ms")?,
            },
            Kind::Agreement => Message::Agreement(r.json("agreement")?),
            Kind::Restore => Message::Restore {
                generation: r.u64("generation")?,
                from: Tier::try_from(r.u8("from")?)?,
            },
            Kind::Restored => Message::Restored {
                tier: Tier::try_from(r.u8("tier")?)?,
                snapshot: r.rest(),
            },
            Kind::WaitCommitted => Message::WaitCommitted {
                generation: r.u64("generation")?,
                timeout_ms: r.u64("timeout_ms")?,
            },
            Kind::Committed => Message::Committed {
                newest: r.option("newest")?,
                pending: r.option("pending")?,
            },
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    w.extend_from_slice(&(len as u16).to_le_bytes());
    w.extend_from_slice(&s.as_bytes()[..len]);
}

fn put_option(w: &mut Vec<u8>, value: Option<u64>) {
    w.push(value.is_some() as u8);
    w.extend_from_slice(&value.unwrap_or(0).to_le_bytes());
}

/// A shard header's fields but its digest, which goes after the payload.
pub(super) fn put_shard_lead(w: &mut Vec<u8>, h: &ShardHeader) {
    w.extend_from_slice(&h.owner.to_le_bytes());
    w.extend_from_slice(&h.generation.to_le_bytes());
    w.extend_from_slice(&h.index.to_le_bytes());
    w.extend_from_slice(&h.data_shards.to_le_bytes());
    w.extend_from_slice(&h.parity_shards.to_le_bytes());
    w.extend_from_slice(&h.original_len.to_le_bytes());
}

/// Reads fields off a body; running short names the field that was cut.
struct BodyReader {
    kind: Kind,
    body: Bytes,
    pos: usize,
}

impl BodyReader {
    fn take(&mut self, needed: usize, field: &'static str) -> Result<&[u8], ProtocolError> {
        let left = self.body.len() - self.pos;
        if left < needed {
            return Err(ProtocolError::ShortBody {
                kind: self.kind,
                field,
                needed,
                left,
            });
        }
        self.pos += needed;
        Ok(&self.body[self.pos - needed..self.pos])
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.take(2, f)?.try_into().expect("2")))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take(4, f)?.try_into().expect("4")))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8, f)?.try_into().expect("8")))
    }
    fn option(&mut self, f: &'static str) -> Result<Option<u64>, ProtocolError> {
        let some = self.u8(f)? != 0;
        let value = self.u64(f)?;
        Ok(some.then_some(value))
    }
    fn array(&mut self, f: &'static str) -> Result<[u8; 32], ProtocolError> {
        Ok(self.take(32, f)?.try_into().expect("32"))
    }
    fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let len = self.u16(field)? as usize;
        let raw = self.take(len, field)?.to_vec();
        String::from_utf8(raw).map_err(|_| ProtocolError::NotUtf8 {
            kind: self.kind,
            field,
        })
    }
    /// A shard's leading fields, its payload, and the digest that ends the body.
    fn shard(&mut self) -> Result<(ShardHeader, Bytes), ProtocolError> {
        let owner = self.u32("owner")?;
        let generation = self.u64("generation")?;
        let index = self.u32("index")?;
        let data_shards = self.u16("data_shards")?;
        let parity_shards = self.u16("parity_shards")?;
        let original_len = self.u64("original_len")?;
        let left = self.body.len() - self.pos;
        if left < DIGEST_LEN {
            return Err(ProtocolError::ShortBody {
                kind: self.kind,
                field: "checksum",
                needed: DIGEST_LEN,
                left,
            });
        }
        let data = self.body.slice(self.pos..self.body.len() - DIGEST_LEN);
        self.pos += data.len();
        let checksum = self.array("checksum")?;
        let header = ShardHeader {
            owner,
            generation,
            index,
            data_shards,
            parity_shards,
            original_len,
            checksum,
        };
        Ok((header, data))
    }
    fn rest(&mut self) -> Bytes {
        let rest = self.body.slice(self.pos..);
        self.pos = self.body.len();
        rest
    }
    fn json<T: for<'de> Deserialize<'de>>(
        &mut self,
        field: &'static str,
    ) -> Result<T, ProtocolError> {
        let rest = self.rest();
        serde_json::from_slice(&rest).map_err(|source| ProtocolError::Json {
            kind: self.kind,
            field,
            source,
        })
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.pos != self.body.len() {
            return Err(ProtocolError::TrailingBytes {
                kind: self.kind,
                extra: self.body.len() - self.pos,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn a_short_fixed_body_names_the_missing_field() {
        let err = Message::decode(Kind::Commit, Bytes::from_static(&[1, 0, 0, 0, 5])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::ShortBody {
                    kind: Kind::Commit,
                    field: "generation",
                    needed: 8,
                    left: 1
                })
            ),
            "{err}"
        );
        let err = Message::decode(Kind::Ack, Bytes::from_static(&[1])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Protocol(ProtocolError::TrailingBytes {
                    kind: Kind::Ack,
                    extra: 1
                })
            ),
            "{err}"
        );
        let err = Message::decode(Kind::Restore, Bytes::from_static(&[0; 9])).unwrap_err();
        assert!(
            matches!(err, Error::Protocol(ProtocolError::UnknownTier { tier: 0 })),
            "{err}"
        );
    }

    #[test]
    fn every_message_reads_back_as_written() {
        let header = ShardHeader {
            owner: 3,
            generation: 9,
            index: 1,
            data_shards: 2,
            parity_shards: 1,
            original_len: 1000,
            checksum: [5; 32],
        };
        let all = [
            Message::Hello {
                job: "job".into(),
                rank: 1,
                nonce: [1; 32],
            },
            Message::Challenge {
                nonce: [2; 32],
                proof: [3; 32],
            },
            Message::Proof { proof: [4; 32] },
            Message::StoreShard {
                header,
                data: Bytes::from_static(b"abc"),
            },
            Message::Ack,
            Message::Commit {
                owner: 1,
                generation: 2,
            },
            Message::FetchShard {
                owner: 1,
                generation: 2,
                index: 3,
            },
            Message::Shard {
                header,
                data: Bytes::new(),
            },
            Message::NotFound,
            Message::StatusQuery,
            Message::Status(Default::default()),
            Message::Error {
                fault: Fault::Timeout,
                message: "slow".into(),
            },
            Message::Rollback {
                owner: 2,
                generation: 7,
            },
            Message::Put {
                snapshot: Bytes::from_static(b"s"),
            },
            Message::PutAck {
                generation: 4,
                durable_every: 100,
                data_shards: 3,
                parity_shards: 1,
            },
            Message::Agree { timeout_ms: 10 },
            Message::Agreement(None),
            Message::Restore {
                generation: 4,
                from: Tier::Peers,
            },
            Message::Restored {
                tier: Tier::Durable,
                snapshot: Bytes::from_static(b"s"),
            },
            Message::WaitCommitted {
                generation: 4,
                timeout_ms: 5,
            },
            Message::Committed {
                newest: Some(3),
                pending: None,
            },
            Message::PutFd { len: 77 },
        ];
        let kinds: Vec<Kind> = all.iter().map(Message::kind).collect();
        assert_eq!(kinds, Kind::ALL, "one sample per kind, in wire order");
        for msg in all {
            let body = msg.body();
            let body = [
                body.lead,
                body.payload.unwrap_or_default().to_vec(),
                body.trailer,
            ]
            .concat();
            assert_eq!(Message::decode(msg.kind(), Bytes::from(body)).unwrap(), msg);
        }
    }
}
