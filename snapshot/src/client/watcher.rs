//! The watcher thread: for the generation the agent last acknowledged, asks the agent on its
//! own connection until that generation is committed or will not be, and records the newest
//! committed generation. It never delays a handoff, and waits long, so it costs a request per
//! commit (and one a second while a commit is stuck).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Shared, connect, request};
use crate::protocol::Message;
use crate::{Error, Result};

/// How long one `WaitCommitted` may wait on the agent; it answers as soon as the generation
/// (or a newer one) commits, so this bounds only how often a stuck commit is asked about.
const WAIT: Duration = Duration::from_secs(1);
/// A commit whose agent cannot be reached for this long is given up: the agent restarted or
/// died, and a generation it held only in memory will not commit.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(30);
/// A commit still pending after this long is logged once (a holder is down); `ready` stays
/// false until it resolves, so that ranks never drift more than one generation apart.
const SLOW: Duration = Duration::from_secs(60);
/// Pause before asking again after the agent could not be reached.
const RETRY: Duration = Duration::from_millis(50);

pub(super) fn watch_loop(socket: &Path, shared: &Shared) {
    let (lock, cv) = &**shared;
    let mut stream: Option<UnixStream> = None;
    // The generation being watched, since when, since when its agent is unreachable, warned.
    let mut watched: Option<(u64, Instant)> = None;
    let mut unreachable_since: Option<Instant> = None;
    let mut warned = false;
    loop {
        let generation = {
            let mut mailbox = lock.lock().expect("mailbox lock");
            while mailbox.committing.is_none() && !mailbox.closed {
                mailbox = cv.wait(mailbox).expect("mailbox lock");
            }
            if mailbox.closed {
                return;
            }
            mailbox.committing.expect("checked")
        };
        let since = match watched {
            Some((g, since)) if g == generation => since,
            _ => {
                warned = false;
                unreachable_since = None;
                Instant::now()
            }
        };
        watched = Some((generation, since));
        if !warned && since.elapsed() > SLOW {
            warned = true;
            tracing::warn!(
                generation,
                waited_s = since.elapsed().as_secs(),
                "snapshot not committed yet: a shard holder is unreachable? ready() stays false until it is"
            );
        }
        match ask(socket, &mut stream, shared, generation) {
            Ok((newest, pending)) => {
                unreachable_since = None;
                let mut mailbox = lock.lock().expect("mailbox lock");
                mailbox.learn_committed(newest);
                // A newer handoff may have been acknowledged meanwhile: judge the current one.
                if let Some(current) = mailbox.committing {
                    if newest.is_some_and(|n| n >= current) {
                        mailbox.committing = None;
                    } else if current == generation && pending != Some(generation) {
                        // The agent holds it no more: superseded, rolled back, or restarted.
                        fail(
                            &mut mailbox,
                            generation,
                            Error::Superseded {
                                generation,
                                unreachable: None,
                            },
                        );
                    }
                }
                cv.notify_all();
            }
            Err(e) => {
                stream = None;
                let down = *unreachable_since.get_or_insert_with(Instant::now);
                let mut mailbox = lock.lock().expect("mailbox lock");
                if down.elapsed() > UNREACHABLE_LIMIT && mailbox.committing == Some(generation) {
                    fail(&mut mailbox, generation, e);
                    cv.notify_all();
                } else if !mailbox.closed {
                    drop(cv.wait_timeout(mailbox, RETRY).expect("mailbox lock"));
                }
            }
        }
    }
}

/// `generation` will not be committed: counted and reported; `ready` holds again.
fn fail(mailbox: &mut super::Mailbox, generation: u64, error: Error) {
    tracing::info!(generation, error = %error, "snapshot not committed");
    mailbox.committing = None;
    mailbox.failed += 1;
    mailbox.last_error = Some(Arc::new(error));
}

/// One `WaitCommitted` on the watcher's connection: the agent's newest committed generation
/// and the one it still has pending.
fn ask(
    socket: &Path,
    stream: &mut Option<UnixStream>,
    shared: &Shared,
    generation: u64,
) -> Result<(Option<u64>, Option<u64>)> {
    if stream.is_none() {
        let s = connect(socket)?;
        let mut mailbox = shared.0.lock().expect("mailbox lock");
        if mailbox.closed {
            return Err(Error::Io(std::io::ErrorKind::Interrupted.into()));
        }
        mailbox.watch_link = Some(s.try_clone()?);
        drop(mailbox);
        *stream = Some(s);
    }
    let wait = Message::WaitCommitted {
        generation,
        timeout_ms: WAIT.as_millis() as u64,
    };
    let s = stream.as_mut().expect("connected");
    match request(s, &wait, WAIT + Duration::from_secs(5))? {
        Message::Committed { newest, pending } => Ok((newest, pending)),
        other => Err(other.unexpected("in reply to WaitCommitted").into()),
    }
}
