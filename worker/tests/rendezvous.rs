//! The rendezvous against a real gRPC server on 127.0.0.1: join, refusals (token, attempt,
//! config), a rank that never arrives, and the abort of the gang when a rank dies or reports.

use std::time::{Duration, Instant};

use lockstep_worker::rendezvous::{Identity, Options, RendezvousError, Session};

fn me(rank: u32, world: u32) -> Identity {
    Identity {
        rank,
        world_size: world,
        attempt: 1,
        token: "secret".into(),
        config_digest: "abc".into(),
        host: if rank == 0 {
            "127.0.0.1".into()
        } else {
            String::new()
        },
        data_port: 1000 + rank,
    }
}

fn opts(join: Duration) -> Options {
    Options {
        join_timeout: join,
        heartbeat_interval: Duration::from_millis(100),
        // Long enough that a loaded CI machine does not make a live rank look silent.
        heartbeat_timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    (l, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rank_learns_the_same_world() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(Session::serve(
        l,
        me(0, 3),
        vec![9; 128],
        opts(Duration::from_secs(20)),
    ));
    let a = tokio::spawn({
        let addr = addr.clone();
        async move { Session::join(&addr, me(1, 3), opts(Duration::from_secs(20))).await }
    });
    let b =
        tokio::spawn(
            async move { Session::join(&addr, me(2, 3), opts(Duration::from_secs(20))).await },
        );
    let s0 = server.await.expect("task").expect("rank 0");
    let s1 = a.await.expect("task").expect("rank 1");
    let s2 = b.await.expect("task").expect("rank 2");
    assert_eq!(s0.world(), s1.world());
    assert_eq!(s1.world(), s2.world());
    let w = s0.world();
    assert_eq!(w.nccl_id, vec![9; 128]);
    assert_eq!(
        w.peers.iter().map(|p| p.rank).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        w.peers[2].host, "127.0.0.1",
        "rank 0 fills in the address it saw"
    );
    assert_eq!(w.peers[2].data_port, 1002);
    // A barrier, then a clean finish: no rank sees a failure.
    let (r0, r1, r2) = tokio::join!(
        s0.barrier("ready"),
        s1.barrier("ready"),
        s2.barrier("ready")
    );
    r0.and(r1).and(r2).expect("barrier");
    let f1 = tokio::spawn(s1.finish(Duration::from_secs(5)));
    let f2 = tokio::spawn(s2.finish(Duration::from_secs(5)));
    s0.finish(Duration::from_secs(5)).await;
    f1.await.expect("finish");
    f2.await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_token_a_stale_attempt_and_another_config_are_refused() {
    let (l, addr) = listener().await;
    let _server = tokio::spawn(Session::serve(
        l,
        me(0, 2),
        vec![],
        opts(Duration::from_secs(20)),
    ));
    let short = opts(Duration::from_secs(5));
    let mut wrong = me(1, 2);
    wrong.token = "other-job".into();
    let e = Session::join(&addr, wrong, short.clone())
        .await
        .expect_err("wrong token");
    assert!(matches!(e, RendezvousError::Refused(_)), "{e}");
    assert!(e.to_string().contains("belongs to another job"), "{e}");

    let mut stale = me(1, 2);
    stale.attempt = 0;
    let e = Session::join(&addr, stale, short.clone())
        .await
        .expect_err("stale attempt");
    assert!(
        e.to_string()
            .contains("is from attempt 0, but the gang is at attempt 1"),
        "{e}"
    );

    let mut other = me(1, 2);
    other.config_digest = "zzz".into();
    let e = Session::join(&addr, other, short)
        .await
        .expect_err("another config");
    assert!(e.to_string().contains("digest zzz"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranks_that_never_arrive_are_named() {
    let (l, addr) = listener().await;
    let server = tokio::spawn(Session::serve(
        l,
        me(0, 4),
        vec![],
        opts(Duration::from_secs(2)),
    ));
    let joined = Session::join(&addr, me(2, 4), opts(Duration::from_secs(2))).await;
    let e = joined.expect_err("ranks 1 and 3 never come");
    assert!(
        e.to_string()
            .contains("ranks [1, 3] of 4 never joined within 2 s"),
        "{e}"
    );
    let e = server
        .await
        .expect("task")
        .expect_err("rank 0 gives up too");
    assert!(
        e.to_string().contains("ranks [1, 3] of 4 never joined"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rank_zero_unreachable_is_a_clear_error() {
    let (l, addr) = listener().await;
    drop(l);
    let e = Session::join(&addr, me(1, 2), opts(Duration::from_secs(1)))
        .await
        .expect_err("nobody serves");
    assert!(matches!(e, RendezvousError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains(&addr), "{e}");
}

async fn gang(world: u32) -> Vec<Session> {
    gang_with(world, opts(Duration::from_secs(20))).await
}

async fn gang_with(world: u32, o: Options) -> Vec<Session> {
    let (l, addr) = listener().await;
    let server = tokio::spawn(Session::serve(l, me(0, world), vec![], o.clone()));
    let others: Vec<_> = (1..world)
        .map(|r| {
            let (addr, o) = (addr.clone(), o.clone());
            tokio::spawn(async move { Session::join(&addr, me(r, world), o).await })
        })
        .collect();
    let mut all = vec![server.await.expect("task").expect("rank 0")];
    for j in others {
        all.push(j.await.expect("task").expect("join"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_rank_without_progress_is_named_by_rank_zero_even_when_it_is_rank_zero() {
    let all = gang_with(
        3,
        Options {
            progress_timeout: Duration::from_secs(2),
            ..opts(Duration::from_secs(20))
        },
    )
    .await;
    // Ranks 1 and 2 finish steps; rank 0 (alive, heartbeating) makes none. Rank 1 is inside
    // a receive from rank 0 the whole time: it waits on its peer, which is no fault of its own.
    let waiting = all[1].activity();
    let _recv = waiting.enter("recv", Some(0));
    let started = Instant::now();
    let aborted = all[0].aborted();
    tokio::pin!(aborted);
    let mut step = 0;
    let f = loop {
        step += 1;
        all[1].set_step(step);
        all[2].set_step(step);
        assert!(started.elapsed() < Duration::from_secs(10), "not aborted");
        tokio::select! {
            f = &mut aborted => break f,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    assert_eq!((f.rank, f.reported_by, f.exit_code), (0, 0, 1), "{f:?}");
    assert!(
        f.reason.starts_with("rank 0 made no progress for 2.")
            && f.reason.contains("at step 0, outside any collective"),
        "{f:?}"
    );
    for s in &all[1..] {
        let g = tokio::time::timeout(Duration::from_secs(5), s.aborted())
            .await
            .expect("every rank learns it");
        assert_eq!(g.reason, f.reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_rank_aborts_every_other_rank_with_its_name() {
    let mut all = gang(4).await;
    let started = Instant::now();
    // Rank 2 dies: its heartbeat stream breaks.
    let dead = all.remove(2);
    drop(dead);
    for s in &all {
        let f = tokio::time::timeout(Duration::from_secs(5), s.aborted())
            .await
            .expect("aborted within 5 s");
        // Its stream closes at once; on a loaded machine rank 0's silence check may see it first.
        assert_eq!(f.rank, 2, "{f:?}");
        assert!(
            f.reason.contains("rank 2's heartbeat stream closed")
                || f.reason.contains("rank 2 sent no heartbeat"),
            "{f:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_reported_failure_wins_over_the_cascade() {
    let all = gang(3).await;
    // Rank 1 lost rank 2 in a collective and reports it; then rank 2 reports itself.
    let first = all[1]
        .report(2, "lost rank 2 during all_reduce".into(), 0)
        .await;
    assert_eq!((first.rank, first.reported_by), (2, 1));
    let later = all[2].report(2, "secondary".into(), 0).await;
    assert_eq!(
        later.reason, "lost rank 2 during all_reduce",
        "the first failure is kept"
    );
    for (i, s) in all.iter().enumerate() {
        let f = tokio::time::timeout(Duration::from_secs(5), s.aborted())
            .await
            .unwrap_or_else(|_| panic!("session {i} not aborted"));
        assert_eq!(f.reason, "lost rank 2 during all_reduce");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_rank_zero_aborts_the_others() {
    let mut all = gang(3).await;
    let zero = all.remove(0);
    drop(zero);
    for s in &all {
        let f = tokio::time::timeout(Duration::from_secs(5), s.aborted())
            .await
            .expect("aborted within 5 s");
        assert_eq!(f.rank, 0, "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_assembly_of_the_gang_is_no_stall_of_rank_zero() {
    let o = Options {
        progress_timeout: Duration::from_secs(2),
        ..opts(Duration::from_secs(20))
    };
    let (l, addr) = listener().await;
    let server = tokio::spawn(Session::serve(l, me(0, 2), vec![], o.clone()));
    // Rank 1 arrives after longer than the progress timeout (a slow image pull).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s1 = Session::join(&addr, me(1, 2), o).await.expect("join");
    let s0 = server.await.expect("task").expect("rank 0");
    // Then both train (the first step takes a moment): nobody is judged stuck.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for step in 1..=10 {
        s0.set_step(step);
        s1.set_step(step);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let aborted = tokio::time::timeout(Duration::from_millis(100), s0.aborted()).await;
    assert!(aborted.is_err(), "a healthy gang was failed: {aborted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_request_a_forged_proof_and_an_unproved_heartbeat_are_refused_at_once() {
    use lockstep_proto::v1::rendezvous_client::RendezvousClient;
    use lockstep_proto::v1::{AbortRequest, Beat, ChallengeRequest, Credentials, Failure};
    use lockstep_worker::auth::GangKeys;

    let (l, addr) = listener().await;
    let _server = tokio::spawn(Session::serve(
        l,
        me(0, 2),
        vec![],
        opts(Duration::from_secs(20)),
    ));
    let mut client = loop {
        if let Ok(c) = RendezvousClient::connect(format!("http://{addr}")).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let keys = GangKeys::derive("secret", 1);
    let creds = |nonce: Vec<u8>, method: &str| Credentials {
        attempt: 1,
        rank: 1,
        proof: keys.rendezvous_proof(method, 1, 1, &nonce),
        nonce,
    };
    let asker = client.clone();
    let challenge = async || {
        asker
            .clone()
            .challenge(ChallengeRequest { rank: 1 })
            .await
            .expect("challenge")
            .into_inner()
            .nonce
    };
    let abort = AbortRequest {
        credentials: Some(creds(challenge().await, "abort")),
        failure: Some(Failure {
            rank: 1,
            reason: "a test".into(),
            ..Failure::default()
        }),
    };
    client.abort(abort.clone()).await.expect("a proved request");
    // The same request again (a listener's recording): its nonce is spent.
    let e = client.abort(abort).await.expect_err("replayed");
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(e.message().contains("already saw answered"), "{e:?}");
    // A proof for another method does not carry over.
    let wrong = AbortRequest {
        credentials: Some(creds(challenge().await, "barrier")),
        failure: None,
    };
    let e = client.abort(wrong).await.expect_err("wrong method");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A heartbeat without credentials is refused before rank 0 waits for its first beat.
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        client.heartbeat(futures::stream::pending::<Beat>()),
    )
    .await
    .expect("refused at once, not left waiting")
    .expect_err("no credentials");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}
