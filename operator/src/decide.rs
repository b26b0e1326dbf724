//! The pure middle of reconcile: from a job and the observed pods of its gang, decide the status
//! to report, the writes to make and the Events to record. Level-triggered: the same inputs give
//! the same decision, so a crash between two writes is mended by the next pass.
//!
//! Nothing here talks to the API server or to gang admission. A pass that needs admission's
//! answer (the `Builtin` policy, an attempt about to start without one) stops and says so
//! ([`Decided::AwaitsAdmission`]); reconcile asks the admission queue and resumes the pass with
//! the [`Outcome`].
//!
//! The life of an attempt: create every missing rank (Starting) -> all Running (Running) -> a
//! rank fails: record the FIRST failure of the attempt, match the failure rules; RestartGang
//! deletes the whole attempt (Restarting), waits until every old pod is gone and the backoff has
//! passed, then starts the next attempt; FailJob or exhausted restarts fail the job; every rank
//! Succeeded (or rank 0, per successPolicy) succeeds it.
//!
//! A requested restart (the `lockstep.dev/restarted-at` annotation set to a value other than
//! `status.restartedAt`) deletes the gang of a running or starting attempt and starts the next one
//! the same way, without a failure, a backoff or a count against `maxRestarts`. When there is no
//! gang to restart (the job is new, queued, suspended or restarting already) the request is
//! recorded as answered, since the next start resumes from the last checkpoint anyway; a finished
//! job ignores it with a Warning Event.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use lockstep_api::contract::{ExitCode, aborted, annotations};
use lockstep_api::spec::{CleanPodPolicy, FailureAction, FailureReason, GangPolicy, SuccessPolicy};
use lockstep_api::status::{
    Admission, Phase, RankFailure, WorkerCounts, condition_types as ct, reasons,
};
use lockstep_api::{ParallelJob, ParallelJobStatus};

use crate::gang::Outcome;
use crate::job;
use crate::kueue::{PodSetUpdate, StatusUpdate, WorkloadView};
use crate::observe::{Failure, PodState, RankPod};
use crate::resources::GPU_RESOURCE;

/// A write reconcile makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply the job's objects besides its pods (headless Service, config ConfigMap, worker
    /// ServiceAccount, progress Role, RoleBinding and ConfigMap, token Secret, NetworkPolicy)
    /// for the gang attempt `attempt`: once per attempt, and again only when they change.
    EnsureSharedObjects {
        /// The gang attempt the objects are made for.
        attempt: i32,
    },
    /// Apply the objects an external gang scheduler reads (PodGroup, Workload).
    EnsureGangObjects,
    /// Create the pods of these ranks for this attempt.
    CreatePods {
        /// Gang attempt.
        attempt: i32,
        /// Ranks to create.
        ranks: Vec<u32>,
        /// The planned node of each of those ranks (Builtin admission): the pods are created
        /// gated and pinned there.
        nodes: Option<Vec<String>>,
        /// What Kueue's admission puts on the pods (the flavors' node labels and tolerations).
        update: Option<PodSetUpdate>,
    },
    /// Remove the gang scheduling gate from these pods: the whole admitted gang exists.
    Ungate(Vec<String>),
    /// Delete these pods.
    DeletePods(Vec<String>),
    /// Delete the job itself (TTL after finished).
    DeleteJob,
    /// Delete the job's Kueue Workload (written for an older spec; the next pass writes it
    /// again).
    DeleteWorkload,
    /// Write the job's Kueue Workload's status, as Kueue's job framework does.
    WorkloadStatus(StatusUpdate),
    /// Make the job's Kueue Workload active (the job resumed) or inactive (it is suspended).
    SetWorkloadActive(bool),
}

/// An Event to record on the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// What reconcile should do.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to report.
    pub status: ParallelJobStatus,
    /// Writes, in order.
    pub actions: Vec<Action>,
    /// Events for transitions.
    pub events: Vec<Note>,
    /// Look again after this long even if nothing changes (backoff, deadline, TTL).
    pub requeue_after: Option<Duration>,
}

impl Decision {
    /// The status to write before the actions are made, over the job's `current` status:
    /// [`Decision::status`] with the pods that its [`Action::CreatePods`] of the current attempt
    /// make counted as active already, when the status is written for another change anyway
    /// (the gang's admission, say). The status is written first (so that nothing it records is
    /// lost to a crash between the writes), and without this the pods' arrival in the cache
    /// would change the counts alone and cost each starting gang a second status write a few
    /// seconds later. A pass that would change only the counts writes what exists: after a
    /// failed creation the next pass so writes the true counts, and a pass whose creations are
    /// refused writes them with the refusal (see `reconcile`).
    pub fn status_to_write(
        &self,
        current: Option<&ParallelJobStatus>,
    ) -> std::borrow::Cow<'_, ParallelJobStatus> {
        let attempt = self.status.attempt;
        let created: usize = self
            .actions
            .iter()
            .map(|a| match a {
                Action::CreatePods {
                    attempt: a, ranks, ..
                } if *a == attempt => ranks.len(),
                _ => 0,
            })
            .sum();
        // Compared (a copy of the status) only when the pass creates pods.
        let written_anyway = || current.is_none_or(|c| !same_but_counts(c, &self.status));
        match &self.status.workers {
            Some(w) if created > 0 && written_anyway() => {
                let mut status = self.status.clone();
                status.workers = Some(WorkerCounts {
                    active: w.active + i32::try_from(created).unwrap_or(i32::MAX),
                    ..w.clone()
                });
                std::borrow::Cow::Owned(status)
            }
            _ => std::borrow::Cow::Borrowed(&self.status),
        }
    }
}

/// Whether `new` is `old` but for the worker counts (`ready`, `workers`), which may differ.
pub fn same_but_counts(old: &ParallelJobStatus, new: &ParallelJobStatus) -> bool {
    let mut with_new_counts = old.clone();
    with_new_counts.ready.clone_from(&new.ready);
    with_new_counts.workers.clone_from(&new.workers);
    with_new_counts == *new
}

/// Where [`decide`] got to: a decision, or a pass that waits for gang admission's answer.
pub enum Decided<'a> {
    /// The decision of the pass.
    Done(Decision),
    /// The current attempt is about to start and has no admission yet (the `Builtin` policy,
    /// no pod of it exists): ask the admission queue, and [`AwaitsAdmission::resume`] the pass
    /// with its answer.
    AwaitsAdmission(AwaitsAdmission<'a>),
}

impl Decided<'_> {
    /// The decision, asking `admit` for gang admission's answer if, and only if, the pass waits
    /// for it.
    pub fn answer_with(self, admit: impl FnOnce() -> Outcome) -> Decision {
        match self {
            Decided::Done(d) => d,
            Decided::AwaitsAdmission(pass) => pass.resume(admit()),
        }
    }
}

/// A pass of [`decide`] stopped where the current attempt needs gang admission's answer.
pub struct AwaitsAdmission<'a>(Pass<'a>);

impl AwaitsAdmission<'_> {
    /// Finishes the pass with admission's answer: an admitted gang is made on its planned
    /// nodes; a waiting one is Queued.
    pub fn resume(self, outcome: Outcome) -> Decision {
        let mut pass = self.0;
        match outcome {
            Outcome::Admitted(nodes) => {
                pass.admitted(&nodes);
                // Admission is asked only while no pod of the attempt exists.
                pass.make_gang(&[], Some(nodes));
            }
            Outcome::Waiting {
                reason,
                message,
                position,
            } => pass.queued(reason, message, position),
        }
        pass.d
    }
}

/// The state of one reconcile pass of one job: its inputs, and the decision so far.
struct Pass<'a> {
    job: &'a ParallelJob,
    now: Timestamp,
    world: u32,
    /// The job's Kueue Workload, when the job is Kueue's and the Workload exists.
    workload: Option<&'a WorkloadView>,
    d: Decision,
}

/// The first failure of an attempt, as `Pass::first_failure` finds it.
enum First<'p> {
    /// No rank failed.
    None,
    /// This rank failed first (its pod, when it still has one).
    Found(u32, Option<&'p RankPod>, Failure),
    /// A survivor names the rank that failed first, whose pod does not show it yet: decide
    /// again after this.
    Awaited(Duration),
}

/// How long after a survivor's PeerFailed the decision waits for the pod of the rank it names
/// to show that rank's own failure (the kubelet reports the pods of a gang one by one).
pub const FIRST_FAILURE_WAIT: Duration = Duration::from_secs(3);

/// Whether a pass goes on, or stops for gang admission.
#[must_use]
enum Step {
    Done,
    AwaitsAdmission,
}

/// Decides one reconcile pass of `job` given the observed pods of its gang (all attempts).
pub fn decide<'a>(
    job: &'a ParallelJob,
    world: u32,
    pods: &[RankPod],
    now: Timestamp,
) -> Decided<'a> {
    decide_with(job, world, pods, None, now)
}

/// [`decide`] for a job under the Kueue policy, given its Workload as read (`None`: there is
/// none).
pub fn decide_with<'a>(
    job: &'a ParallelJob,
    world: u32,
    pods: &[RankPod],
    workload: Option<&'a WorkloadView>,
    now: Timestamp,
) -> Decided<'a> {
    let mut status = job.status.clone().unwrap_or_default();
    status.observed_generation = job.metadata.generation;
    // A rejection reported for an older generation of the spec no longer holds.
    status.conditions.retain(|c| {
        !(c.type_ == ct::VALID
            && c.status == "False"
            && c.observed_generation != job.metadata.generation)
    });
    let mut pass = Pass {
        job,
        now,
        world,
        workload,
        d: Decision {
            status,
            actions: Vec::new(),
            events: Vec::new(),
            requeue_after: None,
        },
    };
    match pass.run(pods) {
        Step::Done => Decided::Done(pass.d),
        Step::AwaitsAdmission => Decided::AwaitsAdmission(AwaitsAdmission(pass)),
    }
}

/// Sets the condition `Valid=False` with `reason` and `message` in place of any other `Valid`
/// condition; returns false (and changes nothing) when exactly that one is already there.
pub fn set_invalid(
    conds: &mut Vec<Condition>,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let already = conds.iter().any(|c| {
        c.type_ == ct::VALID && c.status == "False" && c.reason == reason && c.message == message
    });
    if already {
        return false;
    }
    conds.retain(|c| c.type_ != ct::VALID);
    conds.push(Condition {
        type_: ct::VALID.into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(now),
        observed_generation: generation,
    });
    true
}

/// Says in `Admitted=False` (reason `GangApiMissing`, phase Queued) that the API of the external
/// gang scheduler is not served; returns false (and changes nothing) when exactly that is said
/// already. A pass keeps the job so until its pods exist (see `make_gang`).
pub fn set_gang_api_missing(
    status: &mut ParallelJobStatus,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let already = status.conditions.iter().any(|c| {
        c.type_ == ct::ADMITTED && c.reason == reasons::GANG_API_MISSING && c.message == message
    });
    if already {
        return false;
    }
    status.conditions.retain(|c| c.type_ != ct::ADMITTED);
    status.conditions.push(Condition {
        type_: ct::ADMITTED.into(),
        status: "False".into(),
        reason: reasons::GANG_API_MISSING.into(),
        message: message.into(),
        last_transition_time: Time(now),
        observed_generation: generation,
    });
    status.phase = Some(Phase::Queued);
    true
}

/// Says in `Admitted=False` (phase Queued) that the gang cannot be made now, with `reason` and
/// `message`: `QuotaExceeded` when the namespace's ResourceQuota refused part of it (the message
/// names the quota and what was asked), `ObjectConflict` when objects with names it needs are
/// not the job's own (the message names them). Gives back the admission: the next try is
/// admitted anew, and meanwhile the job holds no capacity. The condition keeps the time of a
/// wait for admission already under way in the `previous` status (the job's before this pass).
/// Returns whether this is news, that is whether `previous` did not say exactly this already
/// (then an Event says it).
pub fn wait_unadmitted(
    status: &mut ParallelJobStatus,
    previous: Option<&ParallelJobStatus>,
    reason: &'static str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let before = previous.and_then(|s| s.conditions.iter().find(|c| c.type_ == ct::ADMITTED));
    let since = before
        .filter(|c| c.status == "False")
        .map_or(Time(now), |c| c.last_transition_time.clone());
    let news =
        !before.is_some_and(|c| c.status == "False" && c.reason == reason && c.message == message);
    status.conditions.retain(|c| c.type_ != ct::ADMITTED);
    status.conditions.push(Condition {
        type_: ct::ADMITTED.into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    });
    status.phase = Some(Phase::Queued);
    status.admission = None;
    news
}

/// Whether an action makes or releases part of the gang (what a quota wait holds back).
fn makes_gang(action: &Action) -> bool {
    matches!(
        action,
        Action::EnsureSharedObjects { .. }
            | Action::EnsureGangObjects
            | Action::CreatePods { .. }
            | Action::Ungate(_)
    )
}

