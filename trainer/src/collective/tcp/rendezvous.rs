//! Forming the ring: each rank dials the next rank (retrying while its name does not resolve or
//! nothing listens yet) while it accepts the previous one, then all ranks check, in one round
//! over the new ring, that every link joins the incarnations that are in this group.
//!
//! A rank that fails while the group forms sends the cause down the ring (an `Abort` frame), so
//! every rank reports the rank that never came rather than a neighbour that gave up on it.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use super::TcpConfig;
use super::handshake::{self, Agreed, Failed, Identity, Incarnation};
use super::link::{self, Expect, Kind, Receiver, Sender};
use super::ring::Ring;
use crate::collective::{CollectiveError, Result};

/// How long one handshake may take once TCP has connected: a peer that accepted the connection
/// but does not answer is treated like one that is not there yet.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two dial attempts.
const MAX_PAUSE: Duration = Duration::from_millis(500);
/// How often the accepting side looks at the listener and the abort flag.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// A listening socket for the ring: re-bindable at once after a group is dropped (SO_REUSEADDR),
/// with the socket buffers the accepted links inherit.
pub(crate) fn listen(address: SocketAddr, buffer: Option<usize>) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let Some(bytes) = buffer {
        socket.set_recv_buffer_size(bytes)?;
        socket.set_send_buffer_size(bytes)?;
    }
    socket.bind(&address.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn tune(stream: &TcpStream, buffer: Option<usize>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if let Some(bytes) = buffer {
        let sock = SockRef::from(stream);
        sock.set_recv_buffer_size(bytes)?;
        sock.set_send_buffer_size(bytes)?;
    }
    Ok(())
}

fn set_timeouts(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let timeout = Some(timeout.max(Duration::from_millis(10)));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)
}

/// Why one half of the formation stopped.
enum Stop {
    /// The other half failed first.
    Cancelled,
    Error(CollectiveError),
}

/// Forms this rank's place on the ring within the configured connect deadline.
pub(crate) fn form(config: &TcpConfig, listener: TcpListener) -> Result<Ring> {
    let size = config.peers.len();
    let rank = config.rank;
    let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);
    let deadline = Instant::now() + config.connect_deadline;
    let me = Identity {
        job: &config.job,
        secret: &config.secret,
        world_size: size,
        rank,
        incarnation: rand::random(),
    };
    let stop = AtomicBool::new(false);
    let first: Mutex<Option<CollectiveError>> = Mutex::new(None);
    let record = |outcome: Stop| {
        if let Stop::Error(error) = outcome {
            stop.store(true, Ordering::SeqCst);
            let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
            // A refusal says more than a deadline: it names why the ring could not close.
            let refusal_after_deadline = matches!(
                (&*first, &error),
                (
                    Some(CollectiveError::PeerUnreachable { .. }),
                    CollectiveError::Auth { .. }
                )
            );
            if first.is_none() || refusal_after_deadline {
                *first = Some(error);
            }
        }
    };
    let (dialled, accepted) = std::thread::scope(|scope| {
        let dialler = scope.spawn(|| dial(config, &me, next, deadline, &stop).map_err(&record));
        let accepted = accept(config, &me, &listener, prev, deadline, &stop).map_err(&record);
        let dialled = dialler.join().unwrap_or(Err(()));
        (dialled, accepted)
    });
    drop(listener);
    let failure = first.into_inner().unwrap_or_else(|p| p.into_inner());
    let ((mut to_next, next_incarnation), (from_prev, prev_incarnation)) =
        match (dialled, accepted, failure) {
            (Ok(d), Ok(a), None) => (d, a),
            (dialled, _, failure) => {
                let error = failure.unwrap_or_else(|| {
                    CollectiveError::Usage("the dialling thread panicked".into())
                });
                if let Ok((mut to_next, _)) = dialled {
                    // Best effort: tell the ranks downstream why the group cannot form.
                    let _ = to_next.send(Kind::Abort, &[&link::encode_abort(&error)]);
                }
                return Err(error);
            }
        };
    let mut from_prev = from_prev;
    let round = check_round(
        &mut to_next,
        &mut from_prev,
        &me,
        [prev_incarnation, next_incarnation],
        deadline,
        config.op_timeout,
    );
    if let Err(error) = round {
        let _ = to_next.send(Kind::Abort, &[&link::encode_abort(&error)]);
        return Err(error);
    }
    Ring::new(to_next, from_prev, rank, size)
}

