//! Collectives over TCP, for CPU ranks.
//!
//! Every ordered pair of ranks has its own one-way connection, opened lazily by the sender and
//! accepted by the receiver's listener thread. Its handshake is a mutual challenge-response (see
//! [`crate::auth`]): the dialer sends a magic number, its rank and a nonce; the listener answers
//! with its own nonce and a proof (an HMAC with the attempt's data key over both nonces), which
//! the dialer checks before it answers with its own proof. No secret travels, a recorded
//! handshake cannot be replayed, and no other job's or attempt's rank can connect. The listener
//! runs each handshake on its own thread with a 5 s limit, at most 64 at once and 8 per remote
//! address, so that clients that connect and say nothing cannot stall the gang. Large all-reduces are a chunked ring, pipelined across its steps: a
//! reduce-scatter then an all-gather, 2 (n - 1) steps in which a rank receives (and folds) one
//! segment from its predecessor while it sends its successor the segment of the step before,
//! each chunk going on as soon as it has arrived (see `Links::pipelined_ring`). Messages up to
//! [`TcpOptions::small_bytes`] use a two-hop algorithm instead (reduce at the group's first rank,
//! then send the result back), which needs 2 latencies instead of `2 (n - 1)`. Every read and
//! write has a timeout, so a peer that hangs becomes an error instead of a hang, and a peer that
//! dies is an error at once (its connection closes).
//!
//! Point-to-point messages (`send`, `send_async`, `recv`) have connections of their own, marked as
//! such in the handshake (the high bit of the rank field), so that they never queue behind a
//! collective nor hold one up. Each destination rank has a sending thread with its own
//! connection, fed in order: `send_async` only queues the message, and its `Pending` (or `send`)
//! completes once the message is written to the socket. Each source rank has a reading thread
//! (started by the first `recv` from it) that takes messages off the connection as they arrive
//! and queues up to 16 of them, so a transfer overlaps the receiver's compute and two pipeline
//! stages that send each other a large tensor at the same time do not deadlock; `recv` takes the next one
//! from that queue, without the collectives' lock and without waiting for the asynchronous
//! collectives in flight. Each message is its length (8 bytes) then its elements, so a receive
//! of the wrong size is an error instead of garbage. Their reads and writes wait up to
//! [`TcpOptions::p2p_timeout`], much longer than a collective's, since a pipeline stage waits for
//! its neighbours' compute. A connection that broke is not opened again: later messages on it
//! fail too.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use super::{CommError, Communicator, Pending, ReduceOp, Result};
use crate::auth::{self, GangKeys, NONCE_LEN, PROOF_LEN};
use crate::watchdog::Activity;

const MAGIC: u32 = 0x4c4b_5354; // "LKST"

/// Longest a handshake may take on the listener's side.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);
/// Handshakes a listener runs at once, in all and from one remote address.
const HANDSHAKES: usize = 64;
const HANDSHAKES_PER_ADDRESS: usize = 8;
/// Set in the handshake's rank field on a point-to-point connection.
const P2P_FLAG: u32 = 1 << 31;

/// Tuning and failure detection of the TCP transport.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Longest wait for a peer to connect, send or receive before it is declared lost.
    pub timeout: Duration,
    /// All-reduces of at most this many bytes use the two-hop algorithm instead of the ring.
    pub small_bytes: usize,
    /// Elements per chunk of the ring's pipeline (a received chunk is folded while the next
    /// one is in flight).
    pub chunk_elems: usize,
    /// Longest wait for a point-to-point read or write, or for a peer's first point-to-point
    /// connection, before the peer is declared lost. A pipeline stage legitimately waits for its
    /// neighbours' compute, so this is longer than `timeout`; a dead peer is still detected at
    /// once because its connection closes. Connecting to a peer's listener still waits at most
    /// `timeout`.
    pub p2p_timeout: Duration,
    /// Where this rank's collectives and received messages are recorded as progress (see
    /// [`crate::watchdog`]); shared with the communicators split from this one.
    pub activity: Arc<Activity>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            small_bytes: 64 * 1024,
            chunk_elems: 256 * 1024,
            p2p_timeout: Duration::from_secs(600),
            activity: Arc::default(),
        }
    }
}

/// Which of the two kinds of connection a stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    /// The collectives' connections, owned by [`Links`].
    Collective,
    /// Point-to-point messages' connections, owned by [`P2p`].
    P2p,
}

/// Connections accepted by the listener thread and not taken yet, by sender rank.
struct Inbound {
    streams: Mutex<Vec<Option<TcpStream>>>,
    arrived: Condvar,
    /// Point-to-point connections (separate lock and condition: `recv` never waits on the
    /// collectives' side).
    p2p: Mutex<Vec<Option<TcpStream>>>,
    p2p_arrived: Condvar,
    closed: AtomicBool,
}

