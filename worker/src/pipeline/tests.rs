//! Properties of every plan over a grid of small pipelines, the bubble formulas of the papers,
//! and the simulator's refusals.

use std::collections::{HashMap, HashSet};

use super::schedule::PipelineSchedule::{self, GPipe, Interleaved, OneFOneB, ZeroBubble};
use super::*;

const SCHEDULES: [PipelineSchedule; 4] = [GPipe, OneFOneB, Interleaved, ZeroBubble];

/// Cost models every plan must run under: unit costs, uneven passes with latency, and a slow
/// gradient sync and optimizer.
fn cost_models() -> [Costs; 3] {
    [
        Costs::default(),
        Costs {
            forward: 2,
            backward_input: 3,
            backward_weight: 1,
            latency: 1,
            ..Costs::default()
        },
        Costs {
            forward: 1,
            backward_input: 2,
            backward_weight: 2,
            latency: 3,
            grad_sync: 5,
            optimizer_step: 2,
        },
    ]
}

/// Whether `plan` must accept (schedule, p, m, v): the rules its doc states.
fn valid(schedule: PipelineSchedule, p: u32, m: u32, v: u32) -> bool {
    match schedule {
        Interleaved => v >= 2 && m.is_multiple_of(p),
        _ => v == 1,
    }
}

/// Every (schedule, p, m, v) with p in 1..=6, m in 1..=12, v in 1..=3 that has a plan.
fn grid() -> Vec<(PipelineSchedule, u32, u32, u32)> {
    let mut out = Vec::new();
    for schedule in SCHEDULES {
        for p in 1..=6 {
            for m in 1..=12 {
                for v in 1..=3 {
                    if valid(schedule, p, m, v) {
                        out.push((schedule, p, m, v));
                    }
                }
            }
        }
    }
    out
}

fn unit(schedule: PipelineSchedule, p: u32, m: u32, v: u32) -> (Vec<Vec<Action>>, Report) {
    let plan = plan(schedule, p, m, v).unwrap();
    let report = simulate(&plan, v, &Costs::default(), SendMode::Buffered)
        .unwrap_or_else(|e| panic!("{schedule:?} p={p} m={m} v={v}: {e}"));
    (plan, report)
}

#[test]
fn plan_accepts_exactly_the_documented_shapes() {
    for schedule in SCHEDULES {
        for p in 0..=6 {
            for m in 0..=12 {
                for v in 0..=3 {
                    let got = plan(schedule, p, m, v);
                    let want = p > 0 && m > 0 && v > 0 && valid(schedule, p, m, v);
                    assert_eq!(got.is_ok(), want, "{schedule:?} p={p} m={m} v={v}: {got:?}");
                }
            }
        }
    }
    assert_eq!(
        plan(Interleaved, 4, 6, 2),
        Err(PlanError::NotMultipleOfStages {
            micro_batches: 6,
            stages: 4
        })
    );
    assert!(matches!(
        plan(ZeroBubble, 4, 8, 2),
        Err(PlanError::Chunks { chunks: 2, .. })
    ));
    assert!(matches!(
        plan(Interleaved, 4, 8, 1),
        Err(PlanError::Chunks { chunks: 1, .. })
    ));
    assert_eq!(plan(GPipe, 0, 8, 1), Err(PlanError::Zero { what: "stage" }));
    assert!(matches!(
        plan(Interleaved, 65536, 65536, 2),
        Err(PlanError::TooLarge { .. })
    ));
}

/// Where each compute pass of a stage sits in its list.
#[derive(Default)]
struct Passes {
    forward: HashMap<(u32, u32), usize>,
    backward: HashMap<(u32, u32), usize>,
    input: HashMap<(u32, u32), usize>,
    weight: HashMap<(u32, u32), usize>,
}

