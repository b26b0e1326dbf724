//! Which objects are a job's own: those its controller reference names, by the job's UID. Pure,
//! like [`crate::decide`].
//!
//! Names and labels are not enough. A job deleted with `--cascade=orphan` leaves its pods and
//! objects behind with its labels and no owner; a job created again under that name has the same
//! names and labels and another UID; a user may have made a Service called like the job. None of
//! those is adopted, taken over by a forced apply, deleted, or garbage-collected with the job:
//! the job names them in its `Admitted=False` condition (reason `ObjectConflict`) and waits,
//! holding no pod, until they are gone.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lockstep_api::contract::labels;

use crate::observe::RankPod;

/// The UID of the object that controls the object of `meta` (its controller reference).
pub fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

/// An object with a name the job needs that is not the job's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// Its kind (`Pod`, `Service`, ...).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Who controls it, in words: `controlled by ParallelJob j (UID ...)`, `controlled by no
    /// object`.
    pub holder: String,
    /// Whether it is being deleted (then the job only has to wait).
    pub terminating: bool,
    /// The UID of the job that made it (its `lockstep.dev/job-uid` label), when that is another
    /// job's: left by an earlier job of the same name.
    pub left_by: Option<String>,
    /// Whether that earlier job still controls it: the job is gone (or going, since this one
    /// has its name), so the garbage collector deletes it (then the job only has to wait).
    pub collected: bool,
}

impl Foreign {
    /// `Some` when the object of `kind` and `name`, with metadata `meta`, is not controlled by
    /// the job of UID `uid`.
    pub fn of(kind: &str, name: &str, meta: &ObjectMeta, uid: &str) -> Option<Foreign> {
        let controller = meta
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.controller == Some(true)));
        if controller.is_some_and(|c| c.uid == uid) {
            return None;
        }
        let holder = match controller {
            Some(c) => format!("controlled by {} {} (UID {})", c.kind, c.name, c.uid),
            None => "controlled by no object".to_string(),
        };
        let left_by = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(labels::JOB_UID))
            .filter(|u| *u != uid)
            .cloned();
        Some(Foreign {
            kind: kind.to_string(),
            name: name.to_string(),
            holder,
            terminating: meta.deletion_timestamp.is_some(),
            collected: left_by.is_some() && controller.map(|c| &c.uid) == left_by.as_ref(),
            left_by,
        })
    }

    /// A pod of the pod cache that is not controlled by the job of UID `uid`.
    pub fn pod(pod: &RankPod, uid: &str) -> Option<Foreign> {
        if pod.controller.as_deref() == Some(uid) {
            return None;
        }
        let holder = match &pod.controller {
            Some(other) => format!("controlled by another object (UID {other})"),
            None => "controlled by no object".to_string(),
        };
        let left_by = pod.job_uid.clone().filter(|u| u != uid);
        Some(Foreign {
            kind: "Pod".into(),
            name: pod.name.clone(),
            holder,
            terminating: pod.terminating,
            collected: left_by.is_some() && pod.controller == left_by,
            left_by,
        })
    }
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({}", self.kind, self.name, self.holder)?;
        if self.terminating {
            write!(f, ", being deleted")?;
        } else if self.collected {
            write!(
                f,
                ", an earlier job's of this name, which the garbage collector deletes"
            )?;
        }
        write!(f, ")")
    }
}

/// Splits a gang's pods as the pod cache shows them (every pod with the job's name label) into
/// the job's own (controlled by its UID `uid`) and the others, which are never part of its gang.
pub fn split_gang(pods: Vec<RankPod>, uid: &str) -> (Vec<RankPod>, Vec<RankPod>) {
    pods.into_iter()
        .partition(|p| p.controller.as_deref() == Some(uid))
}