/// The decision of a pass made while the gang is held back (see [`wait_unadmitted`]: the
/// namespace's ResourceQuota refused part of it, or objects with names it needs are not the
/// job's) and the next try is `retry_in` away. A pass that would make the gang (ask admission,
/// create, release) makes nothing instead: it keeps the wait with `reason` and `message`,
/// deletes any pod of the current attempt that is left (a partly made gang never stays), and
/// looks again when the wait is over. Any other pass (the job finishes, is suspended, an older
/// attempt's pods go) is decided as ever.
pub fn hold_gang(
    decided: Decided<'_>,
    job: &ParallelJob,
    pods: &[RankPod],
    reason: &'static str,
    message: &str,
    retry_in: Duration,
    now: Timestamp,
) -> Decision {
    let (mut d, asks_admission) = match decided {
        Decided::Done(d) => (d, false),
        Decided::AwaitsAdmission(pass) => (pass.0.d, true),
    };
    if !asks_admission && !d.actions.iter().any(makes_gang) {
        return d;
    }
    d.actions.retain(|a| !makes_gang(a));
    let deleting: Vec<&String> = d
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeletePods(names) => Some(names),
            _ => None,
        })
        .flatten()
        .collect();
    let left: Vec<String> = pods
        .iter()
        .filter(|p| p.attempt == d.status.attempt && !p.terminating)
        .filter(|p| !deleting.contains(&&p.name))
        .map(|p| p.name.clone())
        .collect();
    if !left.is_empty() {
        d.actions.push(Action::DeletePods(left));
    }
    // Nothing was started: the start time stays what it was.
    d.status.start_time = job.status.as_ref().and_then(|s| s.start_time.clone());
    let previous = job.status.as_ref();
    if wait_unadmitted(
        &mut d.status,
        previous,
        reason,
        message,
        job.metadata.generation,
        now,
    ) {
        d.events.push(Note {
            warning: true,
            reason,
            message: message.to_string(),
        });
    }
    let after = retry_in.max(Duration::from_millis(100));
    d.requeue_after = Some(d.requeue_after.map_or(after, |r| r.min(after)));
    d
}

/// Says, in the `Valid` condition, when no node of the cluster offers the GPUs one worker asks
/// for (`largest` is the most any schedulable node has), and clears that once one does. The job
/// waits (Builtin admission queues it and makes no pod; under an external gang scheduler the pods
/// are created and stay Pending, so a cluster autoscaler can add nodes for them), and the
/// condition and a Warning Event say why instead of a silent Pending.
pub fn check_capacity(d: &mut Decision, job: &ParallelJob, largest: i64, now: Timestamp) {
    let wanted = i64::from(job.spec.parallelism.gpus_per_worker);
    let finished = matches!(d.status.phase, Some(Phase::Succeeded | Phase::Failed));
    let short = wanted > largest && !finished;
    let conds = &mut d.status.conditions;
    let current = conds
        .iter()
        .position(|c| c.type_ == ct::VALID && c.reason == reasons::INVALID_SPEC);
    match (short, current) {
        (true, _) => {
            let message = if largest == 0 {
                format!(
                    "spec.parallelism.gpusPerWorker asks for {wanted} {GPU_RESOURCE} per worker, \
                     but no node of this cluster offers {GPU_RESOURCE}; the pods stay Pending \
                     until such nodes join"
                )
            } else {
                format!(
                    "spec.parallelism.gpusPerWorker asks for {wanted} {GPU_RESOURCE} per worker, \
                     but the largest node of this cluster offers {largest}; lower \
                     gpusPerWorker (and raise dataParallel) or add larger nodes"
                )
            };
            if set_invalid(
                conds,
                reasons::INVALID_SPEC,
                &message,
                job.metadata.generation,
                now,
            ) {
                d.events.push(Note {
                    warning: true,
                    reason: reasons::INVALID_SPEC,
                    message,
                });
            }
        }
        (false, Some(i)) => {
            conds.remove(i);
        }
        (false, None) => {}
    }
}