fn passes(what: &str, actions: &[Action]) -> Passes {
    let mut p = Passes::default();
    for (i, a) in actions.iter().enumerate() {
        let map = match a {
            Action::Forward { .. } => &mut p.forward,
            Action::Backward { .. } => &mut p.backward,
            Action::BackwardInput { .. } => &mut p.input,
            Action::BackwardWeight { .. } => &mut p.weight,
            _ => continue,
        };
        let key = a.micro_chunk().unwrap();
        assert!(map.insert(key, i).is_none(), "{what}: {a} twice");
    }
    p
}

#[test]
fn every_stage_runs_each_pass_once_in_order_then_syncs_and_steps() {
    for (schedule, p, m, v) in grid() {
        let plan = plan(schedule, p, m, v).unwrap();
        assert_eq!(plan.len(), p as usize);
        let all: HashSet<(u32, u32)> = (0..m).flat_map(|i| (0..v).map(move |c| (i, c))).collect();
        let split = schedule == ZeroBubble;
        for (s, actions) in plan.iter().enumerate() {
            let what = format!("{schedule:?} p={p} m={m} v={v} stage {s}");
            let passes = passes(&what, actions);
            let keys = |m: &HashMap<(u32, u32), usize>| m.keys().copied().collect::<HashSet<_>>();
            assert_eq!(keys(&passes.forward), all, "{what}: forwards");
            if split {
                assert!(passes.backward.is_empty(), "{what}: a full backward");
                assert_eq!(keys(&passes.input), all, "{what}: input gradients");
                assert_eq!(keys(&passes.weight), all, "{what}: weight gradients");
            } else {
                assert_eq!(keys(&passes.backward), all, "{what}: backwards");
                assert!(
                    passes.input.is_empty() && passes.weight.is_empty(),
                    "{what}: split"
                );
            }
            for key in &all {
                let f = passes.forward[key];
                let b = if split {
                    passes.input[key]
                } else {
                    passes.backward[key]
                };
                assert!(f < b, "{what}: the backward of {key:?} before its forward");
                if split {
                    assert!(b < passes.weight[key], "{what}: W of {key:?} before its B");
                }
            }
            // One gradient sync, then one optimizer step, at the end.
            let n = actions.len();
            assert!(n >= 2);
            assert_eq!(
                actions[n - 2..],
                [Action::GradSync, Action::OptimizerStep],
                "{what}"
            );
            let count = |x: Action| actions.iter().filter(|&&a| a == x).count();
            assert_eq!(
                (count(Action::GradSync), count(Action::OptimizerStep)),
                (1, 1),
                "{what}"
            );
        }
    }
}

/// The tensor a communication action carries: (gradient?, micro-batch, sending stage,
/// receiving stage, model part that produced it).
type Tensor = (bool, u32, u32, u32, u32);

#[test]
fn every_send_has_exactly_one_receive_on_its_peer() {
    for (schedule, p, m, v) in grid() {
        let plan = plan(schedule, p, m, v).unwrap();
        let what = format!("{schedule:?} p={p} m={m} v={v}");
        let mut sent: Vec<Tensor> = Vec::new();
        let mut received: Vec<Tensor> = Vec::new();
        for (s, actions) in plan.iter().enumerate() {
            let s = s as u32;
            for a in actions {
                let (micro, chunk) = match a.micro_chunk() {
                    Some(mc) if a.is_communication() => mc,
                    _ => continue,
                };
                let part = chunk * p + s;
                match *a {
                    Action::SendActivation { to, .. } => sent.push((false, micro, s, to, part)),
                    Action::SendGrad { to, .. } => sent.push((true, micro, s, to, part)),
                    Action::RecvActivation { from, .. } => {
                        received.push((false, micro, from, s, part - 1))
                    }
                    Action::RecvGrad { from, .. } => {
                        received.push((true, micro, from, s, part + 1))
                    }
                    _ => unreachable!(),
                }
            }
        }
        // One activation per micro-batch and boundary between parts on different stages, and
        // one gradient back across it.
        let boundaries = if p == 1 { 0 } else { p * v - 1 };
        assert_eq!(sent.len() as u32, 2 * m * boundaries, "{what}");
        sent.sort_unstable();
        received.sort_unstable();
        assert_eq!(sent, received, "{what}");
        sent.dedup();
        assert_eq!(
            sent.len() as u32,
            2 * m * boundaries,
            "{what}: a tensor sent twice"
        );
    }
}