/// Dials rank `to` until it answers and passes the handshake, or the deadline passes.
fn dial(
    config: &TcpConfig,
    me: &Identity,
    to: usize,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(Sender, Incarnation), Stop> {
    let address = &config.peers[to];
    let mut pause = Duration::from_millis(10);
    let mut problem = String::from("no attempt was made");
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(rank = to, %address, %problem, "peer unreachable");
            return Err(Stop::Error(CollectiveError::PeerUnreachable {
                rank: to,
                address: address.clone(),
                waited: config.connect_deadline,
            }));
        }
        match dial_once(config, me, to, address, deadline) {
            Ok((stream, agreed)) => {
                set_timeouts(&stream, config.op_timeout).map_err(|source| {
                    Stop::Error(CollectiveError::PeerLost { rank: to, source })
                })?;
                let sender = Sender::new(stream, to, agreed.forward_key, config.op_timeout);
                return Ok((sender, agreed.peer_incarnation));
            }
            Err(Failed::Fatal(error)) => return Err(Stop::Error(error)),
            Err(Failed::Retry(why)) => {
                tracing::debug!(rank = to, %address, %why, "dial attempt failed; retrying");
                problem = why;
            }
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// One attempt: resolve the name (a headless Service's name resolves only once its pod
/// exists), connect to each address it gives, and run the handshake.
fn dial_once(
    config: &TcpConfig,
    me: &Identity,
    to: usize,
    address: &str,
    deadline: Instant,
) -> Result<(TcpStream, Agreed), Failed> {
    let addresses = address
        .to_socket_addrs()
        .map_err(|e| Failed::Retry(format!("resolving {address}: {e}")))?;
    let mut outcome = Err(Failed::Retry(format!("{address} resolved to no address")));
    for candidate in addresses {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let connected = connect(candidate, left.min(HANDSHAKE_TIMEOUT), config.socket_buffer);
        let mut stream = match connected {
            Ok(stream) => stream,
            Err(e) => {
                outcome = Err(Failed::Retry(format!("connecting to {candidate}: {e}")));
                continue;
            }
        };
        let prepared = set_timeouts(&stream, left.min(HANDSHAKE_TIMEOUT));
        if let Err(e) = prepared {
            outcome = Err(Failed::Retry(format!("{candidate}: {e}")));
            continue;
        }
        match handshake::dial(&mut stream, me, to) {
            Ok(agreed) => return Ok((stream, agreed)),
            Err(Failed::Retry(why)) => outcome = Err(Failed::Retry(format!("{candidate}: {why}"))),
            Err(fatal) => return Err(fatal),
        }
    }
    outcome
}

fn connect(address: SocketAddr, timeout: Duration, buffer: Option<usize>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // Buffers are set before the connection exists, so the window scale covers them.
    if let Some(bytes) = buffer {
        socket.set_recv_buffer_size(bytes)?;
        socket.set_send_buffer_size(bytes)?;
    }
    socket.connect_timeout(&address.into(), timeout)?;
    let stream: TcpStream = socket.into();
    tune(&stream, None)?;
    Ok(stream)
}

/// Accepts connections until rank `from` passes the handshake, or the deadline passes.
/// Connections that are not petl ranks are dropped, and a dialler of another job or with another
/// secret is refused (its own formation ends with that refusal); waiting goes on, since anyone
/// who can reach the port could otherwise end this job's formation. If rank `from` never passes,
/// the deadline reports the last refusal rather than an unreachable peer: a misconfigured
/// previous rank is named with the reason.
fn accept(
    config: &TcpConfig,
    me: &Identity,
    listener: &TcpListener,
    from: usize,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<(Receiver, Incarnation), Stop> {
    let io_failed =
        |source: io::Error| Stop::Error(CollectiveError::PeerLost { rank: from, source });
    listener.set_nonblocking(true).map_err(io_failed)?;
    let mut refused: Option<CollectiveError> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(refused.map_or(Stop::Cancelled, Stop::Error));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Stop::Error(refused.unwrap_or_else(|| {
                CollectiveError::PeerUnreachable {
                    rank: from,
                    address: config.peers[from].clone(),
                    waited: config.connect_deadline,
                }
            })));
        }
        let (mut stream, remote) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL.min(left));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a ring connection failed; retrying");
                std::thread::sleep(ACCEPT_POLL.min(left));
                continue;
            }
        };
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| tune(&stream, config.socket_buffer))
            .and_then(|()| set_timeouts(&stream, left.min(HANDSHAKE_TIMEOUT)));
        if let Err(e) = prepared {
            tracing::debug!(%remote, error = %e, "dropped a connection");
            continue;
        }
        match handshake::accept(&mut stream, me, from) {
            Ok(agreed) => {
                set_timeouts(&stream, config.op_timeout).map_err(io_failed)?;
                let receiver = Receiver::new(stream, from, agreed.forward_key, config.op_timeout);
                return Ok((receiver, agreed.peer_incarnation));
            }
            Err(Failed::Fatal(error @ CollectiveError::Auth { .. })) => {
                tracing::warn!(%remote, %error, "refused a connection; still waiting for rank {from}");
                refused = Some(error);
            }
            Err(Failed::Fatal(error)) => return Err(Stop::Error(error)),
            Err(Failed::Retry(why)) => {
                tracing::debug!(%remote, %why, "dropped a connection that is not rank {from}");
            }
        }
    }
}