impl Pass<'_> {
    fn run(&mut self, pods: &[RankPod]) -> Step {
        let step = self.pass(pods);
        self.restart_not_needed();
        self.report_pods_ready(pods);
        step
    }

    fn pass(&mut self, pods: &[RankPod]) -> Step {
        let spec = &self.job.spec;
        if self.d.status.phase.is_none() {
            self.note(
                false,
                reasons::JOB_CREATED,
                format!("gang of {} ranks accepted", self.world),
            );
            self.set_phase(Phase::Pending);
            // A job created with the annotation set asks for no restart: nothing ran yet.
            if let Some(value) = self.restart_request() {
                self.d.status.restarted_at = Some(value);
            }
        }
        self.count(pods);
        if self.phase().is_some_and(Phase::is_terminal) {
            self.finished(pods);
            self.workload_finished();
            return Step::Done;
        }
        if spec.run_policy.suspend {
            self.suspend(pods);
            self.workload_stopped(pods);
            return Step::Done;
        }
        if self.phase() == Some(Phase::Suspended) {
            self.condition(ct::SUSPENDED, false, reasons::JOB_RESUMED, "resumed".into());
            self.note(
                false,
                reasons::JOB_RESUMED,
                "job resumed: starting the gang again".into(),
            );
            self.set_phase(Phase::Starting);
        }
        if self.deadline_passed(pods) {
            return Step::Done;
        }
        if self.kueue_stop(pods) {
            return Step::Done;
        }
        let attempt = self.d.status.attempt;
        let stale: Vec<&RankPod> = pods.iter().filter(|p| p.attempt != attempt).collect();
        if !stale.is_empty() {
            // The next attempt starts only when no pod of an older one is left, so no new rank
            // can ever meet an old one.
            self.delete(stale.iter().copied());
            self.set_phase(Phase::Restarting);
            return Step::Done;
        }
        if self.phase() == Some(Phase::Restarting) && pods.is_empty() && self.backing_off() {
            return Step::Done;
        }
        let current: Vec<&RankPod> = pods.iter().filter(|p| p.attempt == attempt).collect();
        match self.first_failure(&current) {
            First::Found(rank, pod, failure) => {
                if self.on_failure(rank, pod, failure, &current) {
                    return Step::Done;
                }
            }
            First::Awaited(wait) => {
                self.requeue(wait);
                return Step::Done;
            }
            First::None => {}
        }
        if self.succeeded(&current) {
            return Step::Done;
        }
        if let Some(value) = self.restart_request() {
            if current.iter().any(|p| !p.terminating) {
                self.restart_on_request(value, &current);
                return Step::Done;
            }
            self.answer_without_restart(value);
        }
        self.ensure_gang(&current)
    }

    /// The value of the job's `lockstep.dev/restarted-at` annotation when it asks for a restart
    /// not answered yet: it is set, not empty, and not the value in `status.restartedAt`.
    fn restart_request(&self) -> Option<String> {
        let value = self
            .job
            .metadata
            .annotations
            .as_ref()?
            .get(annotations::RESTARTED_AT)?;
        (!value.is_empty() && self.d.status.restarted_at.as_deref() != Some(value.as_str()))
            .then(|| value.clone())
    }

    /// A requested restart of a gang that exists (running or starting): the attempt is deleted
    /// and the next one starts as after a failure, but at once (no backoff), without a recorded
    /// failure and without counting against `maxRestarts`.
    fn restart_on_request(&mut self, value: String, current: &[&RankPod]) {
        let next = self.d.status.attempt + 1;
        let why = format!(
            "a restart was requested ({}={value})",
            annotations::RESTARTED_AT
        );
        self.d.status.restarted_at = Some(value);
        self.d.status.requested_restarts += 1;
        self.restart_gang(current, reasons::RESTART_REQUESTED, &why);
        self.note(
            false,
            reasons::RESTART_REQUESTED,
            format!("{why}: restarting the whole gang as attempt {next} from the last checkpoint"),
        );
    }

    /// Once the pass has decided the phase, answers a requested restart that finds no gang to
    /// restart: the job is finished, suspended or restarting already (a running or starting
    /// gang is restarted by the pass, or left for a later pass while it waits for a failure to
    /// show).
    fn restart_not_needed(&mut self) {
        let idle = matches!(
            self.phase(),
            Some(Phase::Succeeded | Phase::Failed | Phase::Suspended | Phase::Restarting)
        );
        if idle && let Some(value) = self.restart_request() {
            self.answer_without_restart(value);
        }
    }

    /// Records a requested restart as answered without a restart: a finished job ignores it
    /// (Warning `RestartIgnored`); any other has no gang to tear down (new, queued, suspended,
    /// restarting already), and its next start resumes from the last checkpoint anyway (Normal
    /// `RestartRequested`).
    fn answer_without_restart(&mut self, value: String) {
        let asked = format!(
            "a restart was requested ({}={value})",
            annotations::RESTARTED_AT
        );
        let attempt = self.d.status.attempt;
        let phase = self.phase().map_or("Pending", Phase::as_str);
        if self.phase().is_some_and(Phase::is_terminal) {
            self.note(
                true,
                reasons::RESTART_IGNORED,
                format!(
                    "{asked}, but the job has {phase}: a finished job is not restarted (create \
                     it again to run it again)"
                ),
            );
        } else {
            self.note(
                false,
                reasons::RESTART_REQUESTED,
                format!(
                    "{asked} while no pod of attempt {attempt} runs (phase {phase}): nothing to \
                     tear down; the gang starts from the last checkpoint"
                ),
            );
        }
        self.d.status.restarted_at = Some(value);
    }

    /// Deletes the current attempt's pods and moves on to the next attempt, Restarting: it
    /// starts once every old pod is gone (and, after a failure, the backoff has passed). The
    /// conditions say `why`, with `reason`.
    fn restart_gang(&mut self, current: &[&RankPod], reason: &str, why: &str) {
        let next = self.d.status.attempt + 1;
        self.d.status.attempt = next;
        self.delete(current.iter().copied());
        self.set_phase(Phase::Restarting);
        // The restart (and its backoff) begins now, also when the last one had not finished
        // (its gang never ran whole).
        self.d
            .status
            .conditions
            .retain(|c| c.type_ != ct::RESTARTING);
        // The next attempt is admitted anew: its wait (status.admission.waitSeconds, the wait
        // histogram, scheduleTimeoutSeconds) starts now, not when the job was created.
        self.condition(
            ct::ADMITTED,
            false,
            reason,
            format!("attempt {next} waits to be admitted as a whole"),
        );
        self.condition(ct::RUNNING, false, reason, why.to_string());
        self.condition(
            ct::RESTARTING,
            true,
            reason,
            format!("{why}; starting attempt {next}"),
        );
    }

    /// Gang restarts after failures so far: every restart but the requested ones.
    fn failure_restarts(&self) -> i32 {
        (self.d.status.attempt - self.d.status.requested_restarts).max(0)
    }

    fn phase(&self) -> Option<Phase> {
        self.d.status.phase
    }

    fn set_phase(&mut self, p: Phase) {
        self.d.status.phase = Some(p);
    }

    /// Adds an Event. One Event per job where one pass says two things: a job admitted in the
    /// pass that accepted it gets one GangAdmitted that says both (at scale every Event is a
    /// write through the API server, and the status holds the rest).
    fn note(&mut self, warning: bool, reason: &'static str, mut message: String) {
        if reason == reasons::GANG_ADMITTED
            && let Some(i) = self
                .d
                .events
                .iter()
                .position(|n| n.reason == reasons::JOB_CREATED)
        {
            let created = self.d.events.remove(i);
            message = format!("{}, and admitted: {message}", created.message);
        }
        self.d.events.push(Note {
            warning,
            reason,
            message,
        });
    }

    fn time(&self) -> Time {
        Time(self.now)
    }

    /// Sets a condition, keeping its lastTransitionTime unless its status changes.
    fn condition(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status_s = if status { "True" } else { "False" }.to_string();
        let generation = self.job.metadata.generation;
        let conds = &mut self.d.status.conditions;
        let now = Time(self.now);
        match conds.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status_s {
                    c.last_transition_time = now;
                }
                c.status = status_s;
                c.reason = reason.to_string();
                c.message = message;
                c.observed_generation = generation;
            }
            None => conds.push(Condition {
                type_: type_.to_string(),
                status: status_s,
                reason: reason.to_string(),
                message,
                last_transition_time: now,
                observed_generation: generation,
            }),
        }
    }

    fn condition_since(&self, type_: &str) -> Option<Timestamp> {
        self.d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
            .map(|c| c.last_transition_time.0)
    }

    fn count(&mut self, pods: &[RankPod]) {
        let attempt = self.d.status.attempt;
        let mut w = WorkerCounts::default();
        for p in pods
            .iter()
            .filter(|p| p.attempt == attempt && !p.terminating)
        {
            w.active += 1;
            w.ready += i32::from(p.ready);
            match p.state {
                PodState::Running => w.running += 1,
                PodState::Succeeded => w.succeeded += 1,
                PodState::Failed(_) => w.failed += 1,
                PodState::Pending => {}
            }
        }
        self.d.status.ready = Some(format!("{}/{}", w.ready, self.world));
        self.d.status.workers = Some(w);
    }

    fn delete<'p>(&mut self, pods: impl Iterator<Item = &'p RankPod>) {
        let names: Vec<String> = pods
            .filter(|p| !p.terminating)
            .map(|p| p.name.clone())
            .collect();
        if !names.is_empty() {
            self.d.actions.push(Action::DeletePods(names));
        }
    }

    fn requeue(&mut self, after: Duration) {
        let after = after.max(Duration::from_millis(100));
        self.d.requeue_after = Some(self.d.requeue_after.map_or(after, |r| r.min(after)));
    }

    fn until(&self, at: Timestamp) -> Duration {
        let left: SignedDuration = at.duration_since(self.now);
        Duration::try_from(left).unwrap_or_default()
    }

    /// Terminal: clean up pods per cleanPodPolicy, delete the job when its TTL has passed.
    fn finished(&mut self, pods: &[RankPod]) {
        self.clean_up(pods);
        if let (Some(ttl), Some(done)) = (
            self.job.spec.run_policy.ttl_seconds_after_finished,
            self.d.status.completion_time.as_ref().map(|t| t.0),
        ) {
            let at = done + SignedDuration::from_secs(i64::from(ttl));
            if self.now >= at {
                self.d.actions.push(Action::DeleteJob);
            } else {
                let wait = self.until(at);
                self.requeue(wait);
            }
        }
    }

    fn clean_up(&mut self, pods: &[RankPod]) {
        let policy = self.job.spec.run_policy.clean_pod_policy;
        let doomed = pods.iter().filter(|p| match policy {
            CleanPodPolicy::All => true,
            CleanPodPolicy::Running => matches!(p.state, PodState::Running | PodState::Pending),
            CleanPodPolicy::None => false,
        });
        let doomed: Vec<&RankPod> = doomed.collect();
        self.delete(doomed.into_iter());
    }

    fn suspend(&mut self, pods: &[RankPod]) {
        self.delete(pods.iter());
        // A resumed job is admitted again: its capacity was given back.
        self.d.status.admission = None;
        if self.phase() != Some(Phase::Suspended) {
            self.note(
                false,
                reasons::JOB_SUSPENDED,
                "job suspended: its pods are deleted".into(),
            );
        }
        self.set_phase(Phase::Suspended);
        self.condition(
            ct::SUSPENDED,
            true,
            reasons::JOB_SUSPENDED,
            "spec.runPolicy.suspend is true".into(),
        );
        self.condition(
            ct::RUNNING,
            false,
            reasons::JOB_SUSPENDED,
            "suspended".into(),
        );
    }

    fn deadline_passed(&mut self, pods: &[RankPod]) -> bool {
        let (Some(limit), Some(start)) = (
            self.job.spec.run_policy.active_deadline_seconds,
            self.d.status.start_time.as_ref().map(|t| t.0),
        ) else {
            return false;
        };
        let at = start + SignedDuration::from_secs(limit);
        if self.now < at {
            let wait = self.until(at);
            self.requeue(wait);
            return false;
        }
        self.fail(
            reasons::DEADLINE_EXCEEDED,
            format!("the job ran longer than spec.runPolicy.activeDeadlineSeconds ({limit}s)"),
        );
        self.clean_up(pods);
        true
    }

    fn backing_off(&mut self) -> bool {
        // The backoff grows with the restarts after failures; a requested restart has none.
        let attempt = u32::try_from(self.failure_restarts()).unwrap_or(0);
        let Some(since) = self.condition_since(ct::RESTARTING) else {
            return false;
        };
        let requested = self
            .d
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == ct::RESTARTING && c.reason == reasons::RESTART_REQUESTED);
        if requested {
            return false;
        }
        let delay = self
            .job
            .spec
            .failure_policy
            .restart_backoff
            .delay_seconds(attempt);
        let at = since + SignedDuration::from_secs(i64::try_from(delay).unwrap_or(i64::MAX / 2));
        if self.now < at {
            let wait = self.until(at);
            self.requeue(wait);
            return true;
        }
        false
    }

    /// The first failure among the current attempt's pods. The rendezvous's word comes first: a
    /// rank the gang's abort stopped (PeerFailed) names the rank that failed first, and that
    /// rank's own failure is the one, whatever the times say (they have one-second resolution);
    /// while its pod does not show it yet, the decision waits a moment for it rather than blame a
    /// survivor. Otherwise the earliest by its time, then the lowest rank, a PeerFailed last; a
    /// rank whose pod vanished while the gang ran counts as Deleted.
    fn first_failure<'p>(&self, current: &[&'p RankPod]) -> First<'p> {
        let mut failures: Vec<(u32, Option<&RankPod>, Failure)> = current
            .iter()
            .filter_map(|p| match &p.state {
                PodState::Failed(f) => Some((p.rank, Some(*p), f.clone())),
                _ if p.terminating && self.phase() == Some(Phase::Running) => Some((
                    p.rank,
                    Some(*p),
                    Failure::of(
                        FailureReason::Deleted,
                        "the pod was deleted while the gang ran".into(),
                    ),
                )),
                _ => None,
            })
            .collect();
        if self.phase() == Some(Phase::Running) {
            for rank in 0..self.world {
                if !current.iter().any(|p| p.rank == rank) {
                    failures.push((
                        rank,
                        None,
                        Failure::of(
                            FailureReason::Deleted,
                            "the pod disappeared while the gang ran".into(),
                        ),
                    ));
                }
            }
        }
        // A rank that reports it only stopped because another failed (or because another rank
        // received SIGTERM) is never the root cause while a real failure exists.
        let names = |rank: u32, f: &Failure| -> Option<u32> {
            if f.reason == FailureReason::PeerFailed {
                aborted::first_failed_rank(&f.message)
            } else {
                aborted::stopped_by(&f.message).filter(|by| *by != rank)
            }
        };
        let secondary = |rank: u32, f: &Failure| {
            f.reason == FailureReason::PeerFailed || names(rank, f).is_some()
        };
        failures.sort_by_key(|(rank, _, f)| (secondary(*rank, f), f.time.is_none(), f.time, *rank));
        let named = failures
            .iter()
            .find_map(|(rank, _, f)| names(*rank, f).map(|r| (r, f.time)));
        if let Some((named, seen)) = named {
            if let Some(i) = failures
                .iter()
                .position(|(rank, _, f)| *rank == named && !secondary(*rank, f))
            {
                let (rank, pod, f) = failures.swap_remove(i);
                return First::Found(rank, pod, f);
            }
            let alive = current.iter().any(|p| {
                p.rank == named
                    && !p.terminating
                    && matches!(p.state, PodState::Running | PodState::Pending)
            });
            let deadline =
                seen.map(|t| t + SignedDuration::from_secs(FIRST_FAILURE_WAIT.as_secs() as i64));
            // Measured on the operator's clock: a node whose clock runs ahead (a future
            // `finishedAt`) gets no wait rather than a longer one.
            let seen_now = seen.is_some_and(|s| s <= self.now);
            if alive
                && seen_now
                && let Some(at) = deadline.filter(|at| self.now < *at)
            {
                return First::Awaited(self.until(at).min(Duration::from_secs(1)));
            }
        }
        match failures.into_iter().next() {
            Some((rank, pod, f)) => First::Found(rank, pod, f),
            None => First::None,
        }
    }

    /// Applies the failure policy; true when reconcile is done for this pass.
    fn on_failure(
        &mut self,
        rank: u32,
        pod: Option<&RankPod>,
        f: Failure,
        current: &[&RankPod],
    ) -> bool {
        let attempt = self.d.status.attempt;
        let pod_name = pod.map_or_else(
            || format!("{}-{rank}", self.job.metadata.name.as_deref().unwrap_or("")),
            |p| p.name.clone(),
        );
        let node = pod.and_then(|p| p.node.clone());
        // Decide on the first failure of the attempt, never on a later secondary one: this one
        // when none is recorded for the attempt yet (then it is recorded), else the recorded one.
        let (first, root) = match &self.d.status.last_failure {
            Some(recorded) if recorded.attempt == attempt => {
                let root = Failure::from_record(recorded);
                let rank = u32::try_from(recorded.rank).unwrap_or(0);
                let first = describe(rank, &recorded.pod, recorded.node.as_deref(), &root);
                (first, root)
            }
            _ => {
                let first = describe(rank, &pod_name, node.as_deref(), &f);
                self.d.status.last_failure = Some(RankFailure {
                    attempt,
                    rank: i32::try_from(rank).unwrap_or(i32::MAX),
                    pod: pod_name,
                    node,
                    exit_code: f.exit_code,
                    reason: f.detail.clone(),
                    message: Some(f.message.clone()),
                    log_tail: None,
                    time: Some(Time(f.time.unwrap_or(self.now))),
                });
                self.note(true, reasons::RANK_FAILED, first.clone());
                (first, f)
            }
        };
        match action_for(&self.job.spec.failure_policy.rules, &root) {
            FailureAction::Ignore => false,
            FailureAction::FailJob => {
                self.fail(
                    reasons::FAILED_BY_RULE,
                    format!("{first}; a failure rule says FailJob"),
                );
                self.delete(
                    current
                        .iter()
                        .copied()
                        .filter(|p| !matches!(p.state, PodState::Failed(_) | PodState::Succeeded)),
                );
                true
            }
            FailureAction::RestartGang => {
                let max = self.job.spec.failure_policy.max_restarts;
                // Requested restarts do not count against maxRestarts.
                if self.failure_restarts() >= max {
                    self.fail(
                        reasons::BACKOFF_LIMIT_EXCEEDED,
                        format!("{first}; all {max} gang restarts used"),
                    );
                    self.delete(
                        current.iter().copied().filter(|p| {
                            !matches!(p.state, PodState::Failed(_) | PodState::Succeeded)
                        }),
                    );
                } else {
                    self.restart_gang(current, reasons::GANG_RESTARTING, &first);
                    let delay = self
                        .job
                        .spec
                        .failure_policy
                        .restart_backoff
                        .delay_seconds(u32::try_from(self.failure_restarts()).unwrap_or(1));
                    self.note(
                        true,
                        reasons::GANG_RESTARTING,
                        format!(
                            "restarting the whole gang as attempt {} in {delay}s after {first}",
                            attempt + 1
                        ),
                    );
                    self.requeue(Duration::from_secs(delay));
                }
                true
            }
        }
    }

    fn fail(&mut self, reason: &'static str, message: String) {
        self.set_phase(Phase::Failed);
        self.d.status.completion_time = Some(self.time());
        self.condition(ct::FAILED, true, reason, message.clone());
        self.condition(ct::RUNNING, false, reason, "the job failed".into());
        self.condition(ct::RESTARTING, false, reason, "the job failed".into());
        self.note(true, reasons::JOB_FAILED, message);
    }

    fn succeeded(&mut self, current: &[&RankPod]) -> bool {
        let ok = |rank: u32| {
            current
                .iter()
                .any(|p| p.rank == rank && p.state == PodState::Succeeded)
        };
        let done = match self.job.spec.run_policy.success_policy {
            SuccessPolicy::AllRanks => (0..self.world).all(ok),
            SuccessPolicy::RankZero => ok(0),
        };
        if !done {
            return false;
        }
        self.set_phase(Phase::Succeeded);
        self.d.status.completion_time = Some(self.time());
        self.condition(
            ct::SUCCEEDED,
            true,
            reasons::JOB_SUCCEEDED,
            "training finished".into(),
        );
        self.condition(
            ct::RUNNING,
            false,
            reasons::JOB_SUCCEEDED,
            "training finished".into(),
        );
        self.condition(
            ct::RESTARTING,
            false,
            reasons::JOB_SUCCEEDED,
            "training finished".into(),
        );
        self.note(
            false,
            reasons::JOB_SUCCEEDED,
            format!("all {} ranks finished", self.world),
        );
        let owned: Vec<RankPod> = current.iter().map(|p| (*p).clone()).collect();
        self.clean_up(&owned);
        true
    }

    /// Makes sure every rank of the current attempt exists and, once admitted, runs. Under the
    /// `Builtin` policy an attempt without admission and without pods stops the pass here for
    /// admission's answer.
    fn ensure_gang(&mut self, current: &[&RankPod]) -> Step {
        if self.kueue() {
            self.kueue_gang(current);
            return Step::Done;
        }
        let mut plan = None;
        if self.job.spec.scheduling.gang_policy == GangPolicy::Builtin {
            match job::admitted_nodes(&self.d.status) {
                Some(nodes) => plan = Some(nodes.to_vec()),
                // Pods of this attempt made before admission existed (an older operator): they
                // are left to the scheduler as they are.
                None if !current.is_empty() => {}
                None => return Step::AwaitsAdmission,
            }
        }
        self.make_gang(current, plan);
        Step::Done
    }

    /// Creates the missing ranks (on the planned nodes of `plan`, when admission made one),
    /// releases the gang once it is whole, and sets the phase from the ranks' states.
    fn make_gang(&mut self, current: &[&RankPod], plan: Option<Vec<String>>) {
        let attempt = self.d.status.attempt;
        let missing: Vec<u32> = (0..self.world)
            .filter(|r| !current.iter().any(|p| p.rank == *r))
            .collect();
        let policy = self.job.spec.scheduling.gang_policy;
        let update = self.workload.map(|w| w.update.clone());
        // The external gang scheduler's API was missing when last tried (reconcile reports it
        // with `set_gang_api_missing`): until a pod exists the job stays as reported, and this
        // pass tries again. Deciding Starting here would undo the report on every pass and make
        // it write again.
        let api_missing = policy != GangPolicy::Builtin
            && current.is_empty()
            && self.d.status.conditions.iter().any(|c| {
                c.type_ == ct::ADMITTED
                    && c.status == "False"
                    && c.reason == reasons::GANG_API_MISSING
            });
        if !missing.is_empty() {
            self.d.actions.push(Action::EnsureSharedObjects { attempt });
            // Kueue's Workload is written before admission, and not changed under it.
            if !matches!(policy, GangPolicy::Builtin | GangPolicy::Kueue) {
                self.d.actions.push(Action::EnsureGangObjects);
            }
            let nodes = plan.as_ref().map(|p| {
                missing
                    .iter()
                    .map(|r| p.get(*r as usize).cloned().unwrap_or_default())
                    .collect()
            });
            let pinned = nodes.is_some();
            self.d.actions.push(Action::CreatePods {
                attempt,
                ranks: missing,
                nodes,
                update,
            });
            if pinned {
                // Once these creations have all landed the whole gang exists: release it in the
                // same pass (the actions stop at the first failed write, and a later pass
                // releases what a crash left gated).
                let name = self.job.metadata.name.clone().unwrap_or_default();
                let names: Vec<String> = (0..self.world)
                    .filter_map(|r| match current.iter().find(|p| p.rank == r) {
                        Some(p) => (p.gated && !p.terminating).then(|| p.name.clone()),
                        None => Some(format!("{name}-{r}")),
                    })
                    .collect();
                self.d.actions.push(Action::Ungate(names));
            }
            if self.d.status.start_time.is_none() {
                self.d.status.start_time = Some(self.time());
            }
        } else if plan.is_some() {
            // Every rank exists: release them together.
            let gated: Vec<String> = current
                .iter()
                .filter(|p| p.gated && !p.terminating)
                .map(|p| p.name.clone())
                .collect();
            if !gated.is_empty() {
                self.d.actions.push(Action::Ungate(gated));
            }
        }
        if !matches!(policy, GangPolicy::Builtin | GangPolicy::Kueue) && !api_missing {
            self.externally_admitted(current);
        }
        let running = current
            .iter()
            .filter(|p| p.state == PodState::Running && !p.terminating)
            .count();
        if running == self.world as usize {
            if self.phase() != Some(Phase::Running) {
                self.note(
                    false,
                    reasons::GANG_STARTED,
                    format!("all {} ranks of attempt {attempt} are running", self.world),
                );
            }
            self.set_phase(Phase::Running);
            self.condition(
                ct::RUNNING,
                true,
                reasons::GANG_STARTED,
                format!("all {} ranks running", self.world),
            );
            self.condition(
                ct::RESTARTING,
                false,
                reasons::GANG_STARTED,
                "the gang runs".into(),
            );
        } else if self.phase() != Some(Phase::Running) && !api_missing {
            self.set_phase(Phase::Starting);
        }
    }
}