/// The span of each compute pass in a simulated step, by (kind, micro-batch, model part):
/// kind 0 forward, 1 input gradient (B, or a full backward), 2 weight gradient (W, or a full
/// backward).
fn pass_spans(plan: &[Vec<Action>], report: &Report) -> HashMap<(u8, u32, u32), (u32, sim::Span)> {
    let p = plan.len() as u32;
    let mut out = HashMap::new();
    for (s, actions) in plan.iter().enumerate() {
        for (a, span) in actions.iter().zip(&report.spans[s]) {
            let kinds: &[u8] = match a {
                Action::Forward { .. } => &[0],
                Action::Backward { .. } => &[1, 2],
                Action::BackwardInput { .. } => &[1],
                Action::BackwardWeight { .. } => &[2],
                _ => &[],
            };
            for &kind in kinds {
                let (micro, chunk) = a.micro_chunk().unwrap();
                out.insert((kind, micro, chunk * p + s as u32), (s as u32, *span));
            }
        }
    }
    out
}

#[test]
fn every_plan_runs_without_deadlock_and_respects_dependencies_across_stages() {
    for (schedule, p, m, v) in grid() {
        let plan = plan(schedule, p, m, v).unwrap();
        let parts = p * v;
        for costs in cost_models() {
            let what = format!("{schedule:?} p={p} m={m} v={v} {costs:?}");
            let report = simulate(&plan, v, &costs, SendMode::Buffered)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let spans = pass_spans(&plan, &report);
            // A tensor that crosses stages arrives `latency` after the pass that made it.
            let after = |(from_stage, from): (u32, sim::Span), (to_stage, to): (u32, sim::Span)| {
                let delay = if from_stage == to_stage {
                    0
                } else {
                    costs.latency
                };
                to.start >= from.end + delay
            };
            for micro in 0..m {
                for part in 0..parts {
                    let f = spans[&(0, micro, part)];
                    let b = spans[&(1, micro, part)];
                    let w = spans[&(2, micro, part)];
                    if part > 0 {
                        let before = spans[&(0, micro, part - 1)];
                        assert!(after(before, f), "{what}: F of {micro} on part {part}");
                    }
                    let grad = if part + 1 < parts {
                        spans[&(1, micro, part + 1)]
                    } else {
                        f
                    };
                    assert!(after(grad, b), "{what}: B of {micro} on part {part}");
                    assert!(
                        w.1.start >= b.1.start,
                        "{what}: W of {micro} on part {part}"
                    );
                }
            }
            // The gradient sync waits for every weight gradient of its stage.
            for (s, actions) in plan.iter().enumerate() {
                let sync = actions.iter().position(|a| *a == Action::GradSync).unwrap();
                let last = spans
                    .values()
                    .filter(|(stage, _)| *stage == s as u32)
                    .map(|(_, span)| span.end)
                    .max()
                    .unwrap();
                assert!(
                    report.spans[s][sync].start >= last,
                    "{what}: stage {s} syncs early"
                );
            }
            // Busy time is the stage's compute, whatever the schedule.
            let compute = u64::from(m * v)
                * (costs.forward + costs.backward_input + costs.backward_weight)
                + costs.grad_sync
                + costs.optimizer_step;
            assert!(
                report.busy.iter().all(|&b| b == compute),
                "{what}: {:?}",
                report.busy
            );
            assert!(report.makespan >= compute, "{what}");
        }
    }
}

/// `a/b == c/d` exactly.
fn ratio_eq(a: u64, b: u64, c: u64, d: u64) -> bool {
    a * d == c * b
}

