//! Every TCP collective against a simple reference, for 1 to 8 ranks, odd sizes, empty buffers
//! and every operation; results must be bit-identical across ranks.

use std::time::{Duration, Instant};

use lockstep_worker::comm::tcp::{TcpComm, TcpOptions};
use lockstep_worker::comm::{CommError, Communicator, ReduceOp};

/// Small integers, so that sums are exact whatever the order of the additions.
fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 31 + i * 7) % 97) as f32 - 48.0)
        .collect()
}

fn reference(world: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    let mut acc = data(0, len);
    for r in 1..world {
        op.fold(&mut acc, &data(r, len));
    }
    op.finish(&mut acc, world);
    acc
}

/// Runs `f` on every rank of a fresh local gang, each on its own thread, and returns the results
/// in rank order.
fn gang<T: Send>(n: usize, opts: TcpOptions, f: impl Fn(TcpComm) -> T + Sync) -> Vec<T> {
    let comms = TcpComm::local_gang(n, opts).expect("a local gang");
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn small_opts() -> TcpOptions {
    // Small chunks and a small threshold, so that odd sizes cross chunk and algorithm borders.
    TcpOptions {
        timeout: Duration::from_secs(20),
        small_bytes: 256,
        chunk_elems: 37,
        ..TcpOptions::default()
    }
}

const SIZES: [usize; 8] = [0, 1, 2, 7, 63, 64, 65, 1001];

#[test]
fn all_reduce_matches_reference_for_every_op_size_and_world() {
    for n in 1..=8 {
        for op in ReduceOp::ALL {
            let out = gang(n, small_opts(), |mut c| {
                SIZES
                    .iter()
                    .map(|&len| {
                        let mut b = data(c.rank(), len);
                        c.all_reduce(&mut b, op).expect("all_reduce");
                        b
                    })
                    .collect::<Vec<_>>()
            });
            for (i, &len) in SIZES.iter().enumerate() {
                let want = reference(n, len, op);
                for (r, got) in out.iter().enumerate() {
                    assert_eq!(got[i], want, "n={n} op={op:?} len={len} rank={r}");
                }
            }
        }
    }
}

#[test]
fn ring_results_are_bit_identical_across_ranks() {
    // Fractional values: sums depend on the order of additions, so only the algorithm's
    // guarantee (each element reduced once, then copied) makes the ranks agree bit for bit.
    let len = 100_003;
    let out = gang(5, small_opts(), |mut c| {
        let r = c.rank() as f32;
        let mut b: Vec<f32> = (0..len)
            .map(|i| (i as f32 * 0.37 + r).sin() / 3.0)
            .collect();
        c.all_reduce(&mut b, ReduceOp::Avg).expect("all_reduce");
        b
    });
    for r in 1..5 {
        assert!(
            out[r]
                .iter()
                .zip(&out[0])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r} differs from rank 0"
        );
    }
    let want: Vec<f32> = (0..len)
        .map(|i| {
            (0..5)
                .map(|r| (i as f32 * 0.37 + r as f32).sin() / 3.0)
                .sum::<f32>()
                / 5.0
        })
        .collect();
    let worst = out[0]
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "worst error {worst}");
}