impl Pass<'_> {
    /// When the current wait for admission began (see [`job::queued_since`]); now, if the job
    /// has no creation time.
    fn queued_since(&self) -> Timestamp {
        let created = self.job.metadata.creation_timestamp.as_ref().map(|t| t.0);
        job::queued_since(&self.d.status, created).unwrap_or(self.now)
    }

    fn admitted(&mut self, nodes: &[String]) {
        let attempt = self.d.status.attempt;
        let waited = self
            .now
            .duration_since(self.queued_since())
            .as_secs_f64()
            .max(0.0);
        let mut distinct: Vec<&String> = nodes.iter().collect();
        distinct.sort();
        distinct.dedup();
        self.d.status.admission = Some(Admission {
            attempt: Some(attempt),
            admitted_at: Some(self.time()),
            wait_seconds: Some((waited * 1000.0).round() / 1000.0),
            nodes: nodes.to_vec(),
            queue_position: None,
        });
        let message = format!(
            "all {} ranks placed on {} node(s) after {waited:.1}s in the queue",
            self.world,
            distinct.len()
        );
        self.condition(ct::ADMITTED, true, reasons::GANG_ADMITTED, message.clone());
        self.note(
            false,
            reasons::GANG_ADMITTED,
            format!("attempt {attempt}: {message}"),
        );
    }

    fn queued(&mut self, reason: &'static str, message: String, position: usize) {
        let attempt = self.d.status.attempt;
        let waited = self.now.duration_since(self.queued_since()).as_secs();
        let (mut reason, mut message) = (reason, message);
        if let Some(limit) = self.job.spec.scheduling.schedule_timeout_seconds {
            if waited >= limit {
                let already = self
                    .d
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == ct::ADMITTED && c.reason == reasons::ADMISSION_TIMEOUT);
                message = format!(
                    "waiting longer than spec.scheduling.scheduleTimeoutSeconds ({limit}s) and \
                     still waiting: {message}"
                );
                reason = reasons::ADMISSION_TIMEOUT;
                if !already {
                    self.note(true, reasons::ADMISSION_TIMEOUT, message.clone());
                }
            } else {
                self.requeue(Duration::from_secs(
                    u64::try_from(limit - waited).unwrap_or(1),
                ));
            }
        }
        if self.phase() != Some(Phase::Queued) {
            self.note(
                false,
                reason,
                format!("attempt {attempt} waits for admission at position {position}: {message}"),
            );
        }
        self.set_phase(Phase::Queued);
        self.condition(ct::ADMITTED, false, reason, message);
        self.d.status.admission = Some(Admission {
            attempt: Some(attempt),
            queue_position: i32::try_from(position).ok(),
            ..Admission::default()
        });
        // Refresh the queue position now and then; admission itself wakes the job up.
        self.requeue(QUEUE_REFRESH);
    }

    /// Whether the job is Kueue's (its Workload decides when the gang is made).
    fn kueue(&self) -> bool {
        self.job.spec.scheduling.gang_policy == GangPolicy::Kueue
    }

    /// A finished job's Workload says so (`Finished=True`), which gives its quota back.
    fn workload_finished(&mut self) {
        if self.workload.is_none_or(|w| w.finished) {
            return;
        }
        let succeeded = self.phase() == Some(Phase::Succeeded);
        let type_ = if succeeded { ct::SUCCEEDED } else { ct::FAILED };
        let message = self
            .d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map_or_else(|| type_.to_string(), |c| c.message.clone());
        self.d
            .actions
            .push(Action::WorkloadStatus(StatusUpdate::Finished {
                succeeded,
                message,
            }));
    }

    /// A suspended job's Workload is inactive (Kueue then evicts it); once the gang's pods are
    /// gone its quota reservation is cleared.
    fn workload_stopped(&mut self, pods: &[RankPod]) {
        let Some(w) = self.workload else {
            return;
        };
        if w.active {
            self.d.actions.push(Action::SetWorkloadActive(false));
        }
        self.release_when_stopped(w, pods);
    }

    /// Clears an evicted Workload's quota reservation once no pod of the job is left, as Kueue's
    /// job framework does when the job no longer runs.
    fn release_when_stopped(&mut self, w: &WorkloadView, pods: &[RankPod]) {
        if let (true, true, Some((reason, message))) = (w.reserved, pods.is_empty(), &w.evicted) {
            self.d
                .actions
                .push(Action::WorkloadStatus(StatusUpdate::Release {
                    reason: reason.clone(),
                    message: message.clone(),
                }));
        }
    }

    /// Stops the gang of a Kueue job that may not run: its Workload is evicted (preemption, a
    /// `waitForPodsReady` timeout, deactivation) while it holds quota, or pods exist while it is
    /// not admitted (deleted, or its admission lost). The pods are deleted (each rank gets
    /// SIGTERM and saves a checkpoint first when one is configured), and the job waits, Queued,
    /// to be admitted again. Not a failure: no restart is counted, and the ranks' exits on the
    /// way are not failures. A gang whose ranks have all finished has succeeded instead. Returns
    /// whether the pass ends here.
    fn kueue_stop(&mut self, pods: &[RankPod]) -> bool {
        if !self.kueue() {
            return false;
        }
        let attempt = self.d.status.attempt;
        let current: Vec<&RankPod> = pods.iter().filter(|p| p.attempt == attempt).collect();
        let evicted = self
            .workload
            .filter(|w| w.reserved)
            .and_then(|w| w.evicted.as_ref().map(|e| (w, e)));
        let admitted = self
            .workload
            .is_some_and(|w| w.reserved && w.admitted && w.active);
        if evicted.is_none() && (admitted || pods.is_empty()) {
            return false;
        }
        if self.succeeded(&current) {
            return true;
        }
        self.delete(pods.iter());
        self.set_phase(Phase::Queued);
        self.d.status.admission = None;
        let Some((w, (reason, message))) = evicted else {
            let said = "the gang is stopped: its Kueue Workload is not admitted (it was deleted, \
                        or lost its admission)"
                .to_string();
            self.kueue_waiting(said.clone());
            self.condition(ct::RUNNING, false, reasons::WAITING_FOR_KUEUE, said);
            return true;
        };
        let said = format!(
            "Kueue evicted the job's Workload ({reason}): {message}; the gang is stopped and \
             waits to be admitted again"
        );
        let already =
            self.d.status.conditions.iter().any(|c| {
                c.type_ == ct::ADMITTED && c.reason == reasons::EVICTED && c.message == said
            });
        if !already {
            self.note(true, reasons::EVICTED, said.clone());
        }
        self.condition(ct::ADMITTED, false, reasons::EVICTED, said.clone());
        self.condition(ct::RUNNING, false, reasons::EVICTED, said);
        self.release_when_stopped(w, pods);
        true
    }

    /// The gang of a Kueue job: its Workload is written and waited on; once Kueue admits it,
    /// the gang is made with what the admission puts on the pods.
    fn kueue_gang(&mut self, current: &[&RankPod]) {
        let queue = crate::kueue::queue_name(self.job);
        let Some(w) = self.workload else {
            // Kept as reported while Kueue's API is not served (see `make_gang`).
            let api_missing = current.is_empty()
                && self
                    .d
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == ct::ADMITTED && c.reason == reasons::GANG_API_MISSING);
            self.d.actions.push(Action::EnsureGangObjects);
            if !api_missing {
                self.kueue_waiting(format!(
                    "the job's Workload is written to Kueue's LocalQueue {queue}"
                ));
            }
            return;
        };
        if !w.current && !w.reserved {
            self.d.actions.push(Action::DeleteWorkload);
            self.kueue_waiting(
                "the job's spec changed while its Workload waited: the Workload is written again"
                    .into(),
            );
            return;
        }
        if !w.active {
            // Activated again only when the operator deactivated it (the job was suspended);
            // one Kueue deactivated (a requeuing limit, an execution time limit, a rejected
            // admission check) or a person did stays so, and the job says why.
            if w.deactivated_for_suspend {
                self.d.actions.push(Action::SetWorkloadActive(true));
                self.kueue_waiting("the job resumed: its Workload is active again".into());
            } else {
                let why = w
                    .evicted
                    .as_ref()
                    .map_or_else(String::new, |(reason, message)| {
                        format!(" ({reason}: {message})")
                    });
                self.kueue_waiting(format!(
                    "the job's Workload was deactivated{why}; it waits until the Workload is \
                     active again (or the job is deleted)"
                ));
            }
            return;
        }
        if !(w.reserved && w.admitted) {
            let message = match &w.waiting {
                Some((reason, message)) if !message.is_empty() => {
                    format!("Kueue ({reason}): {message}")
                }
                _ if w.reserved => format!(
                    "Kueue reserved quota in {}; waiting for its admission checks",
                    w.describe_admission()
                ),
                _ => format!("the Workload waits in Kueue's LocalQueue {queue}"),
            };
            self.kueue_waiting(message);
            return;
        }
        if job::admitted_nodes(&self.d.status).is_none() {
            self.kueue_admitted(w);
        }
        self.make_gang(current, None);
    }

    /// Queued, waiting for Kueue (`message` says what it waits for).
    fn kueue_waiting(&mut self, message: String) {
        let attempt = self.d.status.attempt;
        let reason = reasons::WAITING_FOR_KUEUE;
        let news = !self
            .d
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == ct::ADMITTED && c.reason == reason && c.message == message);
        if news && self.phase() != Some(Phase::Queued) {
            self.note(false, reason, format!("attempt {attempt}: {message}"));
        }
        self.set_phase(Phase::Queued);
        self.condition(ct::ADMITTED, false, reason, message);
        self.d.status.admission = None;
    }

    /// Records Kueue's admission of the current attempt.
    fn kueue_admitted(&mut self, w: &WorkloadView) {
        let attempt = self.d.status.attempt;
        let waited = self
            .now
            .duration_since(self.queued_since())
            .as_secs_f64()
            .max(0.0);
        self.d.status.admission = Some(Admission {
            attempt: Some(attempt),
            admitted_at: Some(self.time()),
            wait_seconds: Some((waited * 1000.0).round() / 1000.0),
            nodes: Vec::new(),
            queue_position: None,
        });
        let message = format!(
            "Kueue admitted all {} ranks to {} after {waited:.1}s",
            self.world,
            w.describe_admission()
        );
        self.condition(ct::ADMITTED, true, reasons::GANG_ADMITTED, message.clone());
        self.note(
            false,
            reasons::GANG_ADMITTED,
            format!("attempt {attempt}: {message}"),
        );
    }

    /// Tells Kueue whether the admitted gang runs whole (`PodsReady`), as its job framework
    /// does: True once every rank of the attempt runs, False again while it restarts.
    fn report_pods_ready(&mut self, pods: &[RankPod]) {
        let Some(w) = self.workload else {
            return;
        };
        if !self.kueue() || !w.admitted || w.evicted.is_some() || w.finished {
            return;
        }
        if self.phase().is_some_and(Phase::is_terminal) {
            return;
        }
        let attempt = self.d.status.attempt;
        // Ranks that finished count as ready, as Kueue counts a batch Job's succeeded pods.
        let running = pods
            .iter()
            .filter(|p| p.attempt == attempt && !p.terminating)
            .filter(|p| matches!(p.state, PodState::Running | PodState::Succeeded))
            .count();
        let ready = running == self.world as usize
            && !self
                .d
                .actions
                .iter()
                .any(|a| matches!(a, Action::DeletePods(_)));
        if w.pods_ready != Some(ready) && (ready || w.pods_ready == Some(true)) {
            self.d
                .actions
                .push(Action::WorkloadStatus(StatusUpdate::PodsReady(ready)));
        }
    }

    /// External gang schedulers: the gang is admitted once every rank of the attempt is bound.
    fn externally_admitted(&mut self, current: &[&RankPod]) {
        let bound: Vec<String> = (0..self.world)
            .filter_map(|r| {
                current
                    .iter()
                    .find(|p| p.rank == r && !p.terminating)
                    .and_then(|p| p.node.clone())
            })
            .collect();
        let policy = format!("{:?}", self.job.spec.scheduling.gang_policy);
        let done = job::admitted_nodes(&self.d.status).is_some();
        if bound.len() == self.world as usize {
            if !done {
                self.admitted(&bound);
            }
        } else if !done {
            self.condition(
                ct::ADMITTED,
                false,
                reasons::WAITING_FOR_SCHEDULER,
                format!(
                    "the {policy} gang scheduler has placed {} of {} ranks (it binds all or none)",
                    bound.len(),
                    self.world
                ),
            );
        }
    }
}

