//! The gang's rendezvous: rank 0 serves it (gRPC, `lockstep.v1.Rendezvous`, plus the standard
//! health service); every other rank joins with retries until a deadline, learns the world, and
//! keeps a heartbeat stream open. Rank 0 records the FIRST failure of the gang (a heartbeat stream
//! that breaks, a rank that falls silent, a rank that reports one) and pushes it to every rank,
//! which then stops. Every request carries the job token and the attempt: another job's pod, or a
//! rank left over from an earlier attempt, is refused with a message that says which.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use lockstep_proto::v1::rendezvous_client::RendezvousClient;
use lockstep_proto::v1::rendezvous_server::{Rendezvous, RendezvousServer};
use lockstep_proto::v1::{
    AbortRequest, AbortResponse, Ack, BarrierRequest, BarrierResponse, Beat, ChallengeRequest,
    ChallengeResponse, Command, Credentials, Failure, JoinRequest, JoinResponse, Peer, command,
};
use tokio::sync::{mpsc, watch};

use crate::auth::{self, GangKeys};
use crate::watchdog::{self, Activity, Snapshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

/// Timing of the rendezvous and of failure detection.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long rank 0 waits for every rank to join, and a rank keeps trying to reach rank 0.
    pub join_timeout: Duration,
    /// Interval between heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a rank (or rank 0, seen from the others) is declared failed.
    pub heartbeat_timeout: Duration,
    /// How long a live rank may go without progress before rank 0 fails the gang naming it
    /// (`spec.failurePolicy.progressTimeoutSeconds`; see [`crate::watchdog`]).
    pub progress_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            join_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(3),
            progress_timeout: Duration::from_secs(
                lockstep_api::spec::DEFAULT_PROGRESS_TIMEOUT_SECONDS as u64,
            ),
        }
    }
}

/// Why the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// Not every rank joined before the deadline.
    #[error("ranks {missing:?} of {world} never joined within {seconds} s")]
    Missing {
        /// The ranks that never arrived.
        missing: Vec<u32>,
        /// World size.
        world: u32,
        /// The deadline.
        seconds: u64,
    },
    /// Rank 0 refused this rank (token, attempt, world size or config digest).
    #[error("rank 0 refused to let this rank join: {0}")]
    Refused(String),
    /// Rank 0 could not be reached before the deadline.
    #[error("could not reach rank 0 at {addr} within {seconds} s: {last}")]
    Unreachable {
        /// Rank 0's address.
        addr: String,
        /// The deadline.
        seconds: u64,
        /// The last error.
        last: String,
    },
    /// The server could not start.
    #[error("rendezvous server: {0}")]
    Serve(String),
}

/// Who this rank is, as it presents itself to rank 0.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Global rank.
    pub rank: u32,
    /// World size.
    pub world_size: u32,
    /// Gang attempt.
    pub attempt: u32,
    /// Job token.
    pub token: String,
    /// Digest of the worker config.
    pub config_digest: String,
    /// Host where this rank's data port is reachable by the others; empty to let rank 0 use the
    /// address the join came from.
    pub host: String,
    /// Port of this rank's collective transport.
    pub data_port: u32,
}

/// Metadata key of a heartbeat stream's credentials (the encoded [`Credentials`]).
const CREDENTIALS_HEADER: &str = "lockstep-credentials-bin";
/// How long an issued nonce stays valid.
const NONCE_TTL: Duration = Duration::from_secs(60);
/// Nonces a rank may hold unanswered at once; asking for more forgets its oldest.
const NONCES_PER_RANK: usize = 4;
/// How long rank 0 waits for the first beat of an authenticated heartbeat stream.
const FIRST_BEAT_LIMIT: Duration = Duration::from_secs(10);

/// What a challenge's error message starts with when the nonce answered is unknown (expired, used,
/// or issued to another): the client asks for a new challenge and tries again.
const STALE: &str = "stale challenge: ";

/// Who a nonce was issued to: a rank, at an address.
type Holder = (u32, Option<std::net::IpAddr>);

/// The nonces rank 0 has issued and not seen answered: each is accepted once, within
/// [`NONCE_TTL`], from the rank and the address it was issued to. A holder keeps at most
/// [`NONCES_PER_RANK`], so that a client asking for many (for a rank it claims) only ever evicts
/// its own, never those of the rank at its own address.
#[derive(Default)]
struct Nonces(HashMap<Vec<u8>, (Holder, Instant)>);