impl Inbound {
    /// Takes the connection of `channel` from `peer`, waiting up to `timeout` for it to arrive.
    fn take(
        &self,
        channel: Channel,
        peer: usize,
        timeout: Duration,
        op: &'static str,
    ) -> Result<TcpStream> {
        let (slots, arrived) = match channel {
            Channel::Collective => (&self.streams, &self.arrived),
            Channel::P2p => (&self.p2p, &self.p2p_arrived),
        };
        let deadline = Instant::now() + timeout;
        let mut streams = slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = streams[peer].take() {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CommError::Timeout {
                    peer,
                    op,
                    seconds: timeout.as_secs(),
                });
            }
            streams = arrived
                .wait_timeout(streams, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How this rank connects to its peers: where they listen, and what its handshake says.
#[derive(Clone)]
struct Dialer {
    me: usize,
    addrs: Arc<[String]>,
    keys: Arc<GangKeys>,
    /// Longest wait for a peer's listener to accept.
    timeout: Duration,
}

impl Dialer {
    /// Connects to `peer`'s listener for `channel`, retrying until `self.timeout` while it is not
    /// up yet, and sends the handshake; `io_timeout` becomes the connection's write timeout.
    fn connect(
        &self,
        peer: usize,
        channel: Channel,
        io_timeout: Duration,
        op: &'static str,
    ) -> Result<TcpStream> {
        let deadline = Instant::now() + self.timeout;
        let addr = &self.addrs[peer];
        let rank = match channel {
            Channel::Collective => self.me as u32,
            Channel::P2p => self.me as u32 | P2P_FLAG,
        };
        loop {
            let attempt = addr.to_socket_addrs().and_then(|mut it| {
                it.next().ok_or_else(|| {
                    std::io::Error::new(ErrorKind::NotFound, format!("{addr} has no address"))
                })
            });
            let result = attempt.and_then(|sa| {
                let left = deadline.saturating_duration_since(Instant::now());
                TcpStream::connect_timeout(&sa, left.max(Duration::from_millis(10)))
            });
            match result {
                Ok(mut s) => {
                    let setup = s
                        .set_nodelay(true)
                        .and_then(|_| s.set_write_timeout(Some(io_timeout)))
                        .and_then(|_| s.set_read_timeout(Some(self.timeout)));
                    if let Err(e) = setup {
                        return Err(io_error(e, peer, op, io_timeout));
                    }
                    match self.handshake(&mut s, rank) {
                        Ok(true) => return Ok(s),
                        Ok(false) => {
                            return Err(CommError::Setup(format!(
                                "the listener at {addr} (rank {peer}) could not prove that it \
                                 belongs to this job and attempt"
                            )));
                        }
                        // The listener dropped the connection (too many handshakes at once):
                        // try again until the deadline.
                        Err(e) if Instant::now() >= deadline => {
                            return Err(io_error(e, peer, op, self.timeout));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(io_error(e, peer, op, self.timeout));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Dialer {
    /// The dialer's side of the handshake on `s`; false when the listener's proof is wrong.
    fn handshake(&self, s: &mut TcpStream, field: u32) -> std::io::Result<bool> {
        let mine = auth::nonce();
        let mut hello = [0u8; 8 + NONCE_LEN];
        hello[..4].copy_from_slice(&MAGIC.to_le_bytes());
        hello[4..8].copy_from_slice(&field.to_le_bytes());
        hello[8..].copy_from_slice(&mine);
        s.write_all(&hello)?;
        let mut answer = [0u8; NONCE_LEN + PROOF_LEN];
        s.read_exact(&mut answer)?;
        let (theirs, proof) = answer.split_at(NONCE_LEN);
        if !self
            .keys
            .check_data(b"listener", field, &mine, theirs, proof)
        {
            return Ok(false);
        }
        s.write_all(&self.keys.data_proof(b"dialer", field, &mine, theirs))?;
        Ok(true)
    }
}

/// The collectives' connections of one process, shared by a communicator and the ones split from
/// it.
struct Links {
    dial: Dialer,
    timeout: Duration,
    out: Vec<Option<TcpStream>>,
    inp: Vec<Option<TcpStream>>,
    inbound: Arc<Inbound>,
    listen_addr: SocketAddr,
    scratch: Vec<f32>,
}

fn io_error(e: std::io::Error, peer: usize, op: &'static str, timeout: Duration) -> CommError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout {
            peer,
            op,
            seconds: timeout.as_secs(),
        },
        _ => CommError::PeerLost {
            peer,
            op,
            source: e,
        },
    }
}

impl Links {
    /// Makes sure the connection to `peer` (sending) and from `peer` (receiving) exist.
    fn ensure(
        &mut self,
        send_to: Option<usize>,
        recv_from: Option<usize>,
        op: &'static str,
    ) -> Result<()> {
        if let Some(p) = send_to
            && self.out[p].is_none()
        {
            self.out[p] = Some(
                self.dial
                    .connect(p, Channel::Collective, self.timeout, op)?,
            );
        }
        if let Some(p) = recv_from
            && self.inp[p].is_none()
        {
            self.inp[p] = Some(
                self.inbound
                    .take(Channel::Collective, p, self.timeout, op)?,
            );
        }
        Ok(())
    }

    fn write(&mut self, peer: usize, data: &[f32], op: &'static str) -> Result<()> {
        self.ensure(Some(peer), None, op)?;
        let t = self.timeout;
        let s = self.out[peer].as_mut().expect("ensured");
        s.write_all(bytemuck::cast_slice(data))
            .map_err(|e| io_error(e, peer, op, t))
    }

    fn read(&mut self, peer: usize, data: &mut [f32], op: &'static str) -> Result<()> {
        self.ensure(None, Some(peer), op)?;
        let t = self.timeout;
        let s = self.inp[peer].as_mut().expect("ensured");
        s.read_exact(bytemuck::cast_slice_mut(data))
            .map_err(|e| io_error(e, peer, op, t))
    }

    /// Reads `into.len()` elements from `peer` and folds them into `into`, chunk by chunk.
    fn read_fold(
        &mut self,
        peer: usize,
        into: &mut [f32],
        op: ReduceOp,
        chunk: usize,
        name: &'static str,
    ) -> Result<()> {
        self.ensure(None, Some(peer), name)?;
        let t = self.timeout;
        let Links { inp, scratch, .. } = self;
        let s = inp[peer].as_mut().expect("ensured");
        recv_fold(s, into, Some(op), scratch, chunk).map_err(|e| io_error(e, peer, name, t))
    }

    /// The connection to `next`, the one from `prev`, and the receive scratch buffer, borrowed
    /// together for one ring operation.
    fn ring_pair(
        &mut self,
        next: usize,
        prev: usize,
        name: &'static str,
    ) -> Result<(&mut TcpStream, &mut TcpStream, &mut Vec<f32>)> {
        self.ensure(Some(next), Some(prev), name)?;
        let Links {
            out, inp, scratch, ..
        } = self;
        Ok((
            out[next].as_mut().expect("ensured"),
            inp[prev].as_mut().expect("ensured"),
            scratch,
        ))
    }

    /// One ring step: sends `send` to `next` while it receives into `recv` from `prev` (folding
    /// with `fold`, or copying).
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &mut self,
        next: usize,
        send: &[f32],
        prev: usize,
        recv: &mut [f32],
        fold: Option<ReduceOp>,
        chunk: usize,
        name: &'static str,
    ) -> Result<()> {
        let t = self.timeout;
        let (tx, rx, scratch) = self.ring_pair(next, prev, name)?;
        let (sent, received) = std::thread::scope(|scope| {
            let sender = (!send.is_empty())
                .then(|| scope.spawn(move || tx.write_all(bytemuck::cast_slice(send))));
            let received = recv_fold(rx, recv, fold, scratch, chunk);
            let sent = match sender {
                Some(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread panicked"))),
                None => Ok(()),
            };
            (sent, received)
        });
        // Blame the receive side first: when a peer dies, its successor sees the receive fail.
        received.map_err(|e| io_error(e, prev, name, t))?;
        sent.map_err(|e| io_error(e, next, name, t))
    }
}

impl Links {
    /// The ring all-reduce, pipelined by chunk across steps, as NCCL does: what a step receives
    /// (and folds) is what the next step sends, so each chunk goes on to the next rank as soon as
    /// it is ready instead of after the whole segment. One thread sends, this one receives; the
    /// chunks of `buf` move between them as `&mut` borrows over channels, so each is only ever
    /// touched by one of them.
    #[allow(clippy::too_many_arguments)]
    fn pipelined_ring(
        &mut self,
        buf: &mut [f32],
        n: usize,
        me: usize,
        next: usize,
        prev: usize,
        op: ReduceOp,
        chunk: usize,
    ) -> Result<()> {
        const NAME: &str = "all_reduce";
        let t = self.timeout;
        let (tx, rx, scratch) = self.ring_pair(next, prev, NAME)?;
        if scratch.len() < chunk {
            scratch.resize(chunk, 0.0);
        }
        // Every segment as its list of chunks, each a separate `&mut` borrow of `buf`.
        let segs = segments(buf.len(), n);
        let mut slots: Vec<Vec<Option<&mut [f32]>>> = Vec::with_capacity(n);
        let mut rest = buf;
        for seg in &segs {
            let (mine, tail) = rest.split_at_mut(seg.len());
            rest = tail;
            slots.push(mine.chunks_mut(chunk.max(1)).map(Some).collect());
        }
        let seg_of = |k: usize| (me + 2 * n - k - 1) % n; // segment sent at RS step k
        type Piece<'a> = (usize, usize, &'a mut [f32]);
        let (to_sender, sender_in) = mpsc::channel::<Piece<'_>>();
        let (sender_out, back) = mpsc::channel::<Piece<'_>>();
        std::thread::scope(|scope| -> Result<()> {
            let sender = scope.spawn(move || -> std::io::Result<()> {
                for (s, c, piece) in sender_in {
                    tx.write_all(bytemuck::cast_slice(piece))?;
                    if sender_out.send((s, c, piece)).is_err() {
                        break;
                    }
                }
                Ok(())
            });
            let lost_next = |e: Option<std::io::Error>| {
                io_error(
                    e.unwrap_or_else(|| std::io::ErrorKind::BrokenPipe.into()),
                    next,
                    NAME,
                    t,
                )
            };
            let mut failed = None;
            'steps: {
                // Step 0 sends this rank's own data of segment me - 1.
                let first = seg_of(0);
                for c in 0..slots[first].len() {
                    let piece = slots[first][c].take().expect("not sent yet");
                    if to_sender.send((first, c, piece)).is_err() {
                        failed = Some(lost_next(None));
                        break 'steps;
                    }
                }
                // 2 (n - 1) receives: reduce-scatter (fold), then all-gather (copy). Each received
                // chunk is sent on at once, except the last all-gather step's.
                for k in 0..2 * (n - 1) {
                    let reducing = k < n - 1;
                    let r = if reducing {
                        (me + 2 * n - k - 2) % n
                    } else {
                        (me + 2 * n - (k - (n - 1)) - 1) % n
                    };
                    for c in 0..slots[r].len() {
                        let Some(piece) = take_back(&mut slots, &back, r, c) else {
                            failed = Some(lost_next(None));
                            break 'steps;
                        };
                        let got = if reducing {
                            let tmp = &mut scratch[..piece.len()];
                            rx.read_exact(bytemuck::cast_slice_mut(tmp))
                                .map(|()| op.fold(piece, tmp))
                        } else {
                            rx.read_exact(bytemuck::cast_slice_mut(piece))
                        };
                        if let Err(e) = got {
                            failed = Some(io_error(e, prev, NAME, t));
                            break 'steps;
                        }
                        if k == n - 2 {
                            // The last reduce-scatter step completes segment `me`.
                            op.finish(piece, n);
                        }
                        if k + 1 < 2 * (n - 1) {
                            if to_sender.send((r, c, piece)).is_err() {
                                failed = Some(lost_next(None));
                                break 'steps;
                            }
                        } else {
                            slots[r][c] = Some(piece);
                        }
                    }
                }
            }
            drop(to_sender);
            // Drain what the sender hands back, so that it never blocks on a full channel.
            let drain = scope.spawn(move || back.into_iter().count());
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread panicked")));
            let _ = drain.join();
            if let Some(e) = failed {
                // Blame the receive side first: a dead predecessor is the root cause.
                if e.peer() == Some(prev) {
                    return Err(e);
                }
                return Err(sent.err().map_or(e, |se| io_error(se, next, NAME, t)));
            }
            sent.map_err(|e| io_error(e, next, NAME, t))
        })
    }
}

/// Takes chunk `c` of segment `s` back from the sending thread, waiting for it if it is still
/// in flight; `None` when the sender is gone.
fn take_back<'a>(
    slots: &mut [Vec<Option<&'a mut [f32]>>],
    back: &mpsc::Receiver<(usize, usize, &'a mut [f32])>,
    s: usize,
    c: usize,
) -> Option<&'a mut [f32]> {
    while slots[s][c].is_none() {
        let (bs, bc, piece) = back.recv().ok()?;
        slots[bs][bc] = Some(piece);
    }
    slots[s][c].take()
}

fn recv_fold(
    s: &mut TcpStream,
    into: &mut [f32],
    fold: Option<ReduceOp>,
    scratch: &mut Vec<f32>,
    chunk: usize,
) -> std::io::Result<()> {
    match fold {
        None => s.read_exact(bytemuck::cast_slice_mut(into)),
        Some(op) => {
            if scratch.len() < chunk {
                scratch.resize(chunk, 0.0);
            }
            for part in into.chunks_mut(chunk) {
                let tmp = &mut scratch[..part.len()];
                s.read_exact(bytemuck::cast_slice_mut(tmp))?;
                op.fold(part, tmp);
            }
            Ok(())
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.inbound.closed.store(true, Ordering::SeqCst);
        // Wake the listener thread so that it sees `closed` and exits.
        let _ = TcpStream::connect_timeout(&self.listen_addr, Duration::from_millis(200));
    }
}

/// Accepts the peers' connections and files them by channel and sender rank once their
/// handshakes prove them (each on its own thread, see [`handshake`]); `timeout` and
/// `p2p_timeout` become the read timeouts of the collective and the point-to-point connections.
fn accept_loop(
    listener: TcpListener,
    inbound: Arc<Inbound>,
    keys: Arc<GangKeys>,
    timeout: Duration,
    p2p_timeout: Duration,
) {
    let world = inbound.streams.lock().map(|s| s.len()).unwrap_or_default();
    let in_flight: Arc<Mutex<Vec<std::net::IpAddr>>> = Arc::default();
    for conn in listener.incoming() {
        if inbound.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(s) = conn else { continue };
        let Ok(peer) = s.peer_addr() else { continue };
        {
            let mut busy = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let from_peer = busy.iter().filter(|a| **a == peer.ip()).count();
            if busy.len() >= HANDSHAKES || from_peer >= HANDSHAKES_PER_ADDRESS {
                tracing::debug!(%peer, "refused a data connection: too many handshakes in progress");
                continue;
            }
            busy.push(peer.ip());
        }
        let (inbound, keys, busy) = (
            Arc::clone(&inbound),
            Arc::clone(&keys),
            Arc::clone(&in_flight),
        );
        let spawned = std::thread::Builder::new()
            .name("lockstep-handshake".into())
            .spawn(move || {
                let accepted = {
                    // The slot is given back however the handshake ends, a panic included.
                    let _slot = Slot(busy, peer.ip());
                    handshake(s, &keys, world)
                };
                let Some((s, channel, rank)) = accepted else {
                    // Debug, not warn: whoever connects must not be able to flood the log.
                    tracing::debug!(
                        %peer,
                        "refused a data connection: not a rank of this gang and attempt"
                    );
                    return;
                };
                let (read_timeout, slots, arrived) = match channel {
                    Channel::Collective => (timeout, &inbound.streams, &inbound.arrived),
                    Channel::P2p => (p2p_timeout, &inbound.p2p, &inbound.p2p_arrived),
                };
                if s.set_read_timeout(Some(read_timeout)).is_err()
                    || s.set_write_timeout(None).is_err()
                    || s.set_nodelay(true).is_err()
                {
                    return;
                }
                tracing::trace!(rank, ?channel, "accepted a data connection");
                let mut streams = slots.lock().unwrap_or_else(|e| e.into_inner());
                streams[rank] = Some(s);
                arrived.notify_all();
            });
        if spawned.is_err() {
            drop(Slot(Arc::clone(&in_flight), peer.ip()));
        }
    }
}

/// A handshake in progress from an address: given back when dropped.
struct Slot(Arc<Mutex<Vec<std::net::IpAddr>>>, std::net::IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut busy = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = busy.iter().position(|a| *a == self.1) {
            busy.swap_remove(i);
        }
    }
}

/// The listener's side of a handshake: the dialer's hello, this side's nonce and proof, the
/// dialer's proof, all within [`HANDSHAKE_LIMIT`]. Returns the stream, its channel and the
/// dialer's rank when the dialer proved that it is a rank of this gang and attempt.
fn handshake(
    mut s: TcpStream,
    keys: &GangKeys,
    world: usize,
) -> Option<(TcpStream, Channel, usize)> {
    let deadline = Instant::now() + HANDSHAKE_LIMIT;
    let left = || Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    s.set_read_timeout(left()).ok()?;
    s.set_write_timeout(left()).ok()?;
    let mut hello = [0u8; 8 + NONCE_LEN];
    s.read_exact(&mut hello).ok()?;
    let magic = u32::from_le_bytes(hello[..4].try_into().expect("4 bytes"));
    let field = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes"));
    let rank = (field & !P2P_FLAG) as usize;
    if magic != MAGIC || rank >= world {
        return None;
    }
    let theirs = &hello[8..];
    let mine = auth::nonce();
    let mut answer = Vec::with_capacity(NONCE_LEN + PROOF_LEN);
    answer.extend_from_slice(&mine);
    answer.extend_from_slice(&keys.data_proof(b"listener", field, theirs, &mine));
    s.write_all(&answer).ok()?;
    let mut proof = [0u8; PROOF_LEN];
    s.set_read_timeout(left()).ok()?;
    s.read_exact(&mut proof).ok()?;
    if !keys.check_data(b"dialer", field, theirs, &mine, &proof) {
        return None;
    }
    let channel = if field & P2P_FLAG == 0 {
        Channel::Collective
    } else {
        Channel::P2p
    };
    Some((s, channel, rank))
}

/// A copy of `e` (which is not `Clone`: it may hold an `io::Error`) for a later operation on a
/// connection that `e` broke.
fn broke(e: &CommError) -> CommError {
    let earlier =
        |op: &str, what: &dyn std::fmt::Display| format!("an earlier {op} failed: {what}");
    match e {
        CommError::PeerLost { peer, op, source } => CommError::PeerLost {
            peer: *peer,
            op,
            source: std::io::Error::new(source.kind(), earlier(op, source)),
        },
        CommError::Timeout { peer, op, seconds } => CommError::Timeout {
            peer: *peer,
            op,
            seconds: *seconds,
        },
        CommError::Invalid { op, message } => CommError::Invalid {
            op,
            message: earlier(op, message),
        },
        CommError::Setup(m) => CommError::Setup(m.clone()),
        CommError::Nccl(m) => CommError::Nccl(m.clone()),
    }
}

/// One message for a sending thread, and where its result goes.
type SendJob = (Vec<f32>, mpsc::Sender<(Result<Vec<f32>>, Duration)>);

/// The sending threads' connections, kept so that dropping the communicator can shut them down
/// (which ends a write in progress).
#[derive(Default)]
struct Outbound {
    closed: bool,
    streams: Vec<TcpStream>,
}

/// The receiving side of the point-to-point connection from one peer.
enum Incoming {
    /// The peer has not connected yet (or no `recv` has needed it yet).
    Waiting,
    /// A reading thread takes the peer's messages off the connection as they arrive (so that a
    /// transfer overlaps the receiver's compute instead of waiting for its `recv`) and queues
    /// them; the stream is kept to shut it down when the communicator goes.
    Reading(mpsc::Receiver<Result<Vec<f32>>>, TcpStream),
    /// A receive failed: the stream may be in the middle of a message, so every later receive
    /// fails with (a copy of) this.
    Broken(CommError),
}

/// Point-to-point messages of one process, apart from the collectives' [`Links`]: a sending thread
/// per destination rank, each with its own connection, and the connection from each source rank
/// behind its own lock.
struct P2p {
    dial: Dialer,
    /// Read and write timeout ([`TcpOptions::p2p_timeout`]).
    timeout: Duration,
    /// The sending threads' queues, by destination global rank, started by the first send.
    senders: Mutex<Vec<Option<mpsc::Sender<SendJob>>>>,
    outbound: Arc<Mutex<Outbound>>,
    /// By source global rank.
    incoming: Vec<Mutex<Incoming>>,
    inbound: Arc<Inbound>,
}

const DROPPED: &str = "the communicator was dropped";

impl P2p {
    /// Queues `buf` for global rank `to`, starting its sending thread on the first message.
    fn send(&self, to: usize, buf: Vec<f32>) -> Pending<Vec<f32>> {
        let (done, pending) = Pending::channel();
        let mut senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        if senders[to].is_none() {
            match self.spawn_sender(to) {
                Ok(tx) => senders[to] = Some(tx),
                Err(e) => return Pending::ready(Err(e)),
            }
        }
        let queue = senders[to].as_ref().expect("started");
        if let Err(mpsc::SendError((_, done))) = queue.send((buf, done)) {
            // The thread only ends early if it panicked; do not start another one, which would
            // reconnect behind the receiver's back.
            let gone = CommError::Setup(format!("the sending thread for rank {to} is gone"));
            let _ = done.send((Err(gone), Duration::ZERO));
        }
        pending
    }

    fn spawn_sender(&self, to: usize) -> Result<mpsc::Sender<SendJob>> {
        let (tx, rx) = mpsc::channel::<SendJob>();
        let (dial, timeout) = (self.dial.clone(), self.timeout);
        let outbound = Arc::clone(&self.outbound);
        std::thread::Builder::new()
            .name(format!("lockstep-send-{to}"))
            .spawn(move || send_loop(rx, to, &dial, timeout, &outbound))
            .map_err(|e| CommError::Setup(format!("sending thread: {e}")))?;
        Ok(tx)
    }

    /// Receives the next message from global rank `from` into `buf`.
    fn recv(&self, from: usize, buf: &mut [f32]) -> Result<()> {
        const OP: &str = "recv";
        let mut side = self.incoming[from]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Incoming::Waiting = *side {
            // Nothing read yet: a peer that has not connected in time leaves the side waiting.
            let s = self.inbound.take(Channel::P2p, from, self.timeout, OP)?;
            let keep = s
                .try_clone()
                .map_err(|e| io_error(e, from, OP, self.timeout))?;
            // A bounded queue: past it the socket holds the rest and the sender waits, as
            // without the thread (a fast stage cannot pile its activations up here).
            let (tx, rx) = mpsc::sync_channel(PREFETCH_MESSAGES);
            std::thread::Builder::new()
                .name(format!("lockstep-recv-{from}"))
                .spawn({
                    let timeout = self.timeout;
                    move || read_loop(s, from, timeout, &tx)
                })
                .map_err(|e| CommError::Setup(format!("receiving thread: {e}")))?;
            *side = Incoming::Reading(rx, keep);
        }
        let rx = match &*side {
            Incoming::Reading(rx, _) => rx,
            Incoming::Broken(e) => return Err(broke(e)),
            Incoming::Waiting => unreachable!("opened above"),
        };
        let result = match rx.recv_timeout(self.timeout) {
            Ok(Ok(v)) if v.len() == buf.len() => {
                buf.copy_from_slice(&v);
                Ok(())
            }
            Ok(Ok(v)) => Err(CommError::Invalid {
                op: OP,
                message: format!(
                    "rank {from} sent {} elements, the receive expects {}",
                    v.len(),
                    buf.len()
                ),
            }),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(CommError::Timeout {
                peer: from,
                op: OP,
                seconds: self.timeout.as_secs(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CommError::Setup(format!(
                "the receiving thread for rank {from} is gone"
            ))),
        };
        if let Err(e) = &result {
            // The reading thread ends with its connection.
            if let Incoming::Reading(_, s) = &*side {
                let _ = s.shutdown(Shutdown::Both);
            }
            *side = Incoming::Broken(broke(e));
        }
        result
    }
}

/// Messages a reading thread queues ahead of the receives at most.
const PREFETCH_MESSAGES: usize = 16;

/// The largest message a reading thread accepts (elements): a length past it is a corrupt or
/// foreign stream, refused instead of allocated.
const MAX_MESSAGE: u64 = 1 << 32;

/// Reads `from`'s messages off `s` and queues them, until the connection fails or closes (the
/// error is queued last) or nobody receives any more. A quiet connection is not an error here:
/// the receive that waits for a message has its own time limit.
fn read_loop(
    mut s: TcpStream,
    from: usize,
    timeout: Duration,
    queue: &mpsc::SyncSender<Result<Vec<f32>>>,
) {
    loop {
        let r = read_next(&mut s, from, timeout);
        let failed = r.is_err();
        if queue.send(r).is_err() || failed {
            return;
        }
    }
}

/// One length-prefixed message; waits through read timeouts before its first byte.
fn read_next(s: &mut TcpStream, from: usize, timeout: Duration) -> Result<Vec<f32>> {
    const OP: &str = "recv";
    let lost = |e: std::io::Error| io_error(e, from, OP, timeout);
    let mut len = [0u8; 8];
    let mut got = 0;
    while got == 0 {
        match s.read(&mut len) {
            Ok(0) => {
                return Err(lost(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                )));
            }
            Ok(n) => got = n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(lost(e)),
        }
    }
    s.read_exact(&mut len[got..]).map_err(lost)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_MESSAGE {
        return Err(CommError::Invalid {
            op: OP,
            message: format!("rank {from} announced a message of {n} elements: a corrupt stream"),
        });
    }
    let mut v = vec![0.0f32; n as usize];
    s.read_exact(bytemuck::cast_slice_mut(&mut v))
        .map_err(lost)?;
    Ok(v)
}

impl Drop for P2p {
    fn drop(&mut self) {
        // Shut the connections down, which ends a write in progress; each sending thread then
        // fails what is still queued and ends when its queue (in `senders`) is dropped.
        let mut out = self.outbound.lock().unwrap_or_else(|e| e.into_inner());
        out.closed = true;
        for s in out.streams.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        // And the incoming ones, which ends each reading thread.
        for side in &self.incoming {
            if let Incoming::Reading(_, s) = &*side.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A sending thread: connects to global rank `to` on its first message, then writes every queued
/// message in order and reports each one's result. After a failure every later message fails
/// too: reconnecting would lose or reorder messages behind the receiver's back.
fn send_loop(
    jobs: mpsc::Receiver<SendJob>,
    to: usize,
    dial: &Dialer,
    timeout: Duration,
    outbound: &Mutex<Outbound>,
) {
    const OP: &str = "send";
    let mut stream: Option<TcpStream> = None;
    let mut broken: Option<CommError> = None;
    let closed = || outbound.lock().map_or(true, |o| o.closed);
    for (buf, done) in jobs {
        let started = Instant::now();
        let result = if closed() {
            Err(CommError::Setup(DROPPED.into()))
        } else if let Some(e) = &broken {
            Err(broke(e))
        } else {
            let sent = (|| {
                if stream.is_none() {
                    let s = dial.connect(to, Channel::P2p, timeout, OP)?;
                    let mut out = outbound.lock().unwrap_or_else(|e| e.into_inner());
                    if out.closed {
                        return Err(CommError::Setup(DROPPED.into()));
                    }
                    out.streams
                        .push(s.try_clone().map_err(|e| io_error(e, to, OP, timeout))?);
                    stream = Some(s);
                }
                let s = stream.as_mut().expect("connected");
                write_message(s, &buf).map_err(|e| io_error(e, to, OP, timeout))
            })();
            match sent {
                // The write failed because the communicator was dropped, not the peer.
                Err(_) if closed() => Err(CommError::Setup(DROPPED.into())),
                Err(e) => {
                    broken = Some(broke(&e));
                    Err(e)
                }
                Ok(()) => Ok(()),
            }
        };
        // The caller may have dropped its `Pending`: the message is sent all the same.
        let _ = done.send((result.map(|()| buf), started.elapsed()));
    }
}

/// Writes one point-to-point message: its length in elements (8 bytes), then its elements.
fn write_message(s: &mut TcpStream, buf: &[f32]) -> std::io::Result<()> {
    s.write_all(&(buf.len() as u64).to_le_bytes())?;
    s.write_all(bytemuck::cast_slice(buf))
}

type Job = Box<dyn FnOnce() + Send>;

/// What a communicator and those split from it share: the collectives' connections, the thread
/// that runs asynchronous collectives in the order they were started, and the point-to-point
/// side.
struct Shared {
    links: Mutex<Links>,
    p2p: P2p,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    inflight: Mutex<usize>,
    idle: Condvar,
}

impl Shared {
    /// Waits until every asynchronous collective has finished, then locks the connections.
    fn quiet(&self) -> MutexGuard<'_, Links> {
        let mut n = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        drop(n);
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` on the communication thread, which calls `begin` first, before it takes the
    /// connections.
    fn submit(
        self: &Arc<Self>,
        begin: impl FnOnce() + Send + 'static,
        job: impl FnOnce(&mut Links) + Send + 'static,
    ) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let me = Arc::clone(self);
        let job: Job = Box::new(move || {
            begin();
            {
                let mut links = me.links.lock().unwrap_or_else(|e| e.into_inner());
                job(&mut links);
            }
            let mut n = me.inflight.lock().unwrap_or_else(|e| e.into_inner());
            *n -= 1;
            me.idle.notify_all();
        });
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let tx = jobs.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("lockstep-comm".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .expect("spawning the communication thread");
            tx
        });
        // The thread only ends when the sender is dropped, so this send cannot fail.
        let _ = tx.send(job);
    }
}

/// A hold on a communicator's connections: they stay open while it lives, even after every
/// communicator that uses them is gone. A rank whose training failed keeps them open until it
/// has reported its failure, so that its peers learn the failure from the gang's abort instead
/// of taking the closed sockets for a failure of their own.
pub struct Connections {
    _shared: Arc<Shared>,
}

/// A group of ranks that communicate over TCP.
pub struct TcpComm {
    shared: Arc<Shared>,
    /// Global ranks of the group's members, in group order.
    group: Arc<[usize]>,
    /// This rank's index in `group`.
    me: usize,
    opts: TcpOptions,
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpComm")
            .field("rank", &self.me)
            .field("group", &self.group)
            .finish()
    }
}

/// Equal-as-possible segments of `len` elements over `n` ranks.
fn segments(len: usize, n: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / n, len % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

/// Borrows two disjoint ranges of `buf`, the first shared and the second mutable.
fn two<'a>(buf: &'a mut [f32], a: &Range<usize>, b: &Range<usize>) -> (&'a [f32], &'a mut [f32]) {
    if a.start < b.start {
        let (left, right) = buf.split_at_mut(b.start);
        (&left[a.clone()], &mut right[..b.len()])
    } else {
        let (left, right) = buf.split_at_mut(a.start);
        (&right[..a.len()], &mut left[b.clone()])
    }
}

/// The collectives, as functions of the connections and the group, so that the synchronous and
/// asynchronous paths share them.
struct Group<'a> {
    links: &'a mut Links,
    ranks: &'a [usize],
    me: usize,
    opts: &'a TcpOptions,
}

impl Group<'_> {
    fn n(&self) -> usize {
        self.ranks.len()
    }
    fn next(&self) -> usize {
        self.ranks[(self.me + 1) % self.n()]
    }
    fn prev(&self) -> usize {
        self.ranks[(self.me + self.n() - 1) % self.n()]
    }

    /// Ring reduce-scatter over `segs`: afterwards segment `me` holds the folded (not finished)
    /// result.
    fn ring_reduce_scatter(
        &mut self,
        buf: &mut [f32],
        segs: &[Range<usize>],
        op: ReduceOp,
        name: &'static str,
    ) -> Result<()> {
        let n = self.n();
        let (next, prev, chunk) = (self.next(), self.prev(), self.opts.chunk_elems);
        for k in 0..n - 1 {
            let s = (self.me + 2 * n - k - 1) % n;
            let r = (self.me + 2 * n - k - 2) % n;
            let (send, recv) = two(buf, &segs[s], &segs[r]);
            self.links
                .exchange(next, send, prev, recv, Some(op), chunk, name)?;
        }
        Ok(())
    }

    /// Ring all-gather over `segs`: segment `me` is this rank's; afterwards all are filled.
    fn ring_all_gather(
        &mut self,
        buf: &mut [f32],
        segs: &[Range<usize>],
        name: &'static str,
    ) -> Result<()> {
        let n = self.n();
        let (next, prev, chunk) = (self.next(), self.prev(), self.opts.chunk_elems);
        for k in 0..n - 1 {
            let s = (self.me + n - k) % n;
            let r = (self.me + 2 * n - k - 1) % n;
            let (send, recv) = two(buf, &segs[s], &segs[r]);
            self.links
                .exchange(next, send, prev, recv, None, chunk, name)?;
        }
        Ok(())
    }

    /// Two hops: the group's first rank folds every buffer in rank order and sends the result
    /// back.
    fn reduce_at_first(&mut self, buf: &mut [f32], op: ReduceOp, name: &'static str) -> Result<()> {
        let n = self.n();
        let chunk = self.opts.chunk_elems;
        if self.me == 0 {
            for &peer in &self.ranks[1..] {
                self.links.read_fold(peer, buf, op, chunk, name)?;
            }
            op.finish(buf, n);
            for &peer in &self.ranks[1..] {
                self.links.write(peer, buf, name)?;
            }
        } else {
            let first = self.ranks[0];
            self.links.write(first, buf, name)?;
            self.links.read(first, buf, name)?;
        }
        Ok(())
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        const NAME: &str = "all_reduce";
        let n = self.n();
        if n == 1 || buf.is_empty() {
            op.finish(buf, n);
            return Ok(());
        }
        if std::mem::size_of_val(buf) <= self.opts.small_bytes || buf.len() < n {
            return self.reduce_at_first(buf, op, NAME);
        }
        let (next, prev) = (self.next(), self.prev());
        let (me, chunk) = (self.me, self.opts.chunk_elems);
        self.links.pipelined_ring(buf, n, me, next, prev, op, chunk)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        const NAME: &str = "broadcast";
        let n = self.n();
        if root >= n {
            return Err(CommError::Invalid {
                op: NAME,
                message: format!("root {root} is not a rank of a group of {n}"),
            });
        }
        if n == 1 || buf.is_empty() {
            return Ok(());
        }
        // A pipelined chain along the ring, starting at the root.
        let pos = (self.me + n - root) % n;
        let (next, prev) = (self.next(), self.prev());
        for part in buf.chunks_mut(self.opts.chunk_elems) {
            if pos > 0 {
                self.links.read(prev, part, NAME)?;
            }
            if pos < n - 1 {
                self.links.write(next, part, NAME)?;
            }
        }
        Ok(())
    }
}

impl TcpComm {
    /// Sets up this process's side of a gang of `addrs.len()` ranks: `addrs[r]` is where rank r
    /// listens, `listener` is this rank's own listener (bound before the addresses were
    /// exchanged), and `keys` (the attempt's) authenticate every connection's handshake.
    pub fn new(
        rank: usize,
        addrs: Vec<String>,
        listener: TcpListener,
        keys: GangKeys,
        opts: TcpOptions,
    ) -> Result<Self> {
        let keys = Arc::new(keys);
        let world = addrs.len();
        if rank >= world {
            return Err(CommError::Setup(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        let listen_addr = listener
            .local_addr()
            .map_err(|e| CommError::Setup(format!("listener: {e}")))?;
        let listen_addr = SocketAddr::new(
            if listen_addr.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                listen_addr.ip()
            },
            listen_addr.port(),
        );
        let inbound = Arc::new(Inbound {
            streams: Mutex::new((0..world).map(|_| None).collect()),
            arrived: Condvar::new(),
            p2p: Mutex::new((0..world).map(|_| None).collect()),
            p2p_arrived: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        {
            let (inbound, keys) = (Arc::clone(&inbound), Arc::clone(&keys));
            let (timeout, p2p_timeout) = (opts.timeout, opts.p2p_timeout);
            std::thread::Builder::new()
                .name("lockstep-accept".into())
                .spawn(move || accept_loop(listener, inbound, keys, timeout, p2p_timeout))
                .map_err(|e| CommError::Setup(format!("listener thread: {e}")))?;
        }
        let dial = Dialer {
            me: rank,
            addrs: addrs.into(),
            keys,
            timeout: opts.timeout,
        };
        let p2p = P2p {
            dial: dial.clone(),
            timeout: opts.p2p_timeout,
            senders: Mutex::new((0..world).map(|_| None).collect()),
            outbound: Arc::default(),
            incoming: (0..world).map(|_| Mutex::new(Incoming::Waiting)).collect(),
            inbound: Arc::clone(&inbound),
        };
        let links = Links {
            dial,
            timeout: opts.timeout,
            out: (0..world).map(|_| None).collect(),
            inp: (0..world).map(|_| None).collect(),
            inbound,
            listen_addr,
            scratch: Vec::new(),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                links: Mutex::new(links),
                p2p,
                jobs: Mutex::new(None),
                inflight: Mutex::new(0),
                idle: Condvar::new(),
            }),
            group: (0..world).collect::<Vec<_>>().into(),
            me: rank,
            opts,
        })
    }

    /// A whole gang of `n` ranks in this process on 127.0.0.1 (tests and benchmarks).
    pub fn local_gang(n: usize, opts: TcpOptions) -> Result<Vec<TcpComm>> {
        let listeners = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CommError::Setup(format!("bind: {e}")))?;
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CommError::Setup(format!("bind: {e}")))?;
        let keys = GangKeys::derive(&format!("{:032x}", rand::random::<u128>()), 0);
        listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                // Each rank records its own progress.
                let opts = TcpOptions {
                    activity: Arc::default(),
                    ..opts.clone()
                };
                TcpComm::new(r, addrs.clone(), l, keys.clone(), opts)
            })
            .collect()
    }

    /// A hold that keeps this communicator's connections open (see [`Connections`]).
    pub fn connections(&self) -> Connections {
        Connections {
            _shared: Arc::clone(&self.shared),
        }
    }

    /// Global ranks of this communicator's members, in its rank order.
    pub fn members(&self) -> &[usize] {
        &self.group
    }

    fn run<T>(&self, name: &'static str, f: impl FnOnce(&mut Group<'_>) -> Result<T>) -> Result<T> {
        let _op = self.opts.activity.enter(name, None);
        let mut links = self.shared.quiet();
        f(&mut Group {
            links: &mut links,
            ranks: &self.group,
            me: self.me,
            opts: &self.opts,
        })
    }

    fn start(
        &self,
        name: &'static str,
        buf: Vec<f32>,
        f: impl FnOnce(&mut Group<'_>, &mut [f32]) -> Result<()> + Send + 'static,
    ) -> Pending<Vec<f32>> {
        let (tx, pending) = Pending::channel();
        let (ranks, me, opts) = (Arc::clone(&self.group), self.me, self.opts.clone());
        let seq = opts.activity.queue(name);
        let activity = Arc::clone(&opts.activity);
        self.shared.submit(
            move || activity.start(seq),
            move |links| {
                let started = Instant::now();
                let mut buf = buf;
                let result = f(
                    &mut Group {
                        links,
                        ranks: &ranks,
                        me,
                        opts: &opts,
                    },
                    &mut buf,
                );
                opts.activity.finish(seq);
                let _ = tx.send((result.map(|()| buf), started.elapsed()));
            },
        );
        pending
    }

    fn check_peer(&self, peer: usize, op: &'static str) -> Result<usize> {
        if peer >= self.group.len() || peer == self.me {
            return Err(CommError::Invalid {
                op,
                message: format!(
                    "peer {peer} is not another rank of a group of {}",
                    self.group.len()
                ),
            });
        }
        Ok(self.group[peer])
    }
}

impl Communicator for TcpComm {
    type Buffer = [f32];
    type Owned = Vec<f32>;

    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.group.len()
    }

    fn all_reduce(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.run("all_reduce", |g| g.all_reduce(buf, op))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.run("broadcast", |g| g.broadcast(buf, root))
    }

    fn reduce_scatter(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = self.group.len();
        if input.len() != n * output.len() {
            return Err(CommError::Invalid {
                op: "reduce_scatter",
                message: format!(
                    "input has {} elements, expected {n} ranks x {} output elements",
                    input.len(),
                    output.len()
                ),
            });
        }
        let mut work = input.to_vec();
        let len = output.len();
        let segs: Vec<_> = (0..n).map(|i| i * len..(i + 1) * len).collect();
        self.run("reduce_scatter", |g| {
            if n > 1 && len > 0 {
                g.ring_reduce_scatter(&mut work, &segs, op, "reduce_scatter")?;
            }
            Ok(())
        })?;
        output.copy_from_slice(&work[segs[self.me].clone()]);
        op.finish(output, n);
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let n = self.group.len();
        let len = input.len();
        if output.len() != n * len {
            return Err(CommError::Invalid {
                op: "all_gather",
                message: format!(
                    "output has {} elements, expected {n} ranks x {len} input elements",
                    output.len()
                ),
            });
        }
        let segs: Vec<_> = (0..n).map(|i| i * len..(i + 1) * len).collect();
        output[segs[self.me].clone()].copy_from_slice(input);
        if n == 1 || len == 0 {
            return Ok(());
        }
        self.run("all_gather", |g| {
            g.ring_all_gather(output, &segs, "all_gather")
        })
    }

    fn send(&mut self, buf: &[f32], peer: usize) -> Result<()> {
        self.send_async(buf.to_vec(), peer).wait().map(drop)
    }

    fn recv(&mut self, buf: &mut [f32], peer: usize) -> Result<()> {
        let from = self.check_peer(peer, "recv")?;
        // Neither `run` nor the collectives' lock: a receive does not wait for collectives.
        let _op = self.opts.activity.enter("recv", Some(from));
        self.shared.p2p.recv(from, buf)
    }

    fn send_async(&mut self, buf: Vec<f32>, peer: usize) -> Pending<Vec<f32>> {
        match self.check_peer(peer, "send") {
            Ok(to) => self.shared.p2p.send(to, buf),
            Err(e) => Pending::ready(Err(e)),
        }
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = [0.0f32];
        self.run("barrier", |g| {
            if g.n() > 1 {
                g.reduce_at_first(&mut token, ReduceOp::Sum, "barrier")?;
            }
            Ok(())
        })
    }

    fn all_reduce_async(&mut self, buf: Vec<f32>, op: ReduceOp) -> Pending<Vec<f32>> {
        self.start("all_reduce", buf, move |g, b| g.all_reduce(b, op))
    }

    fn split(&mut self, color: u32, key: u32) -> Result<Self> {
        let n = self.group.len();
        // Exchange (color, key) as 16-bit halves, which f32 holds exactly.
        let halves = |v: u32| [(v >> 16) as f32, (v & 0xffff) as f32];
        let mut mine = [0.0f32; 4];
        mine[..2].copy_from_slice(&halves(color));
        mine[2..].copy_from_slice(&halves(key));
        let mut all = vec![0.0f32; 4 * n];
        self.all_gather(&mine, &mut all)?;
        let whole = |hi: f32, lo: f32| ((hi as u32) << 16) | lo as u32;
        let mut members: Vec<(u32, usize)> = all
            .chunks(4)
            .enumerate()
            .filter(|(_, c)| whole(c[0], c[1]) == color)
            .map(|(i, c)| (whole(c[2], c[3]), i))
            .collect();
        members.sort_unstable();
        let me = members
            .iter()
            .position(|&(_, i)| i == self.me)
            .expect("this rank passed its own color");
        Ok(Self {
            shared: Arc::clone(&self.shared),
            group: members
                .iter()
                .map(|&(_, i)| self.group[i])
                .collect::<Vec<_>>()
                .into(),
            me,
            opts: self.opts.clone(),
        })
    }

    fn activity(&self) -> Option<Arc<Activity>> {
        Some(Arc::clone(&self.opts.activity))
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

    use super::*;

    fn opts() -> TcpOptions {
        TcpOptions {
            timeout: Duration::from_secs(10),
            p2p_timeout: Duration::from_secs(10),
            ..TcpOptions::default()
        }
    }

    /// Runs `f` on every rank of a fresh local gang, each on its own thread, and returns the
    /// results in rank order. A gang still running after `limit` fails the test (a deadlock is a
    /// failure, not a stuck test run); a rank's panic is the test's.
    fn gang<T: Send + 'static>(
        n: usize,
        opts: TcpOptions,
        limit: Duration,
        f: impl Fn(TcpComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let comms = TcpComm::local_gang(n, opts).expect("a local gang");
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        for c in comms {
            let (f, tx) = (Arc::clone(&f), tx.clone());
            std::thread::spawn(move || {
                let r = c.rank();
                let _ = tx.send((r, catch_unwind(AssertUnwindSafe(|| f(c)))));
            });
        }
        let deadline = Instant::now() + limit;
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((r, Ok(v))) => out[r] = Some(v),
                Ok((_, Err(panic))) => resume_unwind(panic),
                Err(_) => {
                    let missing: Vec<_> = (0..n).filter(|&r| out[r].is_none()).collect();
                    panic!("ranks {missing:?} still running after {limit:?}: a deadlock");
                }
            }
        }
        out.into_iter().map(|v| v.expect("every rank")).collect()
    }

    /// Element `i` of the message that `tag` sends: small integers, exact in f32.
    fn pattern(tag: usize, i: usize) -> f32 {
        (tag * 1000 + i % 1000) as f32
    }

    fn message(tag: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| pattern(tag, i)).collect()
    }

    #[test]
    fn clients_that_say_nothing_or_cannot_prove_the_key_neither_stall_nor_join_the_gang() {
        let opts = TcpOptions {
            timeout: Duration::from_secs(3),
            ..opts()
        };
        let comms = TcpComm::local_gang(2, opts).unwrap();
        let addr = comms[0].shared.links.lock().unwrap().dial.addrs[1].clone();
        // Connections that never speak: the listener must not wait for them one by one.
        let idle: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&addr).unwrap()).collect();
        // One that claims to be rank 0 but cannot prove the key (an old-style hello, then a
        // made-up proof).
        let mut forged = TcpStream::connect(&addr).unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(&MAGIC.to_le_bytes());
        hello.extend_from_slice(&0u32.to_le_bytes());
        hello.extend_from_slice(&[7u8; NONCE_LEN]);
        forged.write_all(&hello).unwrap();
        let sums = std::thread::scope(|scope| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(r, mut c)| {
                    scope.spawn(move || {
                        let mut buf = vec![r as f32 + 1.0; 100_000];
                        c.all_reduce(&mut buf, ReduceOp::Sum).map(|()| buf[0])
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for s in sums {
            assert_eq!(s.expect("the all-reduce went through"), 3.0);
        }
        // The listener answers the forged hello, refuses its proof and closes the connection.
        let mut answer = [0u8; NONCE_LEN + PROOF_LEN];
        forged.read_exact(&mut answer).unwrap();
        forged.write_all(&[0u8; PROOF_LEN]).unwrap();
        forged
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            matches!(forged.read(&mut [0u8; 1]), Ok(0)),
            "the forged connection was not closed"
        );
        drop(idle);
    }

    #[test]
    fn crossing_large_sends_do_not_deadlock() {
        // Each message is far larger than the sockets' buffers: with blocking writes on one
        // connection both ranks would wait in their write for a read that never comes.
        const LEN: usize = 16 << 20;
        let out = gang(2, opts(), Duration::from_secs(60), |mut c| {
            let (me, other) = (c.rank(), 1 - c.rank());
            let pending = c.send_async(message(me, LEN), other);
            let mut got = vec![0.0f32; LEN];
            c.recv(&mut got, other).expect("recv");
            let back = pending.wait().expect("send_async");
            let intact = got.iter().enumerate().all(|(i, &x)| x == pattern(other, i));
            let returned = back.len() == LEN && back[LEN - 1] == pattern(me, LEN - 1);
            (intact, returned)
        });
        assert_eq!(out, vec![(true, true); 2]);
    }

    #[test]
    fn a_large_message_is_read_off_the_wire_before_its_receive_is_called() {
        // 64 MiB, far more than the sockets' buffers: its send completes only if the receiver
        // takes it off the connection while it is busy elsewhere (prefetching), not when it
        // finally calls recv.
        const LEN: usize = 16 << 20;
        let out = gang(2, opts(), Duration::from_secs(60), |mut c| {
            if c.rank() == 0 {
                c.send_async(vec![1.0], 1).wait().expect("first send");
                let t = Instant::now();
                c.send_async(message(7, LEN), 1).wait().expect("big send");
                // Written while rank 1 still computes (it receives after 3 s).
                let sent = t.elapsed() < Duration::from_millis(1500);
                // Tell rank 1 that the big send completed: only then does it receive.
                c.send_async(vec![2.0], 1).wait().expect("signal");
                let mut done = [0.0f32];
                c.recv(&mut done, 1).expect("done");
                sent
            } else {
                let mut first = [0.0f32];
                c.recv(&mut first, 0).expect("first");
                // Busy while rank 0 sends: a receive posted late, after a 3 s compute.
                std::thread::sleep(Duration::from_secs(3));
                let mut big = vec![0.0f32; LEN];
                let t = Instant::now();
                c.recv(&mut big, 0).expect("big");
                let took = t.elapsed();
                let mut signal = [0.0f32];
                c.recv(&mut signal, 0).expect("signal");
                c.send_async(vec![3.0], 0).wait().expect("done");
                // Already in memory: the receive is a copy, not a 64 MiB transfer.
                took < Duration::from_millis(1000)
                    && big.iter().enumerate().all(|(i, &x)| x == pattern(7, i))
            }
        });
        assert_eq!(out, vec![true, true]);
    }

    #[test]
    fn messages_arrive_in_order_and_intact() {
        const COUNT: usize = 100;
        // Empty, small and large messages (one of a million elements), in no particular order.
        let len = |k: usize| match k {
            50 => 1 << 20,
            _ if k % 10 == 3 => 0,
            _ => (k * 7919) % 20_011,
        };
        let out = gang(2, opts(), Duration::from_secs(60), move |mut c| {
            if c.rank() == 0 {
                // Every message is queued before the first one is waited for.
                let pending: Vec<_> = (0..COUNT)
                    .map(|k| c.send_async(message(k, len(k)), 1))
                    .collect();
                pending
                    .into_iter()
                    .enumerate()
                    .all(|(k, p)| p.wait().expect("send_async") == message(k, len(k)))
            } else {
                (0..COUNT).all(|k| {
                    let mut got = vec![-1.0f32; len(k)];
                    c.recv(&mut got, 0).expect("recv");
                    got == message(k, len(k))
                })
            }
        });
        assert_eq!(
            out,
            vec![true, true],
            "[buffers came back, messages intact]"
        );
    }

    #[test]
    fn p2p_completes_while_an_async_all_reduce_is_in_flight() {
        // Rank 2 holds the all-reduce up: it joins only once ranks 0 and 1 have exchanged their
        // messages, so the exchange must not wait for the collective.
        const LEN: usize = 4 << 20;
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        let done_rx = Mutex::new(done_rx);
        let out = gang(3, opts(), Duration::from_secs(60), move |mut c| {
            let r = c.rank();
            let mine = vec![r as f32 + 1.0; LEN];
            if r == 2 {
                let rx = done_rx.lock().expect("the only user");
                let exchanged = (0..2).all(|_| rx.recv_timeout(Duration::from_secs(5)).is_ok());
                let mut b = mine;
                c.all_reduce(&mut b, ReduceOp::Sum).expect("all_reduce");
                return (exchanged, b.iter().all(|&x| x == 6.0));
            }
            let pending = c.all_reduce_async(mine, ReduceOp::Sum);
            let other = 1 - r;
            let sent = c.send_async(message(r, 1 << 20), other);
            let mut got = vec![0.0f32; 1 << 20];
            c.recv(&mut got, other).expect("recv");
            sent.wait().expect("send_async");
            let exchanged = got == message(other, 1 << 20);
            done_tx.send(r).expect("rank 2 listens");
            let sum = pending.wait().expect("all_reduce_async");
            (exchanged, sum.iter().all(|&x| x == 6.0))
        });
        assert_eq!(
            out,
            vec![(true, true); 3],
            "[exchanged before the all-reduce, all-reduce right]"
        );
    }

    #[test]
    fn split_communicators_send_and_receive_by_group_index() {
        // Groups {0, 1} and {2, 3}, each in reverse order of global rank: index 0 is global 1
        // (and 3), index 1 is global 0 (and 2).
        let out = gang(4, opts(), Duration::from_secs(60), |mut c| {
            let r = c.rank();
            let mut g = c.split((r / 2) as u32, (3 - r) as u32).expect("split");
            let other = 1 - g.rank();
            let sent = g.send_async(vec![r as f32; 5], other);
            let mut got = vec![0.0f32; 5];
            g.recv(&mut got, other).expect("recv");
            sent.wait().expect("send_async");
            let mut got2 = vec![0.0f32; 1];
            if g.rank() == 0 {
                g.send(&[10.0 * r as f32], 1).expect("send");
            } else {
                g.recv(&mut got2, 0).expect("recv");
            }
            let outside = g.send(&[0.0], 2).expect_err("no index 2 in a group of 2");
            (
                g.members().to_vec(),
                got,
                got2[0],
                matches!(outside, CommError::Invalid { op: "send", .. }),
            )
        });
        let want_members = [vec![1, 0], vec![1, 0], vec![3, 2], vec![3, 2]];
        let partner = [1usize, 0, 3, 2];
        for (r, (members, got, got2, refused)) in out.into_iter().enumerate() {
            assert_eq!(members, want_members[r], "rank {r}");
            assert_eq!(got, vec![partner[r] as f32; 5], "rank {r}");
            // Index 1 (global 0 and 2) received the blocking send of index 0.
            let want2 = if r % 2 == 0 {
                10.0 * partner[r] as f32
            } else {
                0.0
            };
            assert_eq!(got2, want2, "rank {r}");
            assert!(refused, "rank {r}");
        }
    }

    #[test]
    fn a_receiver_whose_peer_is_gone_gets_peer_lost_at_once() {
        // A small p2p_timeout: if the loss were only noticed by the timeout, the test would fail
        // (wrong error, too slow) within seconds instead of hanging.
        let p2p_timeout = Duration::from_secs(5);
        let opts = TcpOptions {
            p2p_timeout,
            ..opts()
        };
        // Ranks 0 and 2 form a group in which global rank 2 is index 1.
        let out = gang(3, opts, Duration::from_secs(60), |mut c| {
            let r = c.rank();
            let mut g = c.split((r % 2) as u32, r as u32).expect("split");
            match r {
                2 => {
                    g.send(&[7.0; 3], 0).expect("send");
                    // Rank 2 is gone: every communicator of its process is dropped.
                    drop(g);
                    drop(c);
                    None
                }
                0 => {
                    let mut got = [0.0f32; 3];
                    g.recv(&mut got, 1)
                        .expect("the message sent before leaving");
                    assert_eq!(got, [7.0; 3]);
                    let started = Instant::now();
                    let e = g.recv(&mut got, 1).expect_err("rank 2 is gone");
                    let took = started.elapsed();
                    let again = g.recv(&mut got, 1).expect_err("still gone");
                    Some((e, took, again))
                }
                _ => None,
            }
        });
        let (e, took, again) = out.into_iter().next().flatten().expect("rank 0's result");
        assert!(
            matches!(
                e,
                CommError::PeerLost {
                    peer: 2,
                    op: "recv",
                    ..
                }
            ),
            "{e}"
        );
        assert!(took < p2p_timeout / 2, "noticed after {took:?}");
        assert!(
            matches!(again, CommError::PeerLost { peer: 2, .. }),
            "{again}"
        );
    }

    #[test]
    fn sending_to_self_is_refused() {
        let out = gang(2, opts(), Duration::from_secs(30), |mut c| {
            let me = c.rank();
            [
                c.send(&[1.0], me).expect_err("send to self"),
                c.send_async(vec![1.0], me)
                    .wait()
                    .expect_err("send_async to self"),
                c.recv(&mut [0.0], me).expect_err("recv from self"),
                c.send(&[1.0], 2).expect_err("send outside the gang"),
            ]
            .iter()
            .all(|e| matches!(e, CommError::Invalid { .. }))
        });
        assert_eq!(out, vec![true, true]);
    }

    #[test]
    fn a_receive_of_the_wrong_size_is_refused() {
        let out = gang(2, opts(), Duration::from_secs(30), |mut c| {
            if c.rank() == 0 {
                c.send(&[1.0; 4], 1).expect("send");
                return None;
            }
            let mut got = [0.0f32; 3];
            Some(
                c.recv(&mut got, 0)
                    .expect_err("4 elements sent, 3 expected"),
            )
        });
        let e = out[1].as_ref().expect("rank 1's error");
        assert!(
            matches!(e, CommError::Invalid { op: "recv", message } if message.contains("sent 4 elements")),
            "{e}"
        );
    }
}