/// One all-gather round over the new ring of what each rank saw: its own incarnation and its
/// neighbours'. Every link must join two incarnations that are in the group, so a connection
/// left from an earlier incarnation of a peer cannot pass for the current one. The round also
/// makes formation a barrier: no rank starts work before the whole ring stands.
fn check_round(
    to_next: &mut Sender,
    from_prev: &mut Receiver,
    me: &Identity,
    [prev_seen, next_seen]: [Incarnation; 2],
    deadline: Instant,
    op_timeout: Duration,
) -> Result<()> {
    let (rank, size) = (me.rank, me.world_size);
    let entry = |inc: &Incarnation, prev: &Incarnation, next: &Incarnation| {
        [&inc[..], &prev[..], &next[..]].concat()
    };
    let mut table: Vec<Option<Vec<u8>>> = vec![None; size];
    table[rank] = Some(entry(&me.incarnation, &prev_seen, &next_seen));
    // Other ranks may still be forming their links until their own deadline.
    let wait = deadline.saturating_duration_since(Instant::now()) + op_timeout;
    let _ = from_prev.stream().set_read_timeout(Some(wait));
    // The messages are tiny: a write never blocks, so one thread sends then receives.
    for step in 0..size - 1 {
        let origin = (rank + size - step) % size;
        let outgoing = table[origin].clone().expect("forwarded entries arrived");
        to_next.send(Kind::Check, &[&(origin as u32).to_le_bytes(), &outgoing])?;
        let mut frame = from_prev.begin(Kind::Check, Expect::Exactly(4 + 48))?;
        let mut body = [0u8; 52];
        frame.read(&mut body)?;
        frame.finish()?;
        let origin = (rank + size - step - 1) % size;
        if u32::from_le_bytes(body[..4].try_into().expect("4")) as usize != origin {
            return Err(CollectiveError::Protocol {
                rank: from_prev.peer(),
                reason: format!("forwarded a check entry out of order (expected rank {origin}'s)"),
            });
        }
        table[origin] = Some(body[4..].to_vec());
    }
    let _ = from_prev.stream().set_read_timeout(Some(op_timeout));
    let table: Vec<&[u8]> = table
        .iter()
        .map(|e| e.as_deref().expect("every entry"))
        .collect();
    check_table(&table)
}

/// Each entry: the rank's incarnation, then the incarnations it saw on its previous and next
/// links. Every link must join incarnations that are themselves in the table.
fn check_table(table: &[&[u8]]) -> Result<()> {
    let size = table.len();
    for (r, entry) in table.iter().enumerate() {
        let next = table[(r + 1) % size];
        let prev = table[(r + size - 1) % size];
        let stale = if entry[32..48] != next[..16] {
            Some((r + 1) % size)
        } else if entry[16..32] != prev[..16] {
            Some((r + size - 1) % size)
        } else {
            None
        };
        if let Some(peer) = stale {
            return Err(CollectiveError::PeerLost {
                rank: peer,
                source: io::Error::other(format!(
                    "rank {r}'s link to rank {peer} does not join the incarnations in this group (a stale connection from an earlier incarnation); the group must be formed again"
                )),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(inc: u8, prev: u8, next: u8) -> Vec<u8> {
        [[inc; 16], [prev; 16], [next; 16]].concat()
    }

    #[test]
    fn a_ring_of_current_incarnations_passes_the_check() {
        let table = [entry(1, 3, 2), entry(2, 1, 3), entry(3, 2, 1)];
        let table: Vec<&[u8]> = table.iter().map(Vec::as_slice).collect();
        check_table(&table).unwrap();
    }

    #[test]
    fn a_link_to_an_earlier_incarnation_fails_the_check() {
        // Rank 1 accepted a connection from incarnation 9 of rank 0, which is not in the group.
        let table = [entry(1, 3, 2), entry(2, 9, 3), entry(3, 2, 1)];
        let table: Vec<&[u8]> = table.iter().map(Vec::as_slice).collect();
        let error = check_table(&table).unwrap_err();
        assert!(
            matches!(error, CollectiveError::PeerLost { rank: 0, .. }),
            "{error}"
        );
        assert!(error.is_transient());
    }
}