impl Nonces {
    fn issue(&mut self, holder: Holder) -> Vec<u8> {
        self.0.retain(|_, (_, at)| at.elapsed() < NONCE_TTL);
        let mut held: Vec<(Instant, Vec<u8>)> = self
            .0
            .iter()
            .filter(|(_, (h, _))| *h == holder)
            .map(|(n, (_, at))| (*at, n.clone()))
            .collect();
        if held.len() >= NONCES_PER_RANK {
            held.sort();
            for (_, n) in &held[..=held.len() - NONCES_PER_RANK] {
                self.0.remove(n);
            }
        }
        let n = auth::nonce().to_vec();
        self.0.insert(n.clone(), (holder, Instant::now()));
        n
    }

    /// Takes `nonce` if it was issued to `holder` and is still valid.
    fn take(&mut self, nonce: &[u8], holder: Holder) -> bool {
        match self.0.get(nonce) {
            Some((h, at)) if *h == holder => {
                let fresh = at.elapsed() < NONCE_TTL;
                self.0.remove(nonce);
                fresh
            }
            _ => false,
        }
    }
}

/// The world as every rank learns it from rank 0.
#[derive(Clone, Debug, PartialEq)]
pub struct World {
    /// Every rank, in rank order.
    pub peers: Vec<Peer>,
    /// NCCL unique id bytes, or empty.
    pub nccl_id: Vec<u8>,
}

struct State {
    me: Identity,
    keys: GangKeys,
    nonces: Mutex<Nonces>,
    opts: Options,
    nccl_id: Vec<u8>,
    started: Instant,
    peers: Mutex<Vec<Option<Peer>>>,
    last_seen: Mutex<Vec<Option<Instant>>>,
    /// Each rank's last progress report and when it arrived (rank 0's own is read from
    /// `activity`).
    progress: Mutex<Vec<Option<(Snapshot, Instant)>>>,
    /// Rank 0's own progress.
    activity: Arc<Activity>,
    done: Mutex<Vec<bool>>,
    world: watch::Sender<Option<Result<World, String>>>,
    failure: watch::Sender<Option<Failure>>,
    barriers: Mutex<HashMap<String, watch::Sender<Vec<bool>>>>,
    /// Set when rank 0's session ends: every heartbeat stream closes.
    stopping: watch::Sender<bool>,
}

