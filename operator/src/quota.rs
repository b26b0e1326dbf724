//! What a ResourceQuota refusal says, and whether waiting can help.
//!
//! The API server's ResourceQuota admission refuses a create with 403 Forbidden in two kinds of
//! cases, and they mean opposite things to a job:
//!
//! - **Usage** (transient): `exceeded quota: <name>, requested: ..., used: ..., limited: ...`,
//!   or `status unknown for quota: <name>, resources: ...` (a quota the controller has not
//!   counted yet). What the namespace uses changes as other pods finish, and an administrator may
//!   raise or delete the quota: the gang waits and is tried again.
//! - **Constraints** (permanent, the template's own shape): `failed quota: <name>: must specify
//!   ...` (the quota tracks a resource the template's containers do not request or limit),
//!   `insufficient quota to consume: ...` (the resource needs a covering quota that the namespace
//!   does not have), `quota usage is negative ...`. The same template is refused the same way
//!   every time, so these stay `TemplateRejected` until the job is changed.
//!
//! Only the usage refusals are read here ([`Refusal::read`]); everything else is left to the
//! caller's handling of a refused template. [`Hold`] is the wait that follows one.

use std::time::{Duration, Instant};

use lockstep_api::status::reasons;

use crate::backoff::Backoff;

/// A create the namespace's ResourceQuota refused because of what is used: waiting may help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The ResourceQuota's name.
    pub quota: String,
    /// The resource of the refused object (`pods`, `services`, ...), as the API server names it.
    pub resource: String,
    /// Why it refused.
    pub why: Why,
}

/// Why a ResourceQuota refused a create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// The object would take the namespace's usage over the quota (the API server's
    /// `name=quantity` lists, comma-separated, of the resources that would be exceeded).
    Exceeded {
        /// What the object asked for.
        requested: String,
        /// What the namespace used already.
        used: String,
        /// The quota's limits.
        limited: String,
    },
    /// The quota controller has not yet counted what the namespace uses of these resources.
    Uncounted {
        /// The resources not counted yet.
        resources: String,
    },
}

impl Refusal {
    /// Reads the API server's answer `code` and `message` to a create: `Some` for a
    /// ResourceQuota usage refusal, `None` for anything else (a quota constraint the template does
    /// not meet included, see the module's documentation).
    pub fn read(code: u16, message: &str) -> Option<Refusal> {
        if code != 403 {
            return None;
        }
        // `<resource> "<name>" is forbidden: <reason>` (or `<resource> is forbidden: ...`).
        let (object, reason) = message.split_once(" is forbidden: ")?;
        let resource = object.split_whitespace().next()?.to_string();
        if let Some(rest) = reason.strip_prefix("exceeded quota: ") {
            let (quota, rest) = rest.split_once(", requested: ")?;
            let (requested, rest) = rest.split_once(", used: ")?;
            let (used, limited) = rest.split_once(", limited: ")?;
            return Some(Refusal {
                quota: quota.to_string(),
                resource,
                why: Why::Exceeded {
                    requested: requested.to_string(),
                    used: used.to_string(),
                    limited: limited.trim_end().to_string(),
                },
            });
        }
        let rest = reason.strip_prefix("status unknown for quota: ")?;
        let (quota, resources) = rest.split_once(", resources: ")?;
        Some(Refusal {
            quota: quota.to_string(),
            resource,
            why: Why::Uncounted {
                resources: resources.trim_end().to_string(),
            },
        })
    }

    /// What the job's condition says: the quota, what was asked and why it waits, for a gang of
    /// `world` ranks.
    pub fn explain(&self, world: u32) -> String {
        let Refusal {
            quota, resource, ..
        } = self;
        let cause = match &self.why {
            Why::Exceeded {
                requested,
                used,
                limited,
            } => format!(
                "the namespace's ResourceQuota {quota} does not hold the whole gang: creating its \
                 {resource} exceeded it (requested: {requested}, used: {used}, limited: {limited})"
            ),
            Why::Uncounted { resources } => format!(
                "the namespace's ResourceQuota {quota} has not counted what is used of \
                 {resources} yet, and refused the gang's {resource}"
            ),
        };
        format!(
            "{cause}; no part of the gang is kept, and all {world} ranks are tried again, with \
             backoff, until the quota admits them (raise or delete the quota, or free what it \
             counts)"
        )
    }
}