/// How often a queued job's status (its queue position) is refreshed.
pub const QUEUE_REFRESH: Duration = Duration::from_secs(30);

fn describe(rank: u32, pod: &str, node: Option<&str>, f: &Failure) -> String {
    let on = node.map(|n| format!(" on {n}")).unwrap_or_default();
    let code = f
        .exit_code
        .map(|c| format!("exit code {c}, "))
        .unwrap_or_default();
    format!(
        "rank {rank} (pod {pod}{on}) failed first: {code}{}: {}",
        f.detail, f.message
    )
}

/// The action for a failure: the first matching rule's, else the default (permanent worker
/// errors fail the job, everything else restarts the gang).
pub fn action_for(rules: &[lockstep_api::spec::FailureRule], f: &Failure) -> FailureAction {
    for rule in rules {
        let code_ok = rule.exit_codes.as_ref().is_none_or(|ranges| {
            f.exit_code
                .is_some_and(|c| ranges.iter().any(|r| r.contains(c)))
        });
        let reason_ok = rule
            .reasons
            .as_ref()
            .is_none_or(|rs| rs.contains(&f.reason));
        if code_ok && reason_ok {
            return rule.action;
        }
    }
    match f.exit_code.and_then(ExitCode::from_code) {
        Some(c) if c.is_permanent() => FailureAction::FailJob,
        _ => FailureAction::RestartGang,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::PodState::*;

    fn job(yaml: &str) -> ParallelJob {
        let text =
            std::fs::read_to_string(format!("{}/../examples/{yaml}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let mut j = lockstep_api::validation::validate_yaml(&text).unwrap();
        j.metadata.namespace = Some("ns".into());
        j.metadata.generation = Some(1);
        j
    }

    fn pod(rank: u32, attempt: i32, state: PodState) -> RankPod {
        RankPod {
            name: format!("j-{rank}"),
            rank,
            attempt,
            state,
            ready: false,
            node: Some(format!("node-{rank}")),
            terminating: false,
            gated: false,
            planned_node: None,
            ip: None,
            uid: None,
            controller: Some("u".into()),
            job_uid: None,
        }
    }

    fn failed(code: i32, secs: i64) -> PodState {
        let reason = if code == 5 {
            FailureReason::PeerFailed
        } else {
            FailureReason::Error
        };
        Failed(Failure {
            exit_code: Some(code),
            reason,
            detail: ExitCode::from_code(code).map_or("Error".into(), |c| c.reason().into()),
            message: format!("exit {code}"),
            time: Some(Timestamp::from_second(1_000 + secs).unwrap()),
        })
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(2_000 + secs).unwrap()
    }

    /// Runs decide and feeds its status back, like the API server would.
    fn step(j: &mut ParallelJob, pods: &[RankPod], now: Timestamp) -> Decision {
        let d = decide(j, 4, pods, now).answer_with(|| Outcome::Admitted(vec!["n".into(); 4]));
        j.status = Some(d.status.clone());
        d
    }

    fn running(attempt: i32) -> Vec<RankPod> {
        (0..4).map(|r| pod(r, attempt, Running)).collect()
    }

    #[test]
    fn a_missing_gang_api_keeps_the_job_queued_until_its_pods_exist() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Volcano;
        let d = step(&mut j, &[], at(0));
        assert_eq!(d.status.phase, Some(Phase::Starting));
        // What reconcile reports when the PodGroup API is not served.
        let status = j.status.as_mut().unwrap();
        assert!(set_gang_api_missing(status, "not served", Some(1), at(1)));
        assert!(
            !set_gang_api_missing(status, "not served", Some(1), at(2)),
            "said once"
        );
        let reported = j.status.clone();
        let d = step(&mut j, &[], at(60));
        assert_eq!(
            Some(d.status),
            reported,
            "the report stands: nothing to write"
        );
        assert!(
            d.actions.contains(&Action::EnsureGangObjects),
            "tried again"
        );
        // Once the API is served the pods are made, and the gang waits for its scheduler.
        let pending: Vec<RankPod> = (0..4)
            .map(|r| RankPod {
                node: None,
                ..pod(r, 0, Pending)
            })
            .collect();
        let d = step(&mut j, &pending, at(61));
        assert_eq!(d.status.phase, Some(Phase::Starting));
        let admitted = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::ADMITTED)
            .unwrap();
        assert_eq!(admitted.reason, reasons::WAITING_FOR_SCHEDULER);
    }

    /// Runs decide for a Kueue job with its Workload `w` and feeds its status back.
    fn kueue_step(
        j: &mut ParallelJob,
        pods: &[RankPod],
        w: Option<&WorkloadView>,
        now: Timestamp,
    ) -> Decision {
        let d =
            decide_with(j, 4, pods, w, now).answer_with(|| panic!("Kueue admits, not the queue"));
        j.status = Some(d.status.clone());
        d
    }

    fn status_updates(d: &Decision) -> Vec<&StatusUpdate> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::WorkloadStatus(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    fn admitted_workload() -> WorkloadView {
        let mut update = PodSetUpdate::default();
        update.node_selector.insert("pool".into(), "a100".into());
        WorkloadView {
            current: true,
            active: true,
            reserved: true,
            admitted: true,
            cluster_queue: Some("team".into()),
            flavors: vec![("nvidia.com/gpu".into(), "a100".into())],
            update,
            ..WorkloadView::default()
        }
    }

    #[test]
    fn a_kueue_job_makes_no_pod_until_its_workload_is_admitted_then_reports_pods_ready() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        // No Workload yet: it is written, and nothing else of the gang.
        let d = kueue_step(&mut j, &[], None, at(0));
        assert_eq!(d.actions, vec![Action::EnsureGangObjects]);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(admitted(&d).reason, reasons::WAITING_FOR_KUEUE);
        // Kueue says why it waits: the job says it too, and still makes no pod.
        let waiting = WorkloadView {
            current: true,
            active: true,
            waiting: Some((
                "Pending".into(),
                "insufficient unused quota for nvidia.com/gpu in flavor a100, 4 more needed".into(),
            )),
            ..WorkloadView::default()
        };
        let d = kueue_step(&mut j, &[], Some(&waiting), at(5));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(
            admitted(&d).message,
            "Kueue (Pending): insufficient unused quota for nvidia.com/gpu in flavor a100, 4 \
             more needed"
        );
        // Admitted: every rank is created with the flavor's node labels.
        let w = admitted_workload();
        let d = kueue_step(&mut j, &[], Some(&w), at(10));
        let create = d
            .actions
            .iter()
            .find_map(|a| match a {
                Action::CreatePods {
                    ranks,
                    nodes,
                    update,
                    ..
                } => Some((ranks, nodes, update)),
                _ => None,
            })
            .expect("pods created");
        assert_eq!(create.0, &vec![0, 1, 2, 3]);
        assert_eq!(create.1, &None, "Kueue pins no pod to a node");
        assert_eq!(
            create.2.as_ref().map(|u| u.node_selector["pool"].as_str()),
            Some("a100")
        );
        assert!(
            !d.actions.contains(&Action::EnsureGangObjects),
            "the Workload is left as admitted"
        );
        let a = admitted(&d);
        assert_eq!(
            (a.status.as_str(), a.reason.as_str()),
            ("True", reasons::GANG_ADMITTED)
        );
        assert!(
            a.message.contains("ClusterQueue team (flavor a100)"),
            "{}",
            a.message
        );
        assert_eq!(
            d.status.admission.as_ref().and_then(|a| a.wait_seconds),
            Some(10.0)
        );
        assert!(status_updates(&d).is_empty());
        // Every rank runs: Kueue hears PodsReady; once it says so, nothing more is written.
        let d = kueue_step(&mut j, &running(0), Some(&w), at(20));
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(status_updates(&d), vec![&StatusUpdate::PodsReady(true)]);
        let ready = WorkloadView {
            pods_ready: Some(true),
            ..w.clone()
        };
        let d = kueue_step(&mut j, &running(0), Some(&ready), at(21));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        // A rank fails: the gang restarts, and Kueue hears that it is not ready any more.
        let mut pods = running(0);
        pods[2].state = failed(1, 30);
        let d = kueue_step(&mut j, &pods, Some(&ready), at(30));
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!(status_updates(&d), vec![&StatusUpdate::PodsReady(false)]);
        // The next attempt is made; it finishes: the Workload is Finished, which gives the
        // quota back.
        let d = kueue_step(&mut j, &[], Some(&ready), at(40));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { attempt: 1, .. }))
        );
        let done: Vec<RankPod> = (0..4).map(|r| pod(r, 1, Succeeded)).collect();
        let d = kueue_step(&mut j, &done, Some(&ready), at(50));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        let d = kueue_step(&mut j, &done, Some(&ready), at(51));
        assert_eq!(
            status_updates(&d),
            vec![&StatusUpdate::Finished {
                succeeded: true,
                message: "training finished".into()
            }]
        );
        let finished = WorkloadView {
            finished: true,
            ..ready
        };
        let d = kueue_step(&mut j, &done, Some(&finished), at(52));
        assert!(status_updates(&d).is_empty());
    }

    #[test]
    fn an_evicted_gang_stops_without_a_restart_releases_its_quota_when_gone_and_waits() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let w = admitted_workload();
        kueue_step(&mut j, &[], Some(&w), at(0));
        kueue_step(&mut j, &running(0), Some(&w), at(1));
        let evicted = WorkloadView {
            evicted: Some(("Preempted".into(), "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue".into())),
            pods_ready: Some(true),
            ..w.clone()
        };
        let d = kueue_step(&mut j, &running(0), Some(&evicted), at(10));
        assert_eq!(
            d.actions,
            vec![Action::DeletePods(
                (0..4).map(|r| format!("j-{r}")).collect()
            )]
        );
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(d.status.attempt, 0, "no restart");
        assert_eq!(admitted(&d).reason, reasons::EVICTED);
        assert!(
            admitted(&d).message.contains("Preempted to accommodate"),
            "{}",
            admitted(&d).message
        );
        assert_eq!(
            d.events
                .iter()
                .filter(|e| e.reason == reasons::EVICTED)
                .count(),
            1
        );
        // The ranks save their checkpoints and exit 143 on SIGTERM: not a failure.
        let stopping: Vec<RankPod> = (0..4)
            .map(|r| RankPod {
                terminating: true,
                ..pod(r, 0, failed(143, 11))
            })
            .collect();
        let d = kueue_step(&mut j, &stopping, Some(&evicted), at(11));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert!(d.events.is_empty(), "said once: {:?}", d.events);
        assert!(d.status.last_failure.is_none());
        // Gone: the reservation is released, as Kueue's job framework does.
        let d = kueue_step(&mut j, &[], Some(&evicted), at(12));
        assert_eq!(
            status_updates(&d),
            vec![&StatusUpdate::Release {
                reason: "Preempted".into(),
                message: evicted.evicted.clone().unwrap().1,
            }]
        );
        // Back in the queue until Kueue admits it again; then the same attempt starts again.
        let requeued = WorkloadView {
            reserved: false,
            admitted: false,
            waiting: Some(("Pending".into(), "insufficient quota".into())),
            ..evicted.clone()
        };
        let d = kueue_step(&mut j, &[], Some(&requeued), at(13));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(admitted(&d).reason, reasons::WAITING_FOR_KUEUE);
        let d = kueue_step(&mut j, &[], Some(&w), at(20));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { attempt: 0, .. }))
        );
        assert_eq!(d.status.attempt, 0);
    }

    #[test]
    fn a_spec_change_while_the_workload_waits_writes_it_again_but_not_once_admitted() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let stale = WorkloadView {
            current: false,
            active: true,
            ..WorkloadView::default()
        };
        let d = kueue_step(&mut j, &[], Some(&stale), at(0));
        assert_eq!(d.actions, vec![Action::DeleteWorkload]);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        let stale_admitted = WorkloadView {
            current: false,
            ..admitted_workload()
        };
        let d = kueue_step(&mut j, &[], Some(&stale_admitted), at(1));
        assert!(!d.actions.contains(&Action::DeleteWorkload));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { .. }))
        );
    }

    #[test]
    fn a_suspended_kueue_job_deactivates_its_workload_releases_it_and_resumes_it() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let w = admitted_workload();
        kueue_step(&mut j, &running(0), Some(&w), at(0));
        j.spec.run_policy.suspend = true;
        let d = kueue_step(&mut j, &running(0), Some(&w), at(1));
        assert!(
            d.actions.contains(&Action::SetWorkloadActive(false)),
            "{:?}",
            d.actions
        );
        assert!(
            !d.actions.contains(&Action::EnsureGangObjects),
            "only `active` is written"
        );
        assert!(d.actions.iter().any(|a| matches!(a, Action::DeletePods(_))));
        let deactivated = WorkloadView {
            active: false,
            deactivated_for_suspend: true,
            evicted: Some(("Deactivated".into(), "The workload is deactivated".into())),
            ..w.clone()
        };
        let d = kueue_step(&mut j, &[], Some(&deactivated), at(2));
        assert!(matches!(
            status_updates(&d)[..],
            [StatusUpdate::Release { .. }]
        ));
        let released = WorkloadView {
            reserved: false,
            admitted: false,
            ..deactivated
        };
        let d = kueue_step(&mut j, &[], Some(&released), at(3));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        // Resumed: the operator activates what it deactivated, and makes no pod until admitted.
        j.spec.run_policy.suspend = false;
        let d = kueue_step(&mut j, &[], Some(&released), at(4));
        assert_eq!(d.actions, vec![Action::SetWorkloadActive(true)]);
        assert_eq!(d.status.phase, Some(Phase::Queued));
    }

    #[test]
    fn a_workload_kueue_deactivated_stays_inactive_and_the_job_says_why() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let by_kueue = WorkloadView {
            current: true,
            active: false,
            evicted: Some((
                "InactiveWorkload".into(),
                "The workload is deactivated due to exceeding the maximum number of re-queuing retries".into(),
            )),
            ..WorkloadView::default()
        };
        let d = kueue_step(&mut j, &[], Some(&by_kueue), at(0));
        assert!(d.actions.is_empty(), "not activated again: {:?}", d.actions);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert!(
            admitted(&d).message.contains("re-queuing retries"),
            "{}",
            admitted(&d).message
        );
        // Even admitted (Kueue has not evicted it yet), an inactive Workload gets no pod.
        let admitted_inactive = WorkloadView {
            active: false,
            evicted: None,
            ..admitted_workload()
        };
        let d = kueue_step(&mut j, &[], Some(&admitted_inactive), at(1));
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { .. }))
        );
    }

    #[test]
    fn a_gang_that_finished_as_kueue_evicts_it_succeeds_rather_than_running_again() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let w = admitted_workload();
        kueue_step(&mut j, &[], Some(&w), at(0));
        kueue_step(&mut j, &running(0), Some(&w), at(1));
        let evicted = WorkloadView {
            evicted: Some(("Preempted".into(), "Preempted".into())),
            ..w
        };
        let done: Vec<RankPod> = (0..4).map(|r| pod(r, 0, Succeeded)).collect();
        let d = kueue_step(&mut j, &done, Some(&evicted), at(2));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert!(d.events.iter().all(|e| e.reason != reasons::EVICTED));
    }

    #[test]
    fn pods_without_an_admitted_workload_stop_and_their_exits_are_no_failure() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let w = admitted_workload();
        kueue_step(&mut j, &[], Some(&w), at(0));
        kueue_step(&mut j, &running(0), Some(&w), at(1));
        // The Workload was deleted under the running gang.
        let d = kueue_step(&mut j, &running(0), None, at(2));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::DeletePods(names) if names.len() == 4))
        );
        assert_eq!(d.status.phase, Some(Phase::Queued));
        let stopping: Vec<RankPod> = (0..4)
            .map(|r| RankPod {
                terminating: true,
                ..pod(r, 0, failed(143, 3))
            })
            .collect();
        let d = kueue_step(&mut j, &stopping, None, at(3));
        assert_eq!(d.status.attempt, 0);
        assert!(d.status.last_failure.is_none());
        // Gone: the Workload is written again, and the job waits for it.
        let d = kueue_step(&mut j, &[], None, at(4));
        assert_eq!(d.actions, vec![Action::EnsureGangObjects]);
    }

    #[test]
    fn ranks_that_finished_count_as_ready_for_kueue() {
        let mut j = job("ddp-digits.yaml");
        j.spec.scheduling.gang_policy = GangPolicy::Kueue;
        let ready = WorkloadView {
            pods_ready: Some(true),
            ..admitted_workload()
        };
        kueue_step(&mut j, &[], Some(&ready), at(0));
        let mut pods = running(0);
        pods[3].state = Succeeded;
        let d = kueue_step(&mut j, &pods, Some(&ready), at(1));
        assert!(status_updates(&d).is_empty(), "{:?}", d.actions);
    }

    #[test]
    fn a_new_job_creates_every_rank_then_runs_then_succeeds() {
        let mut j = job("ddp-digits.yaml");
        let d = step(&mut j, &[], at(0));
        assert_eq!(d.status.phase, Some(Phase::Starting));
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 0,
            ranks: vec![0, 1, 2, 3],
            nodes: Some(vec!["n".into(); 4]),
            update: None,
        }));
        // Accepted and admitted in one pass: one Event says both.
        assert_eq!(d.events.len(), 1, "{:?}", d.events);
        assert_eq!(d.events[0].reason, reasons::GANG_ADMITTED);
        assert!(
            d.events[0].message.starts_with(
                "gang of 4 ranks accepted, and admitted: attempt 0: all 4 ranks placed"
            ),
            "{}",
            d.events[0].message
        );
        assert!(d.status.start_time.is_some());

        let half = vec![
            pod(0, 0, Running),
            pod(1, 0, Pending),
            pod(2, 0, Running),
            pod(3, 0, Running),
        ];
        let d = step(&mut j, &half, at(1));
        assert_eq!(
            (d.status.phase, d.actions.len()),
            (Some(Phase::Starting), 0)
        );

        let d = step(&mut j, &running(0), at(2));
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(
            d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            [reasons::GANG_STARTED]
        );
        // Events only on transitions: the same state again records nothing.
        assert!(step(&mut j, &running(0), at(3)).events.is_empty());

        let done: Vec<_> = (0..4).map(|r| pod(r, 0, Succeeded)).collect();
        let d = step(&mut j, &done, at(4));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert!(d.status.completion_time.is_some());
        assert_eq!(d.events[0].reason, reasons::JOB_SUCCEEDED);
    }

    #[test]
    fn the_status_written_before_the_pods_are_made_counts_them_so_their_arrival_changes_nothing() {
        let mut j = job("ddp-digits.yaml");
        let d = decide(&j, 4, &[], at(0)).answer_with(|| Outcome::Admitted(vec!["n".into(); 4]));
        let active = |s: &ParallelJobStatus| s.workers.as_ref().map(|w| w.active);
        assert_eq!(active(&d.status), Some(0), "what exists now");
        let written = d.status_to_write(j.status.as_ref()).into_owned();
        assert_eq!(active(&written), Some(4), "what the pass makes");
        assert_eq!(written.ready.as_deref(), Some("0/4"), "none is ready yet");
        j.status = Some(written.clone());
        // The pods arrive in the cache, created and still pending: the counts read the same, so
        // no second write is due.
        let made: Vec<_> = (0..4).map(|r| pod(r, 0, Pending)).collect();
        let d = decide(&j, 4, &made, at(1)).answer_with(|| unreachable!("pods exist"));
        assert_eq!(d.status, written);
        assert_eq!(d.status_to_write(j.status.as_ref()).into_owned(), written);

        // Two ranks of the attempt exist and two are made again in a pass that writes for
        // another reason (a new job, here): four in all.
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        let some = vec![pod(0, 0, Pending), pod(2, 0, Pending)];
        let d = decide(&j, 4, &some, at(1)).answer_with(|| unreachable!("pods exist"));
        assert!(d.actions.iter().any(|a| matches!(
            a,
            Action::CreatePods { ranks, .. } if ranks == &vec![1, 3]
        )));
        assert_eq!(active(&d.status), Some(2));
        assert_eq!(active(&d.status_to_write(None)), Some(4));
        // A pass that would change the counts alone (its creations failed before, and it tries
        // again) writes what exists: a refused creation is not counted for long.
        let mut failed = d.status.clone();
        failed.workers.as_mut().unwrap().active = 4;
        assert_eq!(active(&d.status_to_write(Some(&failed))), Some(2));
        assert_eq!(active(&d.status_to_write(Some(&d.status))), Some(2));
    }

    #[test]
    fn a_failed_rank_restarts_the_whole_gang_and_the_first_failure_is_kept() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        // Rank 2 is killed at t=10; rank 0 and 3 exit later because of it (a cascade).
        let mut pods = running(0);
        pods[2].state = failed(137, 10);
        pods[0].state = failed(5, 11);
        pods[3].state = failed(6, 12);
        let d = step(&mut j, &pods, at(20));
        let lf = d.status.last_failure.clone().unwrap();
        assert_eq!(
            (lf.rank, lf.exit_code, lf.attempt),
            (2, Some(137), 0),
            "{lf:?}"
        );
        assert_eq!(d.status.attempt, 1);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert!(matches!(&d.actions[0], Action::DeletePods(names) if names.len() == 4));
        let reasons_seen: Vec<_> = d.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons_seen,
            [reasons::RANK_FAILED, reasons::GANG_RESTARTING]
        );

        // Old pods still terminating: nothing new is created, they are not deleted twice.
        let terminating: Vec<_> = pods
            .iter()
            .cloned()
            .map(|mut p| {
                p.terminating = true;
                p
            })
            .collect();
        let d = step(&mut j, &terminating, at(21));
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        // Gone, but inside the backoff (10 s for the first restart): wait.
        let d = step(&mut j, &[], at(25));
        assert!(d.actions.is_empty());
        assert!(
            d.requeue_after
                .is_some_and(|r| r <= Duration::from_secs(10))
        );
        // After the backoff: attempt 1 starts, lastFailure still names rank 2.
        let d = step(&mut j, &[], at(31));
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 1,
            ranks: vec![0, 1, 2, 3],
            nodes: Some(vec!["n".into(); 4]),
            update: None,
        }));
        assert_eq!(d.status.last_failure.unwrap().rank, 2);
    }

    /// What a survivor's pod shows: exit 5, naming the rank the rendezvous holds for the first
    /// failure, at `at(secs)`.
    fn stopped_by(first: u32, secs: i64) -> PodState {
        Failed(Failure {
            exit_code: Some(5),
            reason: FailureReason::PeerFailed,
            detail: "PeerFailed".into(),
            message: format!(
                "PeerFailed: {}",
                aborted::message(&format!("rank {first} failed: lost (reported by rank 0)"))
            ),
            time: Some(at(secs)),
        })
    }

    fn exited(code: i32, secs: i64) -> PodState {
        Failed(Failure {
            exit_code: Some(code),
            reason: FailureReason::Error,
            detail: "Error".into(),
            message: format!("exit {code}"),
            time: Some(at(secs)),
        })
    }

    #[test]
    fn the_rank_a_survivor_names_is_the_first_failure_and_is_awaited_while_its_pod_runs() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        // Rank 1 was killed; rank 0 saw it first, and its pod is the first to show a failure.
        let mut pods = running(0);
        pods[0].state = stopped_by(1, 10);
        let d = step(&mut j, &pods, at(10));
        assert_eq!(
            (d.status.last_failure.as_ref(), d.status.attempt),
            (None, 0)
        );
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert!(d.requeue_after.is_some_and(|r| r <= Duration::from_secs(1)));
        // Rank 1's pod shows its 137; rank 3's own error carries an earlier time (clocks have a
        // second's resolution): the rendezvous's word decides.
        pods[1].state = exited(137, 10);
        pods[3].state = exited(6, 9);
        let d = step(&mut j, &pods, at(11));
        let lf = d.status.last_failure.clone().unwrap();
        assert_eq!((lf.rank, lf.exit_code), (1, Some(137)), "{lf:?}");
        assert_eq!(d.status.attempt, 1);
    }

    /// What a rank's pod shows after an agreed stop: exit 143 with the trainer's stop message.
    fn terminated(message: String, secs: i64) -> PodState {
        Failed(Failure {
            exit_code: Some(143),
            reason: FailureReason::Error,
            detail: "Terminated".into(),
            message: format!("Terminated: {message}"),
            time: Some(at(secs)),
        })
    }

    #[test]
    fn an_agreed_stop_is_blamed_on_the_rank_that_received_sigterm_not_the_first_to_exit() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        // Rank 1's pod was deleted; the gang stopped after the same step, and rank 0 (which
        // names rank 1) exited in the same second, so it sorts first by time and rank.
        let mut pods = running(0);
        let stop = |m: &str| format!("{m} after step 9 of 100: a checkpoint of step 9 is in /c");
        pods[0].state = terminated(stop(&aborted::stopped_for(1)), 10);
        pods[1].state = terminated(stop("stopped by SIGTERM"), 10);
        pods[2].state = terminated(stop(&aborted::stopped_for(1)), 10);
        pods[3].state = terminated(stop(&aborted::stopped_for(1)), 10);
        let d = step(&mut j, &pods, at(11));
        let lf = d.status.last_failure.clone().unwrap();
        assert_eq!((lf.rank, lf.exit_code), (1, Some(143)), "{lf:?}");
    }

    #[test]
    fn a_node_clock_ahead_of_the_operator_gets_no_wait() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        let mut pods = running(0);
        // The survivor's finishedAt is 60 s in the operator's future.
        pods[0].state = stopped_by(1, 70);
        let d = step(&mut j, &pods, at(10));
        assert_eq!(d.status.attempt, 1, "the restart waited on a skewed clock");
    }

    #[test]
    fn a_survivor_is_blamed_only_when_the_rank_it_names_shows_nothing_in_time() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        let mut pods = running(0);
        pods[0].state = stopped_by(1, 10);
        let wait = i64::try_from(FIRST_FAILURE_WAIT.as_secs()).unwrap();
        assert!(
            step(&mut j, &pods, at(10 + wait - 1))
                .status
                .last_failure
                .is_none()
        );
        let d = step(&mut j, &pods, at(10 + wait));
        let lf = d.status.last_failure.clone().unwrap();
        assert_eq!((lf.rank, lf.exit_code), (0, Some(5)), "{lf:?}");
        assert_eq!(d.status.attempt, 1);
    }

    #[test]
    fn a_fail_job_rule_fails_at_once_naming_the_first_failure() {
        let mut j = job("torch-command.yaml"); // rules: FailJob on exit code 2
        step(&mut j, &[], at(0));
        let mut pods = running(0);
        pods[1].state = failed(2, 5);
        let d = step(&mut j, &pods, at(6));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        let failed_cond = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::FAILED)
            .unwrap();
        assert_eq!(failed_cond.reason, reasons::FAILED_BY_RULE);
        assert!(
            failed_cond.message.contains("rank 1"),
            "{}",
            failed_cond.message
        );
        assert_eq!(d.status.attempt, 0);
    }

    #[test]
    fn permanent_worker_errors_fail_by_default_and_restarts_run_out() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        let mut pods = running(0);
        pods[0].state = failed(ExitCode::Config.code(), 1);
        assert_eq!(step(&mut j, &pods, at(2)).status.phase, Some(Phase::Failed));

        let mut j = job("ddp-digits.yaml");
        j.spec.failure_policy.max_restarts = 1;
        step(&mut j, &[], at(0));
        let mut pods = running(0);
        pods[3].state = failed(1, 1);
        assert_eq!(step(&mut j, &pods, at(2)).status.attempt, 1);
        step(&mut j, &[], at(100));
        let mut pods = running(1);
        pods[1].state = failed(1, 200);
        let d = step(&mut j, &pods, at(300));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        let c = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::FAILED)
            .unwrap();
        assert_eq!(c.reason, reasons::BACKOFF_LIMIT_EXCEEDED);
        assert!(c.message.contains("rank 1"), "{}", c.message);
    }

    fn request_restart(j: &mut ParallelJob, value: &str) {
        j.metadata
            .annotations
            .get_or_insert_default()
            .insert(annotations::RESTARTED_AT.into(), value.into());
    }

    fn reasons_of(d: &Decision) -> Vec<(&'static str, bool)> {
        d.events.iter().map(|e| (e.reason, e.warning)).collect()
    }

    #[test]
    fn a_requested_restart_tears_the_running_gang_down_and_starts_the_next_attempt_at_once() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        request_restart(&mut j, "2026-12-03T22:00:00Z");
        let d = step(&mut j, &running(0), at(2));
        assert_eq!(d.status.attempt, 1);
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert_eq!(
            d.status.restarted_at.as_deref(),
            Some("2026-12-03T22:00:00Z")
        );
        assert_eq!(d.status.requested_restarts, 1);
        assert_eq!(d.status.last_failure, None, "no failure is recorded");
        assert!(matches!(&d.actions[..], [Action::DeletePods(n)] if n.len() == 4));
        assert_eq!(reasons_of(&d), [(reasons::RESTART_REQUESTED, false)]);
        assert!(
            d.events[0].message.contains("2026-12-03T22:00:00Z")
                && d.events[0].message.contains("attempt 1"),
            "{}",
            d.events[0].message
        );
        let restarting = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::RESTARTING)
            .unwrap();
        assert_eq!(
            (restarting.status.as_str(), restarting.reason.as_str()),
            ("True", reasons::RESTART_REQUESTED)
        );
        // The old pods go; then attempt 1 starts with no backoff, and runs.
        let d = step(&mut j, &running(0), at(3));
        assert_eq!(d.status.phase, Some(Phase::Restarting));
        assert!(d.events.is_empty(), "answered once: {:?}", d.events);
        let d = step(&mut j, &[], at(4));
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 1,
            ranks: vec![0, 1, 2, 3],
            nodes: Some(vec!["n".into(); 4]),
            update: None,
        }));
        let d = step(&mut j, &running(1), at(5));
        assert_eq!(d.status.phase, Some(Phase::Running));
        assert_eq!(d.status.attempt, 1);
        // The same value again asks for nothing; a new one restarts again.
        let d = step(&mut j, &running(1), at(6));
        assert!(d.actions.is_empty() && d.events.is_empty());
        request_restart(&mut j, "2026-12-03T22:05:00Z");
        let d = step(&mut j, &running(1), at(7));
        assert_eq!((d.status.attempt, d.status.requested_restarts), (2, 2));
        // An empty value asks for nothing.
        let mut k = job("ddp-digits.yaml");
        step(&mut k, &[], at(0));
        step(&mut k, &running(0), at(1));
        request_restart(&mut k, "");
        let d = step(&mut k, &running(0), at(2));
        assert_eq!((d.status.attempt, d.status.restarted_at), (0, None));
    }

    #[test]
    fn requested_restarts_count_neither_against_max_restarts_nor_in_the_backoff() {
        let mut j = job("ddp-digits.yaml");
        j.spec.failure_policy.max_restarts = 0;
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        request_restart(&mut j, "a");
        assert_eq!(step(&mut j, &running(0), at(2)).status.attempt, 1);
        step(&mut j, &[], at(3));
        request_restart(&mut j, "b");
        let d = step(&mut j, &running(1), at(4));
        assert_eq!(d.status.attempt, 2);
        assert_ne!(d.status.phase, Some(Phase::Failed));
        step(&mut j, &[], at(5));
        // The first failure still fails the job: no failure restart is allowed.
        let mut pods = running(2);
        pods[1].state = failed(1, 5);
        let d = step(&mut j, &pods, at(6));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert!(d.status.conditions.iter().any(|c| c.type_ == ct::FAILED
            && c.reason == reasons::BACKOFF_LIMIT_EXCEEDED
            && c.message.contains("all 0 gang restarts used")));

        // With one restart allowed, after two requested ones: the failure restarts the gang
        // after the first restart's backoff (10 s), not the third's (40 s).
        let mut j = job("ddp-digits.yaml");
        j.spec.failure_policy.max_restarts = 1;
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        request_restart(&mut j, "a");
        step(&mut j, &running(0), at(2));
        step(&mut j, &[], at(3));
        request_restart(&mut j, "b");
        step(&mut j, &running(1), at(4));
        step(&mut j, &[], at(5));
        let mut pods = running(2);
        pods[0].state = failed(1, 1_006);
        let d = step(&mut j, &pods, at(6));
        assert_eq!(
            (d.status.attempt, d.status.phase),
            (3, Some(Phase::Restarting))
        );
        assert!(
            d.events
                .iter()
                .any(|e| e.reason == reasons::GANG_RESTARTING && e.message.contains("in 10s"))
        );
        assert!(step(&mut j, &[], at(12)).actions.is_empty(), "backing off");
        let d = step(&mut j, &[], at(17));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { attempt: 3, .. }))
        );
    }

    #[test]
    fn a_restart_is_not_requested_by_a_job_created_with_the_annotation() {
        let mut j = job("ddp-digits.yaml");
        request_restart(&mut j, "2026-12-03T22:00:00Z");
        let d = step(&mut j, &[], at(0));
        assert_eq!(
            d.status.restarted_at.as_deref(),
            Some("2026-12-03T22:00:00Z")
        );
        assert!(
            !d.events
                .iter()
                .any(|e| e.reason == reasons::RESTART_REQUESTED),
            "{:?}",
            d.events
        );
        let d = step(&mut j, &running(0), at(1));
        assert_eq!(
            (d.status.attempt, d.status.phase),
            (0, Some(Phase::Running))
        );
        assert_eq!(d.status.requested_restarts, 0);
    }

    #[test]
    fn a_restart_requested_without_a_running_gang_is_answered_without_one() {
        // Suspended: nothing to tear down; resuming starts the same attempt, once.
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        j.spec.run_policy.suspend = true;
        step(&mut j, &running(0), at(2));
        request_restart(&mut j, "a");
        let d = step(&mut j, &[], at(3));
        assert_eq!(d.status.phase, Some(Phase::Suspended));
        assert_eq!(d.status.restarted_at.as_deref(), Some("a"));
        assert_eq!(reasons_of(&d), [(reasons::RESTART_REQUESTED, false)]);
        assert!(d.events[0].message.contains("phase Suspended"));
        j.spec.run_policy.suspend = false;
        let d = step(&mut j, &[], at(4));
        assert_eq!((d.status.attempt, d.status.requested_restarts), (0, 0));
        let d = step(&mut j, &running(0), at(5));
        assert_eq!(
            (d.status.attempt, d.status.phase),
            (0, Some(Phase::Running))
        );

        // Restarting after a failure already: no second restart.
        let mut pods = running(0);
        pods[1].state = failed(1, 5);
        step(&mut j, &pods, at(6));
        request_restart(&mut j, "b");
        let d = step(&mut j, &pods, at(7));
        assert_eq!(
            (d.status.attempt, d.status.phase),
            (1, Some(Phase::Restarting))
        );
        assert_eq!(d.status.restarted_at.as_deref(), Some("b"));
        assert_eq!(reasons_of(&d), [(reasons::RESTART_REQUESTED, false)]);
        assert_eq!(d.status.last_failure.unwrap().rank, 1, "the failure stays");

        // Queued, no pod yet: answered, then admitted as ever.
        let mut q = job("ddp-digits.yaml");
        let d = decide(&q, 4, &[], at(0)).answer_with(|| wait(reasons::QUEUED_BEHIND, 2));
        q.status = Some(d.status);
        request_restart(&mut q, "c");
        let d = decide(&q, 4, &[], at(1)).answer_with(|| wait(reasons::QUEUED_BEHIND, 2));
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(d.status.restarted_at.as_deref(), Some("c"));
        assert_eq!(d.status.attempt, 0);
        assert!(
            d.events
                .iter()
                .any(|e| e.reason == reasons::RESTART_REQUESTED)
        );

        // Finished: ignored with a Warning, once.
        let mut f = job("ddp-digits.yaml");
        step(&mut f, &[], at(0));
        step(&mut f, &running(0), at(1));
        let done: Vec<RankPod> = (0..4).map(|r| pod(r, 0, Succeeded)).collect();
        assert_eq!(
            step(&mut f, &done, at(2)).status.phase,
            Some(Phase::Succeeded)
        );
        request_restart(&mut f, "d");
        let d = step(&mut f, &done, at(3));
        assert_eq!(d.status.phase, Some(Phase::Succeeded));
        assert_eq!(d.status.restarted_at.as_deref(), Some("d"));
        assert_eq!(reasons_of(&d), [(reasons::RESTART_IGNORED, true)]);
        assert!(d.events[0].message.contains("Succeeded"));
        assert!(step(&mut f, &done, at(4)).events.is_empty());
    }

    #[test]
    fn suspend_deletes_pods_and_resume_starts_again() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        j.spec.run_policy.suspend = true;
        let d = step(&mut j, &running(0), at(1));
        assert_eq!(d.status.phase, Some(Phase::Suspended));
        assert!(matches!(&d.actions[0], Action::DeletePods(n) if n.len() == 4));
        j.spec.run_policy.suspend = false;
        let d = step(&mut j, &[], at(2));
        assert_eq!(d.status.phase, Some(Phase::Starting));
        assert!(
            d.actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { .. }))
        );
        assert!(d.events.iter().any(|e| e.reason == reasons::JOB_RESUMED));
    }

    #[test]
    fn the_deadline_fails_the_job_and_ttl_deletes_it() {
        let mut j = job("ddp-digits.yaml");
        j.spec.run_policy.active_deadline_seconds = Some(60);
        j.spec.run_policy.ttl_seconds_after_finished = Some(30);
        step(&mut j, &[], at(0));
        assert!(
            step(&mut j, &running(0), at(30))
                .requeue_after
                .is_some_and(|r| r <= Duration::from_secs(30))
        );
        let d = step(&mut j, &running(0), at(61));
        assert_eq!(d.status.phase, Some(Phase::Failed));
        assert_eq!(
            d.status
                .conditions
                .iter()
                .find(|c| c.type_ == ct::FAILED)
                .unwrap()
                .reason,
            reasons::DEADLINE_EXCEEDED
        );
        assert!(matches!(&d.actions[0], Action::DeletePods(n) if n.len() == 4));
        assert!(
            !step(&mut j, &[], at(70))
                .actions
                .contains(&Action::DeleteJob)
        );
        assert!(
            step(&mut j, &[], at(92))
                .actions
                .contains(&Action::DeleteJob)
        );
    }

    #[test]
    fn a_pod_deleted_while_running_is_a_failure() {
        let mut j = job("ddp-digits.yaml");
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        let three: Vec<_> = running(0).into_iter().filter(|p| p.rank != 1).collect();
        let d = step(&mut j, &three, at(2));
        let lf = d.status.last_failure.unwrap();
        assert_eq!((lf.rank, lf.reason.as_str()), (1, "Deleted"));
        assert_eq!(d.status.phase, Some(Phase::Restarting));
    }

    #[test]
    fn rules_match_on_codes_and_reasons_in_order() {
        use lockstep_api::spec::{ExitCodeRange, FailureRule};
        let rules = vec![
            FailureRule {
                action: FailureAction::Ignore,
                exit_codes: Some(vec![ExitCodeRange { from: 42, to: None }]),
                reasons: None,
            },
            FailureRule {
                action: FailureAction::FailJob,
                exit_codes: Some(vec![ExitCodeRange {
                    from: 128,
                    to: Some(255),
                }]),
                reasons: Some(vec![FailureReason::OOMKilled]),
            },
        ];
        let f = |code: i32, reason| Failure {
            exit_code: Some(code),
            reason,
            detail: String::new(),
            message: String::new(),
            time: None,
        };
        assert_eq!(
            action_for(&rules, &f(42, FailureReason::Error)),
            FailureAction::Ignore
        );
        assert_eq!(
            action_for(&rules, &f(137, FailureReason::OOMKilled)),
            FailureAction::FailJob
        );
        assert_eq!(
            action_for(&rules, &f(137, FailureReason::Error)),
            FailureAction::RestartGang,
            "both matchers must match"
        );
        assert_eq!(
            action_for(&[], &f(ExitCode::Checkpoint.code(), FailureReason::Error)),
            FailureAction::FailJob
        );
    }

    #[test]
    fn a_gpu_request_no_node_can_meet_is_explained_then_cleared() {
        let mut job = job("ddp-digits.yaml");
        job.spec.parallelism.gpus_per_worker = 8;
        let now = Timestamp::now();
        let mut d =
            decide(&job, 2, &[], now).answer_with(|| Outcome::Admitted(vec!["n".into(); 2]));
        check_capacity(&mut d, &job, 0, now);
        let c = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::VALID)
            .expect("a Valid condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reasons::INVALID_SPEC)
        );
        assert!(
            c.message
                .contains("no node of this cluster offers nvidia.com/gpu"),
            "{}",
            c.message
        );
        assert!(d.events.iter().any(|e| e.reason == reasons::INVALID_SPEC));
        // Admission decides about the pods; the condition does not stop them.
        assert!(!d.actions.is_empty());

        // Reported once: the same shortfall next time adds no Event.
        job.status = Some(d.status.clone());
        let mut again =
            decide(&job, 2, &[], now).answer_with(|| Outcome::Admitted(vec!["n".into(); 2]));
        check_capacity(&mut again, &job, 4, now);
        let c = again
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::VALID)
            .expect("Valid");
        assert!(
            c.message
                .contains("the largest node of this cluster offers 4"),
            "{}",
            c.message
        );
        job.status = Some(again.status.clone());
        let mut same =
            decide(&job, 2, &[], now).answer_with(|| Outcome::Admitted(vec!["n".into(); 2]));
        check_capacity(&mut same, &job, 4, now);
        assert!(
            !same
                .events
                .iter()
                .any(|e| e.reason == reasons::INVALID_SPEC)
        );

        // A node with 8 GPUs joins: the condition goes.
        let mut fits =
            decide(&job, 2, &[], now).answer_with(|| Outcome::Admitted(vec!["n".into(); 2]));
        check_capacity(&mut fits, &job, 8, now);
        assert!(!fits.status.conditions.iter().any(|c| c.type_ == ct::VALID));
    }

    fn admitted(d: &Decision) -> &Condition {
        d.status
            .conditions
            .iter()
            .find(|c| c.type_ == ct::ADMITTED)
            .expect("an Admitted condition")
    }

    fn wait(reason: &'static str, position: usize) -> Outcome {
        Outcome::Waiting {
            reason,
            message: "needs 8 nvidia.com/gpu".into(),
            position,
        }
    }

    #[test]
    fn a_gang_waits_in_the_queue_then_is_admitted_gated_and_released_together() {
        let mut j = job("ddp-digits.yaml");
        j.metadata.name = Some("j".into());
        j.metadata.creation_timestamp = Some(Time(at(0)));
        j.spec.scheduling.schedule_timeout_seconds = Some(60);
        let d = decide(&j, 4, &[], at(1)).answer_with(|| wait(reasons::INSUFFICIENT_CAPACITY, 2));
        j.status = Some(d.status.clone());
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert!(
            d.actions.is_empty(),
            "a queued gang makes nothing: {:?}",
            d.actions
        );
        let c = admitted(&d);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", reasons::INSUFFICIENT_CAPACITY)
        );
        assert_eq!(d.status.admission.as_ref().unwrap().queue_position, Some(2));
        assert!(
            d.events
                .iter()
                .any(|e| e.message.contains("waits for admission at position 2"))
        );
        // Looked at again before the timeout, and the position refresh.
        assert_eq!(d.requeue_after, Some(QUEUE_REFRESH));

        // Past scheduleTimeoutSeconds: a Warning once, and it keeps waiting.
        let d = decide(&j, 4, &[], at(70)).answer_with(|| wait(reasons::INSUFFICIENT_CAPACITY, 1));
        j.status = Some(d.status.clone());
        let c = admitted(&d);
        assert_eq!(c.reason, reasons::ADMISSION_TIMEOUT);
        assert!(
            c.message.contains("scheduleTimeoutSeconds (60s)"),
            "{}",
            c.message
        );
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == reasons::ADMISSION_TIMEOUT)
        );
        let again =
            decide(&j, 4, &[], at(80)).answer_with(|| wait(reasons::INSUFFICIENT_CAPACITY, 1));
        assert!(
            !again
                .events
                .iter()
                .any(|e| e.reason == reasons::ADMISSION_TIMEOUT)
        );

        // Admitted: the plan is recorded before any pod, pods are created gated on their nodes.
        let plan: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let d = decide(&j, 4, &[], at(100)).answer_with(|| Outcome::Admitted(plan.clone()));
        j.status = Some(d.status.clone());
        let a = d.status.admission.clone().unwrap();
        assert_eq!((a.attempt, a.nodes.clone()), (Some(0), plan.clone()));
        assert_eq!(
            a.wait_seconds,
            Some(99.0),
            "queued since the job was created"
        );
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 0,
            ranks: vec![0, 1, 2, 3],
            nodes: Some(plan.clone()),
            update: None,
        }));
        assert_eq!(d.status.phase, Some(Phase::Starting));

        // Admission is not asked again; two ranks exist: the other two are made on their nodes.
        let mut made: Vec<RankPod> = (0..2)
            .map(|r| RankPod {
                gated: true,
                node: None,
                ..pod(r, 0, Pending)
            })
            .collect();
        let d = decide(&j, 4, &made, at(101)).answer_with(|| panic!("admission asked twice"));
        j.status = Some(d.status.clone());
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 0,
            ranks: vec![2, 3],
            nodes: Some(plan[2..].to_vec()),
            update: None,
        }));
        // Released in the same pass, only after the creations that make the gang whole.
        let create = d
            .actions
            .iter()
            .position(|a| matches!(a, Action::CreatePods { .. }));
        let ungate = d
            .actions
            .iter()
            .position(|a| matches!(a, Action::Ungate(_)));
        assert!(create < ungate, "{:?}", d.actions);
        assert_eq!(
            d.actions[ungate.unwrap()],
            Action::Ungate((0..4).map(|r| format!("j-{r}")).collect())
        );
        // The whole gang exists: every gate goes at once.
        made.extend((2..4).map(|r| RankPod {
            gated: true,
            node: None,
            ..pod(r, 0, Pending)
        }));
        let d = decide(&j, 4, &made, at(102)).answer_with(|| panic!("admission asked twice"));
        assert_eq!(
            d.actions,
            vec![Action::Ungate((0..4).map(|r| format!("j-{r}")).collect())]
        );
    }

    #[test]
    fn a_restarted_attempt_waits_from_its_restart_not_from_the_jobs_creation() {
        let mut j = job("ddp-digits.yaml");
        j.metadata.creation_timestamp = Some(Time(at(0)));
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        let mut pods = running(0);
        pods[1].state = failed(1, 2);
        // The gang restarts at 80 s; attempt 1 is admitted at 140 s, once the old pods are gone
        // and the backoff has passed.
        let d = step(&mut j, &pods, at(80));
        assert_eq!(d.status.attempt, 1);
        assert_eq!(
            admitted(&d).status,
            "False",
            "attempt 1 is not admitted yet"
        );
        let d = step(&mut j, &[], at(140));
        let a = d.status.admission.clone().expect("admitted");
        assert_eq!(a.attempt, Some(1));
        assert_eq!(
            a.wait_seconds,
            Some(60.0),
            "attempt 1 waited from its restart"
        );
        assert!(
            admitted(&d).message.contains("after 60.0s"),
            "{}",
            admitted(&d).message
        );
    }

    #[test]
    fn a_restarted_or_resumed_gang_goes_back_through_admission() {
        let mut j = job("ddp-digits.yaml");
        let mut asked = 0;
        step(&mut j, &[], at(0));
        step(&mut j, &running(0), at(1));
        let mut pods = running(0);
        pods[1].state = failed(1, 2);
        let d = step(&mut j, &pods, at(3));
        assert_eq!(d.status.attempt, 1);
        // The old pods are gone and the backoff has passed: attempt 1 asks admission again.
        let d = decide(&j, 4, &[], at(60)).answer_with(|| {
            asked += 1;
            wait(reasons::QUEUED_BEHIND, 1)
        });
        assert_eq!(asked, 1);
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(d.status.admission.as_ref().unwrap().attempt, Some(1));
        j.status = Some(d.status);

        // Suspending gives the reservation back: resuming is admitted anew.
        j.spec.run_policy.suspend = true;
        let d = step(&mut j, &[], at(61));
        assert_eq!(d.status.admission, None);
    }

    #[test]
    fn a_gang_its_quota_refused_waits_queued_without_pods_then_is_admitted_whole() {
        let mut j = job("ddp-digits.yaml");
        j.metadata.name = Some("j".into());
        let plan: Vec<String> = ["a", "a", "b", "b"].map(String::from).to_vec();
        let before = j.status.clone();
        let d = decide(&j, 4, &[], at(1)).answer_with(|| Outcome::Admitted(plan.clone()));
        assert_eq!(d.status.phase, Some(Phase::Starting));
        // Creating the pods, the API server says the quota is used up: what reconcile reports.
        let message = "ResourceQuota team-cpu: requested: requests.cpu=500m";
        let mut status = d.status.clone();
        assert!(wait_unadmitted(
            &mut status,
            before.as_ref(),
            reasons::QUOTA_EXCEEDED,
            message,
            Some(1),
            at(2)
        ));
        j.status = Some(status.clone());
        assert_eq!(status.phase, Some(Phase::Queued));
        assert_eq!(status.admission, None, "the capacity is given back");
        let reported = d_of(&status);
        let c = admitted(&reported);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            ("False", reasons::QUOTA_EXCEEDED, message)
        );
        assert!(
            !status.conditions.iter().any(|c| c.type_ == ct::VALID),
            "not a rejected template"
        );
        // Said again, it is no news (no second Event), and the wait keeps its start.
        let mut again = status.clone();
        assert!(!wait_unadmitted(
            &mut again,
            j.status.as_ref(),
            reasons::QUOTA_EXCEEDED,
            message,
            Some(1),
            at(9)
        ));
        assert_eq!(again, status);

        // While it waits, a pass makes nothing: two ranks made before the refusal go, admission
        // is not asked, and the job stays as reported.
        let made: Vec<RankPod> = (0..2)
            .map(|r| RankPod {
                gated: true,
                node: None,
                ..pod(r, 0, Pending)
            })
            .collect();
        let retry_in = Duration::from_secs(5);
        let d = hold_gang(
            decide(&j, 4, &made, at(3)),
            &j,
            &made,
            reasons::QUOTA_EXCEEDED,
            message,
            retry_in,
            at(3),
        );
        assert_eq!(
            d.actions,
            vec![Action::DeletePods(vec!["j-0".into(), "j-1".into()])]
        );
        assert_eq!(d.status.phase, Some(Phase::Queued));
        assert_eq!(admitted(&d).reason, reasons::QUOTA_EXCEEDED);
        assert!(d.events.is_empty(), "{:?}", d.events);
        assert!(d.requeue_after.is_some_and(|r| r <= retry_in));
        let d = hold_gang(
            decide(&j, 4, &[], at(4)),
            &j,
            &[],
            reasons::QUOTA_EXCEEDED,
            message,
            retry_in,
            at(4),
        );
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(Some(&d.status), j.status.as_ref(), "nothing to write");

        // The wait is over: the gang is admitted again and made whole, on its planned nodes.
        let d = decide(&j, 4, &[], at(8)).answer_with(|| Outcome::Admitted(plan.clone()));
        assert!(d.actions.contains(&Action::CreatePods {
            attempt: 0,
            ranks: vec![0, 1, 2, 3],
            nodes: Some(plan.clone()),
            update: None,
        }));
        assert!(
            d.actions
                .contains(&Action::Ungate((0..4).map(|r| format!("j-{r}")).collect()))
        );
        assert_eq!(admitted(&d).reason, reasons::GANG_ADMITTED);

        // A pass that makes nothing of the gang (here: the job is suspended while it waits) is
        // decided as ever.
        j.spec.run_policy.suspend = true;
        let undisturbed = decide(&j, 4, &made, at(5)).answer_with(|| panic!("admission asked"));
        let held = hold_gang(
            decide(&j, 4, &made, at(5)),
            &j,
            &made,
            reasons::QUOTA_EXCEEDED,
            message,
            retry_in,
            at(5),
        );
        assert_eq!(held, undisturbed);
        assert_eq!(held.status.phase, Some(Phase::Suspended));
    }

    fn d_of(status: &ParallelJobStatus) -> Decision {
        Decision {
            status: status.clone(),
            actions: Vec::new(),
            events: Vec::new(),
            requeue_after: None,
        }
    }
}