/// The pods among `others` (pods with the job's labels that are not its own) that hold the name
/// of one of the `world` ranks of job `job`: the gang cannot be made while they exist.
pub fn in_the_way(others: &[RankPod], job: &str, world: u32, uid: &str) -> Vec<Foreign> {
    let mut found: Vec<Foreign> = others
        .iter()
        .filter(|p| p.rank < world && p.name == format!("{job}-{}", p.rank))
        .filter_map(|p| Foreign::pod(p, uid))
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// How many objects a message names before it says how many more there are.
const NAMED: usize = 8;

/// What the job's condition says of `foreign` (not empty): the objects, who controls them, and
/// what to do.
pub fn explain(foreign: &[Foreign]) -> String {
    let mut named: Vec<String> = foreign.iter().take(NAMED).map(|f| f.to_string()).collect();
    if foreign.len() > NAMED {
        named.push(format!("and {} more", foreign.len() - NAMED));
    }
    let all_going = foreign.iter().all(|f| f.terminating || f.collected);
    let what = if all_going {
        "the gang waits, with no pod of its own kept, until they are gone"
    } else {
        "they are left alone (never adopted, overwritten or deleted by this job), and the gang \
         waits, with no pod of its own kept, until they are gone: delete them (or create the job \
         under another name)"
    };
    // What an earlier job of the same name left (deleted with its objects orphaned) goes with
    // one command per such job.
    let earlier: BTreeSet<&str> = foreign
        .iter()
        .filter(|f| !f.terminating && !f.collected)
        .filter_map(|f| f.left_by.as_deref())
        .collect();
    let cleanup: String = earlier
        .iter()
        .map(|uid| {
            format!(
                "; what an earlier job of this name left goes with `kubectl delete {LEFT_BEHIND} \
                 -l {}={uid}`",
                labels::JOB_UID
            )
        })
        .collect();
    format!(
        "objects with names this job needs exist and are not its own: {}; {what}{cleanup}",
        named.join(", ")
    )
}

/// The kinds a job makes, as `kubectl delete` takes them (the gang objects of external
/// schedulers are left out: a kind the cluster does not serve would fail the whole command).
pub const LEFT_BEHIND: &str = concat!(
    "pods,services,configmaps,secrets,serviceaccounts,roles,rolebindings,",
    "networkpolicies,endpointslices"
);

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::observe::PodState;

    fn owned_by(uid: &str, controller: bool) -> ObjectMeta {
        ObjectMeta {
            owner_references: Some(vec![OwnerReference {
                api_version: "lockstep.dev/v1alpha1".into(),
                kind: "ParallelJob".into(),
                name: "j".into(),
                uid: uid.into(),
                controller: Some(controller),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        }
    }

    fn rank(rank: u32, name: &str, controller: Option<&str>) -> RankPod {
        RankPod {
            name: name.into(),
            rank,
            attempt: 0,
            state: PodState::Running,
            ready: false,
            node: None,
            terminating: false,
            gated: false,
            planned_node: None,
            ip: None,
            uid: None,
            controller: controller.map(str::to_string),
            job_uid: Some("u0".into()),
        }
    }

    #[test]
    fn only_the_controller_reference_with_the_job_uid_makes_an_object_the_jobs() {
        assert_eq!(controller_uid(&owned_by("u1", true)), Some("u1"));
        assert_eq!(
            Foreign::of("Service", "j", &owned_by("u1", true), "u1"),
            None
        );
        // The same name and owner kind, another UID: a predecessor's.
        let old = Foreign::of("Service", "j", &owned_by("u0", true), "u1").expect("foreign");
        assert_eq!(
            old.to_string(),
            "Service j (controlled by ParallelJob j (UID u0))"
        );
        // Made by it (its UID label) and still controlled by it: collected with it.
        let mut made = owned_by("u0", true);
        made.labels = Some([(labels::JOB_UID.to_string(), "u0".to_string())].into());
        let going = Foreign::of("Service", "j", &made, "u1").expect("foreign");
        assert!(going.collected && !going.terminating);
        assert!(going.to_string().contains("the garbage collector deletes"));
        let said = explain(&[going]);
        assert!(
            !said.contains("delete them") && !said.contains("kubectl"),
            "{said}"
        );
        // Made by it and orphaned: to be deleted by hand.
        made.owner_references = None;
        let orphan = Foreign::of("Service", "j", &made, "u1").expect("foreign");
        assert!(!orphan.collected);
        assert!(explain(&[orphan]).contains("kubectl delete"));
        // The job's UID as a mere owner (not the controller) does not make it the job's.
        assert_eq!(controller_uid(&owned_by("u1", false)), None);
        let shared = Foreign::of("Service", "j", &owned_by("u1", false), "u1").expect("foreign");
        assert_eq!(shared.holder, "controlled by no object");
        // An orphan, being deleted.
        let mut going = ObjectMeta {
            deletion_timestamp: Some(Time(Timestamp::UNIX_EPOCH)),
            ..ObjectMeta::default()
        };
        let f = Foreign::of("ConfigMap", "j-config", &going, "u1").expect("foreign");
        assert_eq!(
            f.to_string(),
            "ConfigMap j-config (controlled by no object, being deleted)"
        );
        going.owner_references = owned_by("u1", true).owner_references;
        assert_eq!(Foreign::of("ConfigMap", "j-config", &going, "u1"), None);
    }

    #[test]
    fn pods_of_another_uid_are_split_off_the_gang_and_those_with_a_rank_name_are_in_the_way() {
        let pods = vec![
            rank(0, "j-0", Some("u1")),
            rank(1, "j-1", None),       // orphaned by `--cascade=orphan`
            rank(2, "j-2", Some("u0")), // the predecessor's, not yet collected
            rank(7, "j-7", None),       // a rank the job no longer has
            rank(3, "copy-of-j-3", None),
        ];
        let (mine, others) = split_gang(pods, "u1");
        assert_eq!(
            mine.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["j-0"]
        );
        assert_eq!(others.len(), 4);
        let blocking = in_the_way(&others, "j", 4, "u1");
        assert_eq!(
            blocking.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["j-1", "j-2"]
        );
        let said = explain(&blocking);
        for part in [
            "Pod j-1 (controlled by no object)",
            "Pod j-2 (controlled by another object (UID u0), an earlier job's of this name, \
             which the garbage collector deletes)",
            "delete them",
            "`kubectl delete pods,services,configmaps,secrets,serviceaccounts,roles,rolebindings,\
             networkpolicies,endpointslices -l lockstep.dev/job-uid=u0`",
        ] {
            assert!(said.contains(part), "{part:?} in {said:?}");
        }
        // All of them being deleted: only a wait.
        let going: Vec<Foreign> = blocking
            .into_iter()
            .map(|f| Foreign {
                terminating: true,
                ..f
            })
            .collect();
        assert!(!explain(&going).contains("delete them"));
        assert!(!explain(&going).contains("kubectl"));
        // A user's object (no job UID label) gets no command.
        let user = Foreign::of("Service", "j", &ObjectMeta::default(), "u1").unwrap();
        assert_eq!(user.left_by, None);
        assert!(!explain(&[user]).contains("kubectl"));
    }

    #[test]
    fn a_long_list_is_cut_with_a_count() {
        let many: Vec<Foreign> = (0..11)
            .map(|r| Foreign::pod(&rank(r, &format!("j-{r}"), None), "u1").unwrap())
            .collect();
        let said = explain(&many);
        assert!(said.contains("Pod j-7 "), "{said}");
        assert!(!said.contains("Pod j-8 "), "{said}");
        assert!(said.contains("and 3 more"), "{said}");
    }
}