/// A gang's wait, as the operator keeps it between passes: for its namespace's ResourceQuota, or
/// for objects with names it needs that are not the job's own to go (see
/// [`crate::ownership`]). It keeps the reason and message of the job's condition, and when the
/// next try is due. Every refusal in a row doubles the wait (see [`crate::backoff`]), up to
/// [`CONFLICT_MAX_WAIT`] for objects in the way (a user who deletes them should not wait
/// minutes); a gang that is created resets it (the operator drops the whole `Hold`).
#[derive(Clone, Debug, Default)]
pub struct Hold {
    uid: Option<String>,
    reason: &'static str,
    message: String,
    backoff: Backoff,
    until: Option<Instant>,
}

/// The longest wait between two tries of a gang that objects not its own stand in the way of.
pub const CONFLICT_MAX_WAIT: Duration = Duration::from_secs(30);

impl Hold {
    /// Records, at `now`, a refusal of the gang of the job `uid` (a job deleted and created
    /// again under its name starts a count of its own), with the condition's `reason` and
    /// `message`; returns how long until the next try.
    pub fn refused(
        &mut self,
        uid: Option<String>,
        reason: &'static str,
        message: String,
        now: Instant,
    ) -> Duration {
        if self.uid != uid {
            self.backoff.reset();
        }
        let mut wait = self.backoff.fail();
        if reason == reasons::OBJECT_CONFLICT {
            wait = wait.min(CONFLICT_MAX_WAIT);
        }
        self.uid = uid;
        self.reason = reason;
        self.message = message;
        self.until = Some(now + wait);
        wait
    }

    /// Whether the gang of the job `uid` is still held back at `now`: then the condition's
    /// reason and message, and how long until the next try.
    pub fn holds(
        &self,
        uid: Option<&str>,
        now: Instant,
    ) -> Option<(&'static str, String, Duration)> {
        if self.uid.as_deref() != uid {
            return None;
        }
        let left = self
            .until?
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        Some((self.reason, self.message.clone(), left))
    }