impl State {
    /// Checks the credentials of a `method` request coming `from` an address: the attempt and rank,
    /// the proof (constant time), then that the nonce is one rank 0 issued to that rank at that
    /// address and has not seen answered. A request without a valid proof never spends a nonce.
    fn check(
        &self,
        c: Option<&Credentials>,
        method: &str,
        from: Option<std::net::IpAddr>,
    ) -> Result<u32, Status> {
        let c = c.ok_or_else(|| Status::unauthenticated("credentials are required"))?;
        if c.attempt != self.me.attempt {
            return Err(Status::failed_precondition(format!(
                "rank {} is from attempt {}, but the gang is at attempt {}: a rank of another \
                 attempt may not join",
                c.rank, c.attempt, self.me.attempt
            )));
        }
        if c.rank >= self.me.world_size {
            return Err(Status::invalid_argument(format!(
                "rank {} is not below the world size {}",
                c.rank, self.me.world_size
            )));
        }
        if !self
            .keys
            .check_rendezvous(method, c.rank, c.attempt, &c.nonce, &c.proof)
        {
            return Err(Status::unauthenticated(format!(
                "rank {} could not prove that it holds this job's token: it belongs to another job",
                c.rank
            )));
        }
        let fresh = self
            .nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&c.nonce, (c.rank, from));
        if !fresh {
            return Err(Status::aborted(format!(
                "{STALE}rank {} answered a challenge rank 0 did not issue to it, or already saw \
                 answered, or issued over {} s ago: ask for a new one",
                c.rank,
                NONCE_TTL.as_secs()
            )));
        }
        Ok(c.rank)
    }

    /// Records `f` unless a failure is already recorded; returns the first failure.
    fn fail(&self, f: Failure) -> Failure {
        let mut first = None;
        self.failure.send_if_modified(|cur| match cur {
            Some(existing) => {
                first = Some(existing.clone());
                false
            }
            None => {
                tracing::error!(rank = f.rank, reason = %f.reason, "rank failed: aborting the gang");
                *cur = Some(f.clone());
                first = Some(f.clone());
                true
            }
        });
        first.unwrap_or(f)
    }

    fn add_peer(&self, p: Peer) -> Result<(), Status> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut peers[p.rank as usize];
        if let Some(old) = slot
            && old != &p
            && self.world.borrow().is_some()
        {
            return Err(Status::already_exists(format!(
                "rank {} already joined from {}:{}; a second process claims it from {}:{}",
                p.rank, old.host, old.data_port, p.host, p.data_port
            )));
        }
        *slot = Some(p.clone());
        self.last_seen.lock().unwrap_or_else(|e| e.into_inner())[p.rank as usize] =
            Some(Instant::now());
        if peers.iter().all(Option::is_some) && self.world.borrow().is_none() {
            let world = World {
                peers: peers.iter().flatten().cloned().collect(),
                nccl_id: self.nccl_id.clone(),
            };
            tracing::info!(world = peers.len(), "every rank joined");
            self.activity.touch();
            self.world.send_replace(Some(Ok(world)));
        }
        Ok(())
    }

    fn missing(&self) -> Vec<u32> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        (0..peers.len() as u32)
            .filter(|&r| peers[r as usize].is_none())
            .collect()
    }

    async fn wait_world(&self) -> Result<World, String> {
        let mut rx = self.world.subscribe();
        let r = rx.wait_for(Option::is_some).await;
        match r {
            Ok(w) => w.clone().expect("waited for Some"),
            Err(_) => Err("the rendezvous server stopped".into()),
        }
    }

    /// Rank 0's watchdog: the join deadline, then silent ranks.
    async fn watch(self: Arc<Self>) {
        let tick = self.opts.heartbeat_interval / 2;
        loop {
            tokio::time::sleep(tick).await;
            if self.failure.borrow().is_some() {
                return;
            }
            if self.world.borrow().is_none() {
                if self.started.elapsed() >= self.opts.join_timeout {
                    let e = RendezvousError::Missing {
                        missing: self.missing(),
                        world: self.me.world_size,
                        seconds: self.opts.join_timeout.as_secs(),
                    };
                    self.world.send_replace(Some(Err(e.to_string())));
                    return;
                }
                continue;
            }
            let silent = {
                let seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
                let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                (1..seen.len()).find(|&r| {
                    !done[r] && seen[r].is_some_and(|t| t.elapsed() > self.opts.heartbeat_timeout)
                })
            };
            if let Some(r) = silent {
                self.fail(Failure {
                    rank: r as u32,
                    reason: format!(
                        "rank {r} sent no heartbeat for {} ms: it hangs or its node is unreachable",
                        self.opts.heartbeat_timeout.as_millis()
                    ),
                    reported_by: 0,
                    ..Failure::default()
                });
            } else if let Some(s) =
                watchdog::judge(&self.progress_now(), self.opts.progress_timeout)
            {
                self.fail(Failure {
                    rank: s.rank,
                    reason: s.reason,
                    reported_by: 0,
                    exit_code: s.code.code(),
                });
            }
        }
    }

    /// Every rank's progress brought up to now: rank 0's own, and the others' last reports, their
    /// idle time grown by the time since they arrived; `None` for a rank that finished.
    fn progress_now(&self) -> Vec<Option<Snapshot>> {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let reports = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        reports
            .iter()
            .enumerate()
            .map(|(r, p)| {
                if done[r] {
                    return None;
                }
                if r == 0 {
                    return Some(self.activity.snapshot());
                }
                p.as_ref().map(|(s, at)| Snapshot {
                    idle_ms: s.idle_ms + at.elapsed().as_millis() as u64,
                    ..s.clone()
                })
            })
            .collect()
    }
}

struct Service(Arc<State>);

/// Streams (requests in flight) one connection may hold: a rank needs its heartbeat and a
/// request or two.
const STREAMS_PER_CONNECTION: u32 = 16;

/// The limits on the rendezvous server's connections, so that clients that connect and hold on
/// cannot use up rank 0's sockets: `world + 8` from one address (`local` mode has every rank on
/// 127.0.0.1), `2 world + 64` in all.
#[derive(Clone)]
struct Limits {
    open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    per_address: usize,
    total: usize,
}

impl Limits {
    fn new(world: usize) -> Self {
        Self {
            open: Arc::default(),
            per_address: world + 8,
            total: 2 * world + 64,
        }
    }