#[test]
fn gpipe_and_1f1b_idle_for_p_minus_1_over_m_plus_p_minus_1_of_the_step() {
    for schedule in [GPipe, OneFOneB] {
        for p in 1..=6u64 {
            for m in 1..=12u64 {
                let (_, r) = unit(schedule, p as u32, m as u32, 1);
                let what = format!("{schedule:?} p={p} m={m}");
                assert_eq!(r.makespan, 3 * (m + p - 1), "{what}");
                // Share of the step: sum(idle) / (p * makespan).
                assert!(
                    ratio_eq(r.total_idle(), p * r.makespan, p - 1, m + p - 1),
                    "{what}: {}",
                    r.bubble_share()
                );
                // Relative to the ideal step: (p-1)/m.
                assert!(
                    ratio_eq(r.makespan - r.ideal(), r.ideal(), p - 1, m),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn gpipe_and_1f1b_take_m_plus_p_minus_1_slots_with_uneven_costs_too() {
    let costs = Costs {
        forward: 2,
        backward_input: 3,
        backward_weight: 2,
        ..Costs::default()
    };
    for schedule in [GPipe, OneFOneB] {
        for p in 1..=6u32 {
            for m in 1..=12u32 {
                let plan = plan(schedule, p, m, 1).unwrap();
                let r = simulate(&plan, 1, &costs, SendMode::Buffered).unwrap();
                assert_eq!(
                    r.makespan,
                    u64::from(m + p - 1) * 7,
                    "{schedule:?} p={p} m={m}"
                );
            }
        }
    }
}

#[test]
fn interleaving_v_chunks_divides_the_bubble_by_v() {
    for p in 1..=6u64 {
        for m in (p..=12).step_by(p as usize) {
            let (_, one) = unit(OneFOneB, p as u32, m as u32, 1);
            for v in 2..=3u64 {
                let (_, r) = unit(Interleaved, p as u32, m as u32, v as u32);
                let what = format!("p={p} m={m} v={v}");
                // Relative to the ideal step: (p-1)/(v m), 1F1B's (p-1)/m divided by v.
                assert!(
                    ratio_eq(r.makespan - r.ideal(), r.ideal(), p - 1, v * m),
                    "{what}"
                );
                assert!(
                    ratio_eq(
                        (r.makespan - r.ideal()) * v,
                        r.ideal(),
                        one.makespan - one.ideal(),
                        one.ideal()
                    ),
                    "{what}"
                );
                // Share of the step: (p-1)/(v m + p - 1).
                assert!(
                    ratio_eq(r.total_idle(), p * r.makespan, p - 1, v * m + p - 1),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn zb_h1_bubble_is_at_most_p_minus_1_over_3m_of_the_ideal_step() {
    for p in 1..=6u64 {
        for m in 1..=12u64 {
            let (_, zb) = unit(ZeroBubble, p as u32, m as u32, 1);
            let (_, one) = unit(OneFOneB, p as u32, m as u32, 1);
            let what = format!("p={p} m={m}");
            assert_eq!(zb.ideal(), 3 * m, "{what}");
            assert!(zb.makespan <= one.makespan, "{what}: slower than 1F1B");
            if m >= p {
                // (makespan - ideal) / ideal <= (p-1) / (3m); with F = B = W it is equal.
                assert!(
                    ratio_eq(zb.makespan - zb.ideal(), zb.ideal(), p - 1, 3 * m),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn activations_alive_at_once_gpipe_m_1f1b_and_zb_h1_at_most_p() {
    for (schedule, p, m, v) in grid() {
        let (_, r) = unit(schedule, p, m, v);
        let what = format!("{schedule:?} p={p} m={m} v={v}: {:?}", r.peak_activations);
        match schedule {
            GPipe => assert!(r.peak_activations.iter().all(|&a| a == m), "{what}"),
            OneFOneB => {
                for (s, &a) in r.peak_activations.iter().enumerate() {
                    assert_eq!(a, (p - s as u32).min(m), "{what}");
                }
            }
            // Stage s holds 1F1B's p - s plus the s whose W it delays: p on every stage.
            ZeroBubble => {
                assert_eq!(r.peak_activations[0], p.min(m), "{what}");
                assert!(r.peak_activations.iter().all(|&a| a <= p), "{what}");
                if m >= p {
                    assert!(r.peak_activations.iter().all(|&a| a == p), "{what}");
                }
            }
            // Megatron's warm-up forwards plus the one in flight, in chunk units.
            Interleaved => {
                for (s, &a) in r.peak_activations.iter().enumerate() {
                    let warmup = 2 * (p - 1 - s as u32) + (v - 1) * p;
                    assert_eq!(a, (warmup + 1).min(m * v), "{what}");
                }
            }
        }
    }
}

/// The example of the notes and the issue, p = 4 and m = 8, with unit costs F = B = W = 1.
#[test]
fn four_stages_eight_micro_batches() {
    let percent = |x: f64| (x * 1000.0).round() / 10.0;

    for schedule in [GPipe, OneFOneB] {
        let (_, r) = unit(schedule, 4, 8, 1);
        assert_eq!((r.makespan, r.ideal()), (33, 24));
        assert_eq!(percent(r.bubble_share()), 27.3); // (p-1)/(m+p-1) of the step
        assert_eq!(r.bubble_vs_ideal(), 0.375); // (p-1)/m of the ideal
    }
    // Costs are per chunk pass: 57 units of half a stage pass = 28.5 stage-pass units.
    let (_, r) = unit(Interleaved, 4, 8, 2);
    assert_eq!((r.makespan, r.ideal()), (57, 48));
    assert_eq!(r.bubble_vs_ideal(), 0.1875); // (p-1)/(v m): 37.5% / 2
    assert_eq!(percent(r.bubble_share()), 15.8); // (p-1)/(v m + p - 1) of the step
    let (_, r) = unit(ZeroBubble, 4, 8, 1);
    assert_eq!((r.makespan, r.ideal()), (27, 24));
    assert_eq!(r.bubble_vs_ideal(), 0.125); // (p-1)/(3m) of the ideal
    assert_eq!(percent(r.bubble_share()), 11.1);

    let peak0 = |s, v| unit(s, 4, 8, v).1.peak_activations[0];
    assert_eq!(
        [
            peak0(GPipe, 1),
            peak0(OneFOneB, 1),
            peak0(Interleaved, 2),
            peak0(ZeroBubble, 1)
        ],
        [8, 4, 11, 4]
    );
}

/// The timelines, pass by pass. ZB-H1 is the zero-bubble paper's figure: each stage's first
/// `s` weight gradients fill the end of the step.
#[test]
fn the_timelines_of_1f1b_and_zb_h1() {
    let (plan, r) = unit(OneFOneB, 4, 8, 1);
    let want = "\
F0 F1 F2 F3 .  .  .  .  .  .  B0 B0 F4 B1 B1 F5 B2 B2 F6 B3 B3 F7 B4 B4 .  B5 B5 .  B6 B6 .  B7 B7
.  F0 F1 F2 .  .  .  .  B0 B0 F3 B1 B1 F4 B2 B2 F5 B3 B3 F6 B4 B4 F7 B5 B5 .  B6 B6 .  B7 B7 .  .
.  .  F0 F1 .  .  B0 B0 F2 B1 B1 F3 B2 B2 F4 B3 B3 F5 B4 B4 F6 B5 B5 F7 B6 B6 .  B7 B7 .  .  .  .
.  .  .  F0 B0 B0 F1 B1 B1 F2 B2 B2 F3 B3 B3 F4 B4 B4 F5 B5 B5 F6 B6 B6 F7 B7 B7 .  .  .  .  .  .
";
    assert_eq!(chart(&plan, &r), want, "\n{}", chart(&plan, &r));

    let (plan, r) = unit(ZeroBubble, 4, 8, 1);
    let want = "\
F0 F1 F2 F3 .  .  .  B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7
.  F0 F1 F2 .  .  B0 F3 B1 W1 F4 B2 W2 F5 B3 W3 F6 B4 W4 F7 B5 W5 B6 W6 B7 W7 W0
.  .  F0 F1 .  B0 F2 B1 F3 B2 W2 F4 B3 W3 F5 B4 W4 F6 B5 W5 F7 B6 W6 B7 W7 W0 W1
.  .  .  F0 B0 F1 B1 F2 B2 F3 B3 W3 F4 B4 W4 F5 B5 W5 F6 B6 W6 F7 B7 W7 W0 W1 W2
";
    assert_eq!(chart(&plan, &r), want, "\n{}", chart(&plan, &r));
}

fn f(micro: u32) -> Action {
    Action::Forward { micro, chunk: 0 }
}
fn b(micro: u32) -> Action {
    Action::Backward { micro, chunk: 0 }
}
fn send_act(to: u32, micro: u32) -> Action {
    Action::SendActivation {
        to,
        micro,
        chunk: 0,
    }
}
fn recv_act(from: u32, micro: u32) -> Action {
    Action::RecvActivation {
        from,
        micro,
        chunk: 0,
    }
}
fn send_grad(to: u32, micro: u32) -> Action {
    Action::SendGrad {
        to,
        micro,
        chunk: 0,
    }
}
fn recv_grad(from: u32, micro: u32) -> Action {
    Action::RecvGrad {
        from,
        micro,
        chunk: 0,
    }
}

fn run(plan: &[Vec<Action>]) -> Result<Report, SimError> {
    simulate(plan, 1, &Costs::default(), SendMode::Buffered)
}

#[test]
fn a_two_stage_step_by_hand() {
    let plan = vec![
        vec![f(0), send_act(1, 0), recv_grad(1, 0), b(0)],
        vec![recv_act(0, 0), f(0), b(0), send_grad(0, 0)],
    ];
    let r = simulate(
        &plan,
        1,
        &Costs {
            latency: 2,
            ..Costs::default()
        },
        SendMode::Buffered,
    )
    .unwrap();
    // F on stage 0 [0,1], arrives at 3, F on stage 1 [3,4], B+W [4,6], arrives at 8, B+W [8,10].
    assert_eq!(r.makespan, 10);
    assert_eq!(r.spans[1][0], sim::Span { start: 0, end: 3 });
    assert_eq!(r.spans[0][2], sim::Span { start: 1, end: 8 });
    assert_eq!((r.busy.clone(), r.total_idle()), (vec![3, 3], 14));
    assert_eq!(r.peak_activations, vec![1, 1]);
}

#[test]
fn stages_that_wait_for_each_other_are_a_deadlock_naming_both() {
    // Stage 0 waits for the gradient before it sends the activation that stage 1 waits for.
    let plan = vec![
        vec![f(0), recv_grad(1, 0), send_act(1, 0), b(0)],
        vec![recv_act(0, 0), f(0), b(0), send_grad(0, 0)],
    ];
    let err = run(&plan).unwrap_err();
    let SimError::Deadlock { blocked } = &err else {
        panic!("{err}")
    };
    let at: Vec<(u32, usize, Action)> = blocked
        .iter()
        .map(|b| (b.stage, b.index, b.action))
        .collect();
    assert_eq!(at, [(0, 1, recv_grad(1, 0)), (1, 0, recv_act(0, 0))]);
    let shown = err.to_string();
    assert!(
        shown.contains(
            "stage 0 waits since t=1 at action 1 (receive gradient(micro 0, chunk 0) from stage 1)"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("stage 1 waits since t=0 at action 0"),
        "{shown}"
    );
}

#[test]
fn a_receive_nobody_sends_is_a_deadlock_and_a_send_nobody_receives_is_unmatched() {
    // Stage 0 never sends micro-batch 1's activation.
    let plan = vec![
        vec![f(0), send_act(1, 0), f(1)],
        vec![recv_act(0, 0), f(0), recv_act(0, 1), f(1)],
    ];
    let err = run(&plan).unwrap_err();
    assert!(
        matches!(&err, SimError::Deadlock { blocked } if blocked.len() == 1 && blocked[0].stage == 1 && blocked[0].index == 2),
        "{err}"
    );
    // Stage 1 never receives micro-batch 1's activation.
    let plan = vec![
        vec![f(0), send_act(1, 0), f(1), send_act(1, 1)],
        vec![recv_act(0, 0), f(0)],
    ];
    assert_eq!(
        run(&plan).unwrap_err(),
        SimError::UnmatchedSend {
            stage: 0,
            index: 3,
            action: send_act(1, 1)
        }
    );
}

#[test]
fn passes_without_their_inputs_are_refused() {
    let err = |plan: Vec<Vec<Action>>| run(&plan).unwrap_err();
    // A forward before the receive of its activation.
    let e = err(vec![vec![f(0), send_act(1, 0)], vec![f(0), recv_act(0, 0)]]);
    assert!(
        matches!(
            e,
            SimError::MissingInput {
                stage: 1,
                index: 0,
                ..
            }
        ),
        "{e}"
    );
    // A backward before its forward.
    let e = err(vec![vec![b(0), f(0)]]);
    assert!(
        matches!(
            e,
            SimError::MissingInput {
                stage: 0,
                index: 0,
                ..
            }
        ),
        "{e}"
    );
    // A W before its B.
    let w = Action::BackwardWeight { micro: 0, chunk: 0 };
    let e = err(vec![vec![f(0), w]]);
    assert!(
        matches!(
            e,
            SimError::MissingInput {
                stage: 0,
                index: 1,
                ..
            }
        ),
        "{e}"
    );
    // A backward on stage 0 of two before the gradient arrives.
    let e = err(vec![
        vec![f(0), send_act(1, 0), b(0)],
        vec![recv_act(0, 0), f(0), b(0)],
    ]);
    assert!(
        matches!(
            e,
            SimError::MissingInput {
                stage: 0,
                index: 2,
                ..
            }
        ),
        "{e}"
    );
    // The same forward twice.
    let e = err(vec![vec![f(0), f(0)]]);
    assert!(
        matches!(
            e,
            SimError::Repeated {
                stage: 0,
                index: 1,
                ..
            }
        ),
        "{e}"
    );
    // A send to a stage that does not hold the next part, a chunk that does not exist.
    let e = err(vec![vec![f(0), send_act(2, 0)], vec![], vec![]]);
    assert!(
        matches!(
            e,
            SimError::Invalid {
                stage: 0,
                index: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = err(vec![vec![Action::Forward { micro: 0, chunk: 1 }]]);
    assert!(
        matches!(
            e,
            SimError::Invalid {
                stage: 0,
                index: 0,
                ..
            }
        ),
        "{e}"
    );
}

/// With sends that wait for their receive, 1F1B's steady state deadlocks: stage s sends an
/// activation to s+1 while s+1 sends a gradient to s. The plans are for buffered
/// (asynchronous) sends; a transport with synchronous sends has to post the send and the
/// receive that follows it together.
#[test]
fn plans_need_buffered_sends() {
    for schedule in [OneFOneB, ZeroBubble] {
        let plan = plan(schedule, 4, 8, 1).unwrap();
        let err = simulate(&plan, 1, &Costs::default(), SendMode::Rendezvous).unwrap_err();
        assert!(
            matches!(err, SimError::Deadlock { .. }),
            "{schedule:?}: {err}"
        );
    }
    // GPipe's stages never send both ways at once.
    for p in 1..=6 {
        for m in 1..=12 {
            let plan = plan(GPipe, p, m, 1).unwrap();
            let r = simulate(&plan, 1, &Costs::default(), SendMode::Rendezvous).unwrap();
            assert_eq!(r.makespan, u64::from(3 * (m + p - 1)));
        }
    }
}

/// An untagged transport (NCCL send/recv, one socket per peer) pairs the k-th receive from a
/// peer with the k-th send to it: every plan receives on each channel in the order it sends.
#[test]
fn every_channel_receives_in_the_order_it_sends() {
    for (schedule, p, m, v) in grid() {
        let plan = plan(schedule, p, m, v).unwrap();
        // Per (sender, receiver): the tensors (gradient?, micro-batch, part that made it).
        type Channels = HashMap<(u32, u32), Vec<(bool, u32, u32)>>;
        let (mut sent, mut received) = (Channels::new(), Channels::new());
        for (s, actions) in plan.iter().enumerate() {
            let s = s as u32;
            for a in actions {
                let Some((micro, chunk)) = a.micro_chunk() else {
                    continue;
                };
                let part = chunk * p + s;
                let (map, channel, tensor) = match *a {
                    Action::SendActivation { to, .. } => (&mut sent, (s, to), (false, micro, part)),
                    Action::SendGrad { to, .. } => (&mut sent, (s, to), (true, micro, part)),
                    Action::RecvActivation { from, .. } => {
                        (&mut received, (from, s), (false, micro, part - 1))
                    }
                    Action::RecvGrad { from, .. } => {
                        (&mut received, (from, s), (true, micro, part + 1))
                    }
                    _ => continue,
                };
                map.entry(channel).or_default().push(tensor);
            }
        }
        assert_eq!(sent, received, "{schedule:?} p={p} m={m} v={v}");
    }
}

/// With one NCCL communicator per channel (the NCCL transport's rule), every plan completes
/// under synchronous sends.
#[test]
fn every_plan_completes_with_synchronous_sends_and_a_communicator_per_channel() {
    use super::channels::{channel, check};
    for (schedule, p, m, v) in grid() {
        let plan = plan(schedule, p, m, v).unwrap();
        check(&plan, |s, a| channel(s, a).expect("a send or receive"))
            .unwrap_or_else(|e| panic!("{schedule:?} p={p} m={m} v={v}: {e}"));
    }
}

/// With one communicator for the whole pipeline, the same check finds 1F1B's and ZB-H1's
/// deadlock (and GPipe, which never sends both ways at once, completes).
#[test]
fn synchronous_sends_on_one_communicator_deadlock() {
    use super::channels::check;
    for schedule in [OneFOneB, ZeroBubble] {
        let plan = plan(schedule, 4, 8, 1).unwrap();
        let e = check(&plan, |_, _| (0, 0)).unwrap_err();
        assert!(e.starts_with("deadlock"), "{schedule:?}: {e}");
    }
    for (p, m) in [(2, 4), (4, 8), (6, 12)] {
        check(&plan(GPipe, p, m, 1).unwrap(), |_, _| (0, 0)).unwrap();
    }
}

/// A plan whose stages receive what nobody sends is refused, naming the channel.
#[test]
fn the_synchronous_check_refuses_unmatched_messages() {
    use super::channels::{channel, check};
    let plan = vec![
        vec![f(0), Action::GradSync],
        vec![recv_act(0, 0), Action::GradSync],
    ];
    let e = check(&plan, |s, a| channel(s, a).unwrap()).unwrap_err();
    assert!(e.contains("stage 1 receives 1 tensors from stage 0"), "{e}");
}

/// Sends and receives on a channel that pair different tensors (the receiver takes them in
/// another order) are refused, naming both.
#[test]
fn the_synchronous_check_refuses_a_channel_received_out_of_order() {
    use super::channels::{channel, check};
    let plan = vec![
        vec![f(0), send_act(1, 0), f(1), send_act(1, 1), Action::GradSync],
        vec![recv_act(0, 1), recv_act(0, 0), f(0), f(1), Action::GradSync],
    ];
    let e = check(&plan, |s, a| channel(s, a).unwrap()).unwrap_err();
    assert!(e.contains("another tensor"), "{e}");
}
