//! Collectives over TCP, for CPU ranks.
//!
//! Every ordered pair of ranks has its own one-way connection, opened lazily by the sender and
//! accepted by the receiver's listener thread; a handshake carries a magic number, the gang key
//! (derived from the job token and attempt, so that no other job's rank can connect) and the
//! sender's rank. Large all-reduces are a chunked ring, pipelined across its steps: a
//! reduce-scatter then an all-gather, 2 (n - 1) steps in which a rank receives (and folds) one
//! segment from its predecessor while it sends its successor the segment of the step before,
//! each chunk going on as soon as it has arrived (see `Links::pipelined_ring`). Messages up to
//! [`TcpOptions::small_bytes`] use a two-hop algorithm instead (reduce at the group's first rank,
//! then send the result back), which needs 2 latencies instead of `2 (n - 1)`. Every read and
//! write has a timeout, so a peer that hangs becomes an error instead of a hang, and a peer that
//! dies is an error at once (its connection closes).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use super::{CommError, Communicator, Pending, ReduceOp, Result};

const MAGIC: u32 = 0x4c4b_5354; // "LKST"

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
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            small_bytes: 64 * 1024,
            chunk_elems: 256 * 1024,
        }
    }
}

/// Connections accepted by the listener thread, by sender rank.
struct Inbound {
    streams: Mutex<Vec<Option<TcpStream>>>,
    arrived: Condvar,
    closed: AtomicBool,
}

/// All the connections of one process, shared by a communicator and the ones split from it.
struct Links {
    me: usize,
    addrs: Vec<String>,
    key: u64,
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
    fn connect(&self, peer: usize, op: &'static str) -> Result<TcpStream> {
        let deadline = Instant::now() + self.timeout;
        let addr = &self.addrs[peer];
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
                    let mut hello = [0u8; 16];
                    hello[..4].copy_from_slice(&MAGIC.to_le_bytes());
                    hello[4..12].copy_from_slice(&self.key.to_le_bytes());
                    hello[12..].copy_from_slice(&(self.me as u32).to_le_bytes());
                    let setup = s
                        .set_nodelay(true)
                        .and_then(|_| s.set_write_timeout(Some(self.timeout)))
                        .and_then(|_| s.write_all(&hello));
                    return match setup {
                        Ok(()) => Ok(s),
                        Err(e) => Err(io_error(e, peer, op, self.timeout)),
                    };
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(io_error(e, peer, op, self.timeout));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

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
            self.out[p] = Some(self.connect(p, op)?);
        }
        if let Some(p) = recv_from
            && self.inp[p].is_none()
        {
            let deadline = Instant::now() + self.timeout;
            let mut streams = self
                .inbound
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(s) = streams[p].take() {
                    self.inp[p] = Some(s);
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CommError::Timeout {
                        peer: p,
                        op,
                        seconds: self.timeout.as_secs(),
                    });
                }
                streams = self
                    .inbound
                    .arrived
                    .wait_timeout(streams, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
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

fn accept_loop(listener: TcpListener, inbound: Arc<Inbound>, key: u64, timeout: Duration) {
    let world = inbound.streams.lock().map(|s| s.len()).unwrap_or_default();
    for conn in listener.incoming() {
        if inbound.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut s) = conn else { continue };
        let mut hello = [0u8; 16];
        let ok = s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .and_then(|_| s.read_exact(&mut hello));
        if ok.is_err() {
            continue;
        }
        let magic = u32::from_le_bytes(hello[..4].try_into().expect("4 bytes"));
        let their_key = u64::from_le_bytes(hello[4..12].try_into().expect("8 bytes"));
        let rank = u32::from_le_bytes(hello[12..].try_into().expect("4 bytes")) as usize;
        if magic != MAGIC || their_key != key || rank >= world {
            tracing::warn!(
                peer = ?s.peer_addr().ok(),
                "refused a data connection: not a rank of this gang and attempt"
            );
            continue;
        }
        if s.set_read_timeout(Some(timeout)).is_err() || s.set_nodelay(true).is_err() {
            continue;
        }
        let mut streams = inbound.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams[rank] = Some(s);
        inbound.arrived.notify_all();
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// What a communicator and those split from it share: the connections, and the thread that runs
/// asynchronous collectives in the order they were started.
struct Shared {
    links: Mutex<Links>,
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

    fn submit(self: &Arc<Self>, job: impl FnOnce(&mut Links) + Send + 'static) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        let me = Arc::clone(self);
        let job: Job = Box::new(move || {
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
    /// exchanged), and `key` identifies the gang and attempt in every connection's handshake.
    pub fn new(
        rank: usize,
        addrs: Vec<String>,
        listener: TcpListener,
        key: u64,
        opts: TcpOptions,
    ) -> Result<Self> {
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
            closed: AtomicBool::new(false),
        });
        {
            let inbound = Arc::clone(&inbound);
            let timeout = opts.timeout;
            std::thread::Builder::new()
                .name("lockstep-accept".into())
                .spawn(move || accept_loop(listener, inbound, key, timeout))
                .map_err(|e| CommError::Setup(format!("listener thread: {e}")))?;
        }
        let links = Links {
            me: rank,
            addrs,
            key,
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
        let key = rand::random();
        listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| TcpComm::new(r, addrs.clone(), l, key, opts.clone()))
            .collect()
    }

    /// Global ranks of this communicator's members, in its rank order.
    pub fn members(&self) -> &[usize] {
        &self.group
    }

    fn run<T>(&self, f: impl FnOnce(&mut Group<'_>) -> Result<T>) -> Result<T> {
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
        buf: Vec<f32>,
        f: impl FnOnce(&mut Group<'_>, &mut [f32]) -> Result<()> + Send + 'static,
    ) -> Pending<Vec<f32>> {
        let (tx, pending) = Pending::channel();
        let (ranks, me, opts) = (Arc::clone(&self.group), self.me, self.opts.clone());
        self.shared.submit(move |links| {
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
            let _ = tx.send((result.map(|()| buf), started.elapsed()));
        });
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
        self.run(|g| g.all_reduce(buf, op))
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.run(|g| g.broadcast(buf, root))
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
        self.run(|g| {
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
        self.run(|g| g.ring_all_gather(output, &segs, "all_gather"))
    }

    fn send(&mut self, buf: &[f32], peer: usize) -> Result<()> {
        let to = self.check_peer(peer, "send")?;
        self.run(|g| g.links.write(to, buf, "send"))
    }

    fn recv(&mut self, buf: &mut [f32], peer: usize) -> Result<()> {
        let from = self.check_peer(peer, "recv")?;
        self.run(|g| g.links.read(from, buf, "recv"))
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = [0.0f32];
        self.run(|g| {
            if g.n() > 1 {
                g.reduce_at_first(&mut token, ReduceOp::Sum, "barrier")?;
            }
            Ok(())
        })
    }

    fn all_reduce_async(&mut self, buf: Vec<f32>, op: ReduceOp) -> Pending<Vec<f32>> {
        self.start(buf, move |g, b| g.all_reduce(b, op))
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
}