    /// The connection `io`, counted, or `None` (it is closed) when it is over a limit.
    fn admit(&self, io: tokio::net::TcpStream) -> Option<Counted> {
        let ip = io.peer_addr().ok()?.ip();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let all: usize = open.values().sum();
        let mine = open.get(&ip).copied().unwrap_or(0);
        if all >= self.total || mine >= self.per_address {
            tracing::warn!(%ip, all, from_address = mine, "refused a rendezvous connection: too many open");
            return None;
        }
        *open.entry(ip).or_default() += 1;
        Some(Counted {
            io,
            ip,
            open: Arc::clone(&self.open),
        })
    }
}

/// A connection of the rendezvous server, uncounted when it closes.
struct Counted {
    io: tokio::net::TcpStream,
    ip: std::net::IpAddr,
    open: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;

#[tonic::async_trait]
impl Rendezvous for Service {
    async fn challenge(
        &self,
        req: Request<ChallengeRequest>,
    ) -> Result<Response<ChallengeResponse>, Status> {
        let from = req.remote_addr().map(|a| a.ip());
        let rank = req.into_inner().rank;
        if rank >= self.0.me.world_size {
            return Err(Status::invalid_argument(format!(
                "rank {rank} is not below the world size {}",
                self.0.me.world_size
            )));
        }
        let nonce = self
            .0
            .nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .issue((rank, from));
        Ok(Response::new(ChallengeResponse { nonce }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let s = &self.0;
        let from = req.remote_addr().map(|a| a.ip());
        let seen_from = from.map(|ip| ip.to_string());
        let mut j = req.into_inner();
        if j.host.is_empty() {
            // The rank did not name a host: use the address its connection came from.
            j.host = seen_from.ok_or_else(|| {
                Status::invalid_argument("host is empty and the connection has no peer address")
            })?;
        }
        let rank = s.check(j.credentials.as_ref(), "join", from)?;
        if j.world_size != s.me.world_size {
            return Err(Status::failed_precondition(format!(
                "rank {rank} was started for a world of {}, rank 0 for a world of {}",
                j.world_size, s.me.world_size
            )));
        }
        if j.config_digest != s.me.config_digest {
            return Err(Status::failed_precondition(format!(
                "rank {rank} read a worker config with digest {}, rank 0 one with digest {}: \
                 every rank must train the same config",
                j.config_digest, s.me.config_digest
            )));
        }
        tracing::info!(rank, host = %j.host, port = j.data_port, "rank joined");
        s.add_peer(Peer {
            rank,
            host: j.host,
            data_port: j.data_port,
        })?;
        match s.wait_world().await {
            Ok(w) => Ok(Response::new(JoinResponse {
                peers: w.peers,
                nccl_id: w.nccl_id,
                config_digest: s.me.config_digest.clone(),
            })),
            Err(e) => Err(Status::deadline_exceeded(e)),
        }
    }

    type HeartbeatStream = CommandStream;

    async fn heartbeat(
        &self,
        req: Request<Streaming<Beat>>,
    ) -> Result<Response<CommandStream>, Status> {
        let s = Arc::clone(&self.0);
        // Credentials first, from the metadata: nothing waits on a stream nobody proved.
        let creds = req
            .metadata()
            .get_bin(CREDENTIALS_HEADER)
            .and_then(|v| v.to_bytes().ok())
            .and_then(|b| <Credentials as lockstep_proto::prost::Message>::decode(b).ok());
        let from = req.remote_addr().map(|a| a.ip());
        let rank = s.check(creds.as_ref(), "heartbeat", from)? as usize;
        let mut beats = req.into_inner();
        let first = tokio::time::timeout(FIRST_BEAT_LIMIT, beats.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "rank {rank} sent no beat within {} s of opening its heartbeat",
                    FIRST_BEAT_LIMIT.as_secs()
                ))
            })??
            .ok_or_else(|| Status::invalid_argument("the heartbeat stream was empty"))?;
        let (tx, rx) = mpsc::channel::<Result<Command, Status>>(8);
        let mut failure = s.failure.subscribe();
        let mut stopping = s.stopping.subscribe();
        tokio::spawn(async move {
            let ack = || Command {
                kind: Some(command::Kind::Ack(Ack {})),
            };
            let _ = tx.send(Ok(ack())).await;
            let mut finished = first.done;
            loop {
                tokio::select! {
                    beat = beats.message(), if !finished => match beat {
                        Ok(Some(b)) => {
                            let now = Instant::now();
                            s.last_seen.lock().unwrap_or_else(|e| e.into_inner())[rank] = Some(now);
                            s.progress.lock().unwrap_or_else(|e| e.into_inner())[rank] =
                                Some((Snapshot {
                                    step: b.step,
                                    idle_ms: b.idle_ms,
                                    doing: b.doing.clone(),
                                    communicating: b.communicating,
                                    waiting_on_peers: b.waiting_on_peers,
                                }, now));
                            if b.done {
                                s.done.lock().unwrap_or_else(|e| e.into_inner())[rank] = true;
                                finished = true;
                                tracing::info!(rank, "rank finished");
                            }
                            let _ = tx.send(Ok(ack())).await;
                        }
                        Ok(None) | Err(_) => {
                            let done = s.done.lock().unwrap_or_else(|e| e.into_inner())[rank];
                            if !done {
                                s.fail(Failure {
                                    rank: rank as u32,
                                    reason: format!("rank {rank}'s heartbeat stream closed: the process exited or lost its connection"),
                                    reported_by: 0,
                                    ..Failure::default()
                                });
                            }
                            finished = true;
                        }
                    },
                    // A failure recorded before this stream opened counts too.
                    f = async { failure.wait_for(Option::is_some).await.map(|f| f.clone()) } => {
                        if let Ok(Some(f)) = f {
                            let _ = tx.send(Ok(Command { kind: Some(command::Kind::Abort(f)) })).await;
                        }
                        return;
                    }
                    _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn abort(&self, req: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let at = req.remote_addr().map(|a| a.ip());
        let a = req.into_inner();
        let from = self.0.check(a.credentials.as_ref(), "abort", at)?;
        let mut f = a
            .failure
            .ok_or_else(|| Status::invalid_argument("failure is required"))?;
        f.reported_by = from;
        let first = self.0.fail(f);
        Ok(Response::new(AbortResponse { first: Some(first) }))
    }

    async fn barrier(
        &self,
        req: Request<BarrierRequest>,
    ) -> Result<Response<BarrierResponse>, Status> {
        let from = req.remote_addr().map(|a| a.ip());
        let b = req.into_inner();
        let rank = self.0.check(b.credentials.as_ref(), "barrier", from)?;
        self.0
            .enter_barrier(&b.name, rank)
            .await
            .map_err(Status::aborted)?;
        Ok(Response::new(BarrierResponse {}))
    }
}

impl State {
    async fn enter_barrier(&self, name: &str, rank: u32) -> Result<(), String> {
        let mut rx = {
            let mut all = self.barriers.lock().unwrap_or_else(|e| e.into_inner());
            let world = self.me.world_size as usize;
            let tx = all
                .entry(name.to_string())
                .or_insert_with(|| watch::channel(vec![false; world]).0);
            tx.send_modify(|v| v[rank as usize] = true);
            tx.subscribe()
        };
        let mut failure = self.failure.subscribe();
        tokio::select! {
            r = rx.wait_for(|v| v.iter().all(|&b| b)) => r.map(|_| ()).map_err(|_| "the rendezvous server stopped".to_string()),
            f = failure.wait_for(Option::is_some) => Err(match f {
                Ok(f) => format!("barrier {name} aborted: {}", describe(f.as_ref().expect("waited for Some"))),
                Err(_) => "the rendezvous server stopped".into(),
            }),
        }
    }
}

/// One line that names a failure: rank, reason and who reported it.
pub fn describe(f: &Failure) -> String {
    if f.reported_by == f.rank || f.reported_by == 0 {
        format!("rank {} failed: {}", f.rank, f.reason)
    } else {
        format!(
            "rank {} failed: {} (reported by rank {})",
            f.rank, f.reason, f.reported_by
        )
    }
}

enum Role {
    Server {
        state: Arc<State>,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        served: Option<tokio::task::JoinHandle<()>>,
    },
    Client {
        client: RendezvousClient<Channel>,
        beats: mpsc::Sender<Beat>,
        keys: Arc<GangKeys>,
    },
}

/// This rank's membership in the gang, from join to finish.
pub struct Session {
    me: Identity,
    world: World,
    failure: watch::Receiver<Option<Failure>>,
    activity: Arc<Activity>,
    role: Role,
    /// Background tasks that end with the session (heartbeat, watchdog, server).
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Session {
    /// A session dropped without [`Session::finish`] ends as a dead rank does: its heartbeat
    /// stops, and rank 0's server closes every stream.
    fn drop(&mut self) {
        if let Role::Server {
            state, shutdown, ..
        } = &mut self.role
        {
            state.stopping.send_replace(true);
            if let Some(s) = shutdown.take() {
                let _ = s.send(());
            }
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("me", &self.me).finish()
    }
}

impl Session {
    /// Rank 0: serves the rendezvous on `listener`, joins itself, and waits until every rank has
    /// joined (or the deadline).
    pub async fn serve(
        listener: tokio::net::TcpListener,
        me: Identity,
        nccl_id: Vec<u8>,
        opts: Options,
    ) -> Result<Self, RendezvousError> {
        let world = me.world_size as usize;
        let activity = Arc::new(Activity::new());
        let state = Arc::new(State {
            keys: GangKeys::derive(&me.token, me.attempt),
            nonces: Mutex::default(),
            me: me.clone(),
            opts,
            nccl_id,
            started: Instant::now(),
            peers: Mutex::new(vec![None; world]),
            last_seen: Mutex::new(vec![None; world]),
            progress: Mutex::new(vec![None; world]),
            activity: Arc::clone(&activity),
            done: Mutex::new(vec![false; world]),
            world: watch::channel(None).0,
            failure: watch::channel(None).0,
            barriers: Mutex::new(HashMap::new()),
            stopping: watch::channel(false).0,
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<RendezvousServer<Service>>().await;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits::new(world);
        let incoming = tokio_stream::StreamExt::filter_map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            move |conn| match conn {
                Ok(io) => limits.admit(io).map(Ok::<_, std::io::Error>),
                Err(e) => Some(Err(e)),
            },
        );
        let svc = RendezvousServer::new(Service(Arc::clone(&state)));
        let served = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .max_concurrent_streams(STREAMS_PER_CONNECTION)
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .add_service(health_service)
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "rendezvous server stopped");
            }
        });
        let watchdog = tokio::spawn(Arc::clone(&state).watch());
        state
            .add_peer(Peer {
                rank: 0,
                host: me.host.clone(),
                data_port: me.data_port,
            })
            .map_err(|e| RendezvousError::Serve(e.message().to_string()))?;
        let world = state.wait_world().await.map_err(|e| {
            let missing = state.missing();
            if missing.is_empty() {
                RendezvousError::Serve(e)
            } else {
                RendezvousError::Missing {
                    missing,
                    world: me.world_size,
                    seconds: state.opts.join_timeout.as_secs(),
                }
            }
        })?;
        Ok(Self {
            me,
            world,
            failure: state.failure.subscribe(),
            activity,
            tasks: vec![watchdog.abort_handle(), served.abort_handle()],
            role: Role::Server {
                state,
                shutdown: Some(shutdown),
                served: Some(served),
            },
        })
    }

    /// Any rank but 0: joins rank 0 at `addr` (`host:port`), retrying until the deadline, then
    /// starts the heartbeat.
    pub async fn join(addr: &str, me: Identity, opts: Options) -> Result<Self, RendezvousError> {
        let deadline = Instant::now() + opts.join_timeout;
        let keys = Arc::new(GangKeys::derive(&me.token, me.attempt));
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| RendezvousError::Serve(format!("bad rendezvous address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let mut last = String::new();
        let (client, world) = loop {
            if Instant::now() >= deadline {
                return Err(RendezvousError::Unreachable {
                    addr: addr.to_string(),
                    seconds: opts.join_timeout.as_secs(),
                    last,
                });
            }
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{e}: {}", source_chain(&e));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let client = RendezvousClient::new(channel);
            let joined = with_credentials(&client, &me, &keys, "join", |mut c, creds| {
                let mut req = Request::new(JoinRequest {
                    credentials: Some(creds),
                    host: me.host.clone(),
                    data_port: me.data_port,
                    world_size: me.world_size,
                    config_digest: me.config_digest.clone(),
                });
                req.set_timeout(
                    deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
                );
                async move { c.join(req).await }
            })
            .await;
            match joined {
                Ok(r) => {
                    let r = r.into_inner();
                    break (
                        client,
                        World {
                            peers: r.peers,
                            nccl_id: r.nccl_id,
                        },
                    );
                }
                Err(s) if s.code() == Code::Unavailable => {
                    last = s.message().to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(RendezvousError::Refused(s.message().to_string())),
            }
        };
        let (failure_tx, failure) = watch::channel(None);
        let (beats, beat_rx) = mpsc::channel::<Beat>(4);
        let activity = Arc::new(Activity::new());
        let heartbeat = tokio::spawn(client_heartbeat(
            client.clone(),
            me.clone(),
            Arc::clone(&keys),
            opts,
            (beat_rx, beats.clone()),
            Arc::clone(&activity),
            failure_tx,
        ));
        Ok(Self {
            me,
            world,
            failure,
            activity,
            tasks: vec![heartbeat.abort_handle()],
            role: Role::Client {
                client,
                beats,
                keys,
            },
        })
    }

    /// The world every rank agreed on.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Resolves when the gang is aborted, with the first failure.
    pub fn aborted(&self) -> impl std::future::Future<Output = Failure> + Send + 'static {
        let mut rx = self.failure.clone();
        async move {
            let first = rx.wait_for(Option::is_some).await.map(|f| f.clone());
            match first {
                Ok(f) => f.expect("waited for Some"),
                // The session ended without a failure: never resolve.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Reports this rank's step, carried by the next heartbeat.
    pub fn set_step(&self, step: u64) {
        self.activity.set_step(step);
    }

    /// Where this rank records its progress: its communicators record their operations in it
    /// (see [`crate::watchdog`]), its heartbeat reports it, and rank 0 judges it.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// Reports a failure (of this rank, or of a peer it lost) so that rank 0 aborts the gang;
    /// returns the gang's first failure, which may be another. `exit_code` is the code this rank
    /// exits with when the failure is its own (0 for a lost peer): the abort that comes back
    /// carries it, so this rank exits with it whichever path ends the process.
    pub async fn report(&self, failed_rank: u32, reason: String, exit_code: i32) -> Failure {
        let f = Failure {
            rank: failed_rank,
            reason,
            reported_by: self.me.rank,
            exit_code,
        };
        match &self.role {
            Role::Server { state, .. } => state.fail(f),
            Role::Client { client, keys, .. } => {
                let reported = with_credentials(client, &self.me, keys, "abort", |mut c, creds| {
                    let mut req = Request::new(AbortRequest {
                        credentials: Some(creds),
                        failure: Some(f.clone()),
                    });
                    req.set_timeout(Duration::from_secs(2));
                    async move { c.abort(req).await }
                });
                match tokio::time::timeout(Duration::from_secs(5), reported).await {
                    Ok(Ok(r)) => r.into_inner().first.unwrap_or(f),
                    _ => f,
                }
            }
        }
    }

    /// Waits until every rank has entered the barrier `name`.
    pub async fn barrier(&self, name: &str) -> Result<(), String> {
        match &self.role {
            Role::Server { state, .. } => state.enter_barrier(name, 0).await,
            Role::Client { client, keys, .. } => {
                with_credentials(client, &self.me, keys, "barrier", |mut c, creds| {
                    let req = BarrierRequest {
                        credentials: Some(creds),
                        name: name.to_string(),
                    };
                    async move { c.barrier(req).await }
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string())
            }
        }
    }

    /// Ends this rank's membership after its work is done. Other ranks tell rank 0 they are
    /// done; rank 0 waits (up to `grace`) for them before it stops serving, so that no rank
    /// mistakes the end of the server for a failure.
    pub async fn finish(mut self, grace: Duration) {
        match &mut self.role {
            Role::Client { beats, .. } => {
                let _ = beats
                    .send(Beat {
                        step: self.activity.step(),
                        done: true,
                        ..Beat::default()
                    })
                    .await;
                // Give the beat a moment to leave before the heartbeat task is stopped.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Role::Server {
                state,
                shutdown,
                served,
            } => {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    let all = state
                        .done
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .skip(1)
                        .all(|&d| d);
                    if all || state.failure.borrow().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                state.stopping.send_replace(true);
                if let Some(s) = shutdown.take() {
                    let _ = s.send(());
                }
                if let Some(served) = served.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), served).await;
                }
            }
        }
    }
}

/// Credentials for one `method` request of `me`: a fresh challenge from rank 0, answered.
async fn credentials(
    client: &mut RendezvousClient<Channel>,
    me: &Identity,
    keys: &GangKeys,
    method: &str,
) -> Result<Credentials, Status> {
    let nonce = client
        .challenge(ChallengeRequest { rank: me.rank })
        .await?
        .into_inner()
        .nonce;
    Ok(Credentials {
        attempt: me.attempt,
        rank: me.rank,
        proof: keys.rendezvous_proof(method, me.rank, me.attempt, &nonce),
        nonce,
    })
}

/// Runs `call` with fresh credentials for `method`, asking for a new challenge (up to 3 times)
/// when rank 0 no longer holds the one answered (it expired, or too many were asked for).
async fn with_credentials<T, F, Fut>(
    client: &RendezvousClient<Channel>,
    me: &Identity,
    keys: &GangKeys,
    method: &str,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut(RendezvousClient<Channel>, Credentials) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut tries = 0;
    loop {
        let mut c = client.clone();
        let creds = credentials(&mut c, me, keys, method).await?;
        match call(c, creds).await {
            Err(s) if s.code() == Code::Aborted && s.message().starts_with(STALE) && tries < 3 => {
                tries += 1;
            }
            r => return r,
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

async fn client_heartbeat(
    mut client: RendezvousClient<Channel>,
    me: Identity,
    keys: Arc<GangKeys>,
    opts: Options,
    (beat_rx, beats): (mpsc::Receiver<Beat>, mpsc::Sender<Beat>),
    activity: Arc<Activity>,
    failure: watch::Sender<Option<Failure>>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lost = |reason: String| {
        Some(Failure {
            rank: 0,
            reason,
            reported_by: me.rank,
            ..Failure::default()
        })
    };
    let beat = || {
        let s = activity.snapshot();
        Beat {
            step: s.step,
            done: false,
            idle_ms: s.idle_ms,
            doing: s.doing,
            communicating: s.communicating,
            waiting_on_peers: s.waiting_on_peers,
        }
    };
    // The request stream carries the beats of this task and the final one of
    // `Session::finish`; it ends after the final beat, or when both senders are gone (the
    // session was dropped: to rank 0 that is a rank that died).
    let finished = Arc::new(AtomicBool::new(false));
    let outbound = {
        let finished = Arc::clone(&finished);
        futures::stream::unfold((beat_rx, false), move |(mut rx, ended)| {
            let finished = Arc::clone(&finished);
            async move {
                if ended {
                    return None;
                }
                let b = rx.recv().await?;
                if b.done {
                    finished.store(true, Ordering::SeqCst);
                }
                let last = b.done;
                Some((b, (rx, last)))
            }
        })
    };
    // Rank 0 answers once it has the first beat.
    if beats.send(beat()).await.is_err() {
        return;
    }
    // Credentials in the metadata, so that rank 0 checks them before it waits for a beat.
    let opened = match credentials(&mut client, &me, &keys, "heartbeat").await {
        Ok(c) => {
            let mut req = Request::new(outbound);
            req.metadata_mut().insert_bin(
                CREDENTIALS_HEADER,
                tonic::metadata::MetadataValue::from_bytes(
                    &lockstep_proto::prost::Message::encode_to_vec(&c),
                ),
            );
            client.heartbeat(req).await
        }
        Err(s) => Err(s),
    };
    let mut inbound = match opened {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if !finished.load(Ordering::SeqCst) {
                failure.send_replace(lost(format!(
                    "rank 0 refused the heartbeat: {}",
                    s.message()
                )));
            }
            return;
        }
    };
    let mut tick = tokio::time::interval(opts.heartbeat_interval);
    let mut last_answer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Never block on a full queue: a missing beat is what the timeout is for.
                let _ = beats.try_send(beat());
            }
            answer = inbound.message() => {
                last_answer = tokio::time::Instant::now();
                if finished.load(Ordering::SeqCst) {
                    return;
                }
                match answer {
                    Ok(Some(Command { kind: Some(command::Kind::Abort(f)) })) => {
                        failure.send_replace(Some(f));
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        failure.send_replace(lost(
                            "lost the connection to rank 0 (the rendezvous server): it exited \
                             or its node is unreachable"
                                .into(),
                        ));
                        return;
                    }
                }
            }
            _ = tokio::time::sleep_until(last_answer + opts.heartbeat_timeout) => {
                if !finished.load(Ordering::SeqCst) {
                    failure.send_replace(lost(format!(
                        "rank 0 did not answer heartbeats for {} ms: it hangs or its node is \
                         unreachable",
                        opts.heartbeat_timeout.as_millis()
                    )));
                }
                return;
            }
        }
    }
}