    /// The refusals in a row so far.
    pub fn refusals(&self) -> u32 {
        self.backoff.failures()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = reasons::QUOTA_EXCEEDED;

    /// What the API server answers a pod create that the quota refuses (`NewForbidden` around
    /// the ResourceQuota admission's error).
    fn forbidden(object: &str, reason: &str) -> String {
        format!("{object} is forbidden: {reason}")
    }

    #[test]
    fn a_used_up_quota_is_a_wait_that_names_the_quota_and_a_quota_the_template_does_not_meet_is_not()
     {
        let message = forbidden(
            r#"pods "big-1""#,
            "exceeded quota: team-cpu, requested: requests.cpu=500m, used: \
             requests.cpu=500m, limited: requests.cpu=750m",
        );
        let refusal = Refusal::read(403, &message).expect("a quota wait");
        assert_eq!(
            refusal,
            Refusal {
                quota: "team-cpu".into(),
                resource: "pods".into(),
                why: Why::Exceeded {
                    requested: "requests.cpu=500m".into(),
                    used: "requests.cpu=500m".into(),
                    limited: "requests.cpu=750m".into(),
                },
            }
        );
        let said = refusal.explain(2);
        for part in [
            "ResourceQuota team-cpu",
            "requested: requests.cpu=500m",
            "limited: requests.cpu=750m",
            "all 2 ranks",
        ] {
            assert!(said.contains(part), "{part:?} not in {said:?}");
        }
        // Several resources at once (comma-separated lists), and an object that is not a pod.
        let message = forbidden(
            r#"services "big""#,
            "exceeded quota: q1, requested: limits.cpu=2,pods=1, used: limits.cpu=1,pods=3, \
             limited: limits.cpu=2,pods=4",
        );
        let refusal = Refusal::read(403, &message).expect("a quota wait");
        assert_eq!(refusal.resource, "services");
        assert_eq!(
            refusal.why,
            Why::Exceeded {
                requested: "limits.cpu=2,pods=1".into(),
                used: "limits.cpu=1,pods=3".into(),
                limited: "limits.cpu=2,pods=4".into(),
            }
        );
        // A quota not counted yet (just created) admits nothing for a moment: a wait too.
        let message = forbidden(
            r#"pods "big-0""#,
            "status unknown for quota: team-cpu, resources: requests.cpu",
        );
        let refusal = Refusal::read(403, &message).expect("a quota wait");
        assert_eq!(
            refusal.why,
            Why::Uncounted {
                resources: "requests.cpu".into()
            }
        );
        assert!(refusal.explain(2).contains("team-cpu"));

        // What a template does not meet is no wait: the same template is refused the same way
        // every time (it stays TemplateRejected), as is anything that is not a quota's refusal.
        for (code, message) in [
            // The template requests no CPU, and the quota counts requests.cpu.
            (
                403,
                forbidden(
                    r#"pods "big-0""#,
                    "failed quota: team-cpu: must specify limits.cpu for: worker; \
                     requests.cpu for: worker",
                ),
            ),
            (
                403,
                forbidden(
                    r#"pods "big-0""#,
                    "insufficient quota to consume: nvidia.com/gpu",
                ),
            ),
            (
                403,
                forbidden(
                    r#"pods "big-0""#,
                    r#"User "system:serviceaccount:x:y" cannot create resource "pods""#,
                ),
            ),
            (
                403,
                forbidden(
                    r#"pods "big-0""#,
                    r#"violates PodSecurity "restricted:latest": privileged"#,
                ),
            ),
            (
                422,
                r#"Pod "big-0" is invalid: spec.containers[0].volumeMounts[0].name: Not found"#
                    .into(),
            ),
            // The words alone, in an answer that is not a Forbidden, are not a quota refusal.
            (
                422,
                forbidden(
                    r#"pods "big-0""#,
                    "exceeded quota: q, requested: pods=1, used: pods=1, limited: pods=1",
                ),
            ),
        ] {
            assert_eq!(Refusal::read(code, &message), None, "{code} {message}");
        }
    }

    #[test]
    fn a_hold_doubles_with_every_refusal_and_lets_the_gang_try_again_when_it_is_over() {
        let t0 = Instant::now();
        let uid = Some("u1".to_string());
        let mut hold = Hold::default();
        assert_eq!(hold.holds(uid.as_deref(), t0), None, "nothing refused yet");
        let first = hold.refused(uid.clone(), Q, "short".into(), t0);
        assert_eq!(first, Duration::from_secs(5));
        let (reason, message, left) = hold
            .holds(uid.as_deref(), t0 + Duration::from_secs(1))
            .expect("held");
        assert_eq!(
            (reason, message.as_str(), left),
            (Q, "short", Duration::from_secs(4))
        );
        assert_eq!(hold.holds(uid.as_deref(), t0 + first), None, "try again");
        let t1 = t0 + first;
        assert_eq!(
            hold.refused(uid.clone(), Q, "short".into(), t1),
            Duration::from_secs(10)
        );
        assert_eq!(
            hold.refused(uid.clone(), Q, "short".into(), t1),
            Duration::from_secs(20)
        );
        assert_eq!(hold.refusals(), 3);
        // A job created again under the same name is not held by its predecessor's wait.
        assert_eq!(hold.holds(Some("u2"), t1), None);
        assert_eq!(
            hold.refused(Some("u2".into()), Q, "short".into(), t1),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_gang_that_objects_not_its_own_stand_in_the_way_of_tries_again_at_least_every_30_s() {
        let t0 = Instant::now();
        let uid = Some("u1".to_string());
        let mut hold = Hold::default();
        let c = reasons::OBJECT_CONFLICT;
        let waits: Vec<u64> = (0..5)
            .map(|_| hold.refused(uid.clone(), c, "Pod j-0".into(), t0).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 30, 30]);
        let (reason, message, _) = hold.holds(uid.as_deref(), t0).expect("held");
        assert_eq!((reason, message.as_str()), (c, "Pod j-0"));
    }
}