#[test]
fn broadcast_from_every_root() {
    for n in 1..=6 {
        for root in 0..n {
            let out = gang(n, small_opts(), |mut c| {
                SIZES
                    .iter()
                    .map(|&len| {
                        let mut b = data(c.rank(), len);
                        c.broadcast(&mut b, root).expect("broadcast");
                        b
                    })
                    .collect::<Vec<_>>()
            });
            for (i, &len) in SIZES.iter().enumerate() {
                for got in &out {
                    assert_eq!(got[i], data(root, len), "n={n} root={root} len={len}");
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_and_all_gather_match_reference() {
    for n in 1..=8 {
        for per in [0usize, 1, 5, 40] {
            for op in ReduceOp::ALL {
                let out = gang(n, small_opts(), |mut c| {
                    let mut o = vec![0.0; per];
                    c.reduce_scatter(&data(c.rank(), per * n), &mut o, op)
                        .expect("reduce_scatter");
                    let mut g = vec![0.0; per * n];
                    c.all_gather(&data(c.rank(), per), &mut g)
                        .expect("all_gather");
                    (o, g)
                });
                let full = reference(n, per * n, op);
                let gathered: Vec<f32> = (0..n).flat_map(|r| data(r, per)).collect();
                for (r, (o, g)) in out.iter().enumerate() {
                    assert_eq!(
                        o[..],
                        full[r * per..(r + 1) * per],
                        "rs n={n} per={per} {op:?}"
                    );
                    assert_eq!(*g, gathered, "ag n={n} per={per}");
                }
            }
        }
    }
}

#[test]
fn size_mismatches_are_refused_with_the_sizes_named() {
    let out = gang(2, small_opts(), |mut c| {
        let mut o = vec![0.0; 3];
        c.reduce_scatter(&[0.0; 5], &mut o, ReduceOp::Sum)
            .expect_err("5 is not 2 x 3")
            .to_string()
    });
    assert!(
        out[0].contains("input has 5 elements, expected 2 ranks x 3"),
        "{}",
        out[0]
    );
}

#[test]
fn send_recv_around_a_ring_and_barrier() {
    for n in 2..=5 {
        let out = gang(n, small_opts(), |mut c| {
            let (r, n) = (c.rank(), c.world_size());
            let mut got = vec![0.0; 1001];
            // Even ranks send first, odd ranks receive first: no rank waits on itself.
            if r % 2 == 0 {
                c.send(&data(r, 1001), (r + 1) % n).expect("send");
                c.recv(&mut got, (r + n - 1) % n).expect("recv");
            } else {
                c.recv(&mut got, (r + n - 1) % n).expect("recv");
                c.send(&data(r, 1001), (r + 1) % n).expect("send");
            }
            c.barrier().expect("barrier");
            got
        });
        for (r, got) in out.iter().enumerate() {
            assert_eq!(*got, data((r + n - 1) % n, 1001), "n={n} rank={r}");
        }
    }
}

#[test]
fn async_all_reduces_complete_in_order_and_mix_with_sync_ones() {
    let out = gang(4, small_opts(), |mut c| {
        let r = c.rank();
        let pending: Vec<_> = (0..6)
            .map(|k| c.all_reduce_async(data(r + k, 500 + k), ReduceOp::Sum))
            .collect();
        // A synchronous collective waits for the asynchronous ones started before it.
        let mut b = data(r, 10);
        c.all_reduce(&mut b, ReduceOp::Max)
            .expect("sync all_reduce");
        let done: Vec<_> = pending
            .into_iter()
            .map(|p| p.wait().expect("async"))
            .collect();
        (done, b)
    });
    for (done, b) in &out {
        for (k, got) in done.iter().enumerate() {
            let mut want = data(k, 500 + k);
            for r in 1..4 {
                ReduceOp::Sum.fold(&mut want, &data(r + k, 500 + k));
            }
            assert_eq!(*got, want, "async op {k}");
        }
        assert_eq!(*b, reference(4, 10, ReduceOp::Max));
    }
}

#[test]
fn split_into_data_parallel_and_pipeline_groups() {
    // 6 ranks = 2 stages x 3 replicas; stage = r / 3, replica = r % 3 (api::layout).
    let out = gang(6, small_opts(), |mut c| {
        let r = c.rank() as u32;
        let mut dp = c.split(r / 3, r).expect("dp split");
        let mut pp = c.split(r % 3, r).expect("pp split");
        let mut b = vec![c.rank() as f32; 100];
        dp.all_reduce(&mut b, ReduceOp::Sum).expect("dp all_reduce");
        let mut x = vec![0.0f32; 3];
        if pp.rank() == 0 {
            pp.send(&[r as f32; 3], 1).expect("pp send");
        } else {
            pp.recv(&mut x, 0).expect("pp recv");
        }
        (dp.members().to_vec(), pp.members().to_vec(), b[0], x[0])
    });
    for (r, (dp, pp, sum, x)) in out.into_iter().enumerate() {
        let stage = r / 3;
        assert_eq!(dp, (stage * 3..stage * 3 + 3).collect::<Vec<_>>());
        assert_eq!(pp, vec![r % 3, r % 3 + 3]);
        assert_eq!(sum, (stage * 3..stage * 3 + 3).sum::<usize>() as f32);
        if stage == 1 {
            assert_eq!(x, (r - 3) as f32);
        }
    }
}

#[test]
fn a_dead_peer_is_an_error_naming_it_not_a_hang() {
    let opts = TcpOptions {
        timeout: Duration::from_secs(60),
        ..small_opts()
    };
    let started = Instant::now();
    let out = gang(4, opts, |mut c| {
        let r = c.rank();
        let mut b = data(r, 100_000);
        c.all_reduce(&mut b, ReduceOp::Sum)
            .expect("first all_reduce");
        if r == 2 {
            // Rank 2 dies: its connections close.
            drop(c);
            return None;
        }
        Some(
            c.all_reduce(&mut b, ReduceOp::Sum)
                .expect_err("rank 2 is gone"),
        )
    });
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    // Rank 3 receives from rank 2 in the ring: it must blame rank 2.
    let e = out[3].as_ref().expect("rank 3 error");
    assert_eq!(e.peer(), Some(2), "{e}");
    assert!(matches!(e, CommError::PeerLost { .. }), "{e}");
}

#[test]
fn a_hung_peer_times_out_with_its_rank_named() {
    let opts = TcpOptions {
        timeout: Duration::from_millis(500),
        ..small_opts()
    };
    let out = gang(2, opts, |mut c| {
        if c.rank() == 1 {
            // Rank 1 hangs (never joins the collective) while rank 0 waits for it.
            std::thread::sleep(Duration::from_secs(2));
            return None;
        }
        let mut b = data(0, 10);
        Some(
            c.all_reduce(&mut b, ReduceOp::Sum)
                .expect_err("rank 1 hangs"),
        )
    });
    let e = out[0].as_ref().expect("rank 0 error");
    assert!(matches!(e, CommError::Timeout { peer: 1, .. }), "{e}");
}
