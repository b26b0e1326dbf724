//! Carrying out a decision's writes: server-side apply under the operator's field manager for
//! the objects it shares with others, creations and deletions of pods (recorded as expectations
//! in the pod cache), and the EndpointSlice that publishes the ranks' addresses.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GetParams, GroupVersionKind, Patch, PatchParams,
    PostParams, Preconditions,
};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{annotations, operator};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Context, WRITE_CONCURRENCY};
use crate::decide::Action;
use crate::observe::RankPod;
use crate::ownership::{Foreign, controller_uid};
use crate::pods::Write;
use crate::resources::{HOSTNAME_LABEL, JobContext, Pin};
use crate::{Error, Result, quota};

/// How the writes of a decision ended.
pub(super) enum Applied {
    /// Every write was made.
    All,
    /// The API server refused an object built from `spec.template` (400, 403 or 422, with its
    /// message): retrying cannot help until the user changes the job.
    Rejected(String),
    /// The namespace's ResourceQuota refused an object because of what is used (403 "exceeded
    /// quota"): the gang waits, and is tried again (see [`crate::quota`]). The writes stopped
    /// there; the pods of the gang created before it are left to the caller.
    QuotaExceeded(quota::Refusal),
    /// Objects with names the job needs exist and are not its own (see [`crate::ownership`]):
    /// they were left alone, and the writes stopped there; the pods of the gang created before
    /// are left to the caller.
    NotOwned(Vec<Foreign>),
    /// The API of the external gang scheduler is not served (the API named).
    GangApiMissing(String),
    /// The operator may not use the API of the external gang scheduler (the API named, the API
    /// server's words).
    GangApiForbidden(String, String),
}

/// Makes the writes of `actions` in order, stopping at the first that fails. Pods on a node that
/// is gone (`lost`) are deleted at once (grace period 0): no kubelet would ever confirm their
/// end, and the next attempt would wait for them forever; that includes pods of `observed` (the
/// job's own pods) that already terminate there.
pub(super) async fn actions(
    ctx: &Context,
    job: &JobContext<'_>,
    actions: &[Action],
    observed: &[RankPod],
    lost: &HashSet<String>,
) -> Result<Applied> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), job.namespace);
    let jobs: Api<ParallelJob> = Api::namespaced(ctx.client.clone(), job.namespace);
    let gang = Gang {
        key: crate::job::key(job.namespace, job.name),
        pods: &pods,
        uids: observed
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.uid.clone()?)))
            .collect(),
    };
    let stuck: Vec<String> = observed
        .iter()
        .filter(|p| p.terminating && lost.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    delete_pods(ctx, job, &gang, stuck, true).await?;
    for action in actions {
        if let Action::DeletePods(names) = action {
            let (dead, alive): (Vec<String>, Vec<String>) =
                names.iter().cloned().partition(|n| lost.contains(n));
            delete_pods(ctx, job, &gang, dead, true).await?;
            delete_pods(ctx, job, &gang, alive, false).await?;
            continue;
        }
        match apply(ctx, job, &gang, &jobs, action).await {
            Ok(()) => {}
            Err(Error::Kube(kube::Error::Api(e))) if matches!(e.code, 400 | 403 | 422) => {
                return Ok(match quota::Refusal::read(e.code, &e.message) {
                    Some(refusal) => Applied::QuotaExceeded(refusal),
                    None => Applied::Rejected(e.message),
                });
            }
            Err(Error::NotOwned(foreign)) => return Ok(Applied::NotOwned(foreign)),
            Err(Error::GangApiMissing(what)) => return Ok(Applied::GangApiMissing(what)),
            Err(Error::GangApiForbidden(what, words)) => {
                return Ok(Applied::GangApiForbidden(what, words));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Applied::All)
}

/// A job's gang as the writes of one pass see it.
struct Gang<'a> {
    /// Its key in the pod cache.
    key: String,
    /// The pods of its namespace.
    pods: &'a Api<Pod>,
    /// Name -> UID of the job's own pods the pass observed.
    uids: HashMap<String, String>,
}

/// The parameters of the operator's creates.
fn create_params() -> PostParams {
    PostParams {
        field_manager: Some(operator::FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Creates `object` (of `kind`, named `name`) for the job of UID `uid`. A 409 counts as done only
/// when the object found under the name is the job's own (made by an earlier pass whose effects
/// this one has not seen yet); otherwise that object is returned, untouched.
async fn create_owned<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    object: &K,
    uid: &str,
) -> Result<Option<Foreign>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    match api.create(&create_params(), object).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            match api.get_metadata_opt(name).await.map_err(Error::Read)? {
                Some(found) => Ok(Foreign::of(kind, name, &found.metadata, uid)),
                // Gone again since: the next pass makes it.
                None => Err(Error::Kube(kube::Error::Api(e))),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `body` (the object `name` of `kind`, typed for server-side apply) for the job of UID
/// `uid`, only when it is the job's own: created when absent; applied (forced, under the
/// operator's field manager) when the job controls it, with the resourceVersion just read as
/// a precondition, so that an object that changed hands since is not written; left alone, and
/// returned, when another object controls it or none does. A user's object with the job's
/// name is so never taken over, nor garbage-collected with the job.
///
/// The body carries its own hash ([`annotations::APPLIED_HASH`]): an object of the job's found
/// with the same hash, and written by the operator alone, is not written again. `create_first`:
/// the object is most likely absent (its name was found absent, and this process has not made
/// it yet), so it is created without a read, and read only when the create fails with 409 or 403
/// (a full ResourceQuota refuses a create even of an object that exists).
async fn apply_owned<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    mut body: serde_json::Value,
    uid: &str,
    create_first: bool,
) -> Result<Option<Foreign>>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let hash = format!("{:016x}", body_hash(&body));
    body["metadata"]["annotations"][annotations::APPLIED_HASH] = hash.clone().into();
    if create_first {
        match api
            .create(&create_params(), &serde_json::from_value(body.clone())?)
            .await
        {
            Ok(_) => return Ok(None),
            // There after all (409), or a full ResourceQuota refuses even an object that exists
            // (403): read it, and decide from what is there.
            Err(kube::Error::Api(e)) if matches!(e.code, 403 | 409) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match api.get_metadata_opt(name).await.map_err(Error::Read)? {
        Some(found) => {
            if let Some(foreign) = Foreign::of(kind, name, &found.metadata, uid) {
                return Ok(Some(foreign));
            }
            // Unchanged since the operator applied it, and nobody else wrote to it since (an
            // edit by hand is undone, as before).
            let only_ours = found
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .all(|m| m.manager.as_deref() == Some(operator::FIELD_MANAGER));
            if only_ours && found.annotations().get(annotations::APPLIED_HASH) == Some(&hash) {
                return Ok(None);
            }
            body["metadata"]["resourceVersion"] = found.metadata.resource_version.into();
            let ssa = PatchParams::apply(operator::FIELD_MANAGER).force();
            match api.patch(name, &ssa, &Patch::Apply(&body)).await {
                Ok(_) => Ok(None),
                // Changed hands (or went) since the read: not written; the next pass reads again.
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {
                    Err(Error::Changed(format!("{kind} {name}")))
                }
                Err(e) => Err(e.into()),
            }
        }
        None => create_owned(api, kind, name, &serde_json::from_value(body)?, uid).await,
    }
}

/// A hash of a JSON body that is the same in every process (FNV-1a over its serialization;
/// `serde_json` writes an object's keys in order).
pub fn body_hash(body: &serde_json::Value) -> u64 {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hash of the job's objects besides its pods as they should be now: what
/// [`Action::EnsureSharedObjects`] writes when it changed (the token Secret, random and made
/// once, is left out).
fn shared_hash(ctx: &Context, job: &JobContext<'_>) -> Result<u64> {
    let policy = match &ctx.worker_policy {
        Some(from) => Some(serde_json::to_value(job.network_policy(from)?)?),
        None => None,
    };
    let all = serde_json::json!([
        job.service()?,
        job.config_map()?.0,
        job.service_account()?,
        job.progress_role()?,
        job.progress_role_binding()?,
        job.progress_config_map()?,
        policy,
        job.endpoint_slice_name(),
    ]);
    Ok(body_hash(&all))
}

/// How [`Action::EnsureSharedObjects`] writes the job's objects besides its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedWrites {
    /// Not at all: this process made them, as they are now, for this attempt, and pods of the
    /// attempt exist (the gang is being made).
    None,
    /// Created without a read: their names were all found absent, and this process has not
    /// tried to make them yet (a 409 or 403 falls back to the read).
    CreateFirst,
    /// Each read first, then created, applied when it changed, or left alone.
    ReadFirst,
}

/// How the job's objects besides its pods are written, from what this process `kept` of the job,
/// their `hash` now, the gang `attempt` they are for, and whether the gang has no pod at all
/// (`empty`: a first start, a resume, a readmission after eviction; what went since is made
/// again).
pub fn shared_writes(
    kept: Option<&super::Kept>,
    hash: u64,
    attempt: i32,
    empty: bool,
) -> SharedWrites {
    match kept {
        Some(k) if !empty && k.shared == Some((hash, attempt)) => SharedWrites::None,
        Some(k) if k.names_absent && k.shared.is_none() => SharedWrites::CreateFirst,
        _ => SharedWrites::ReadFirst,
    }
}

/// How long after the look at a job's names its EndpointSlice, found absent then, is not read
/// again before its gang's pods are made (see `apply`).
const LOOK_STILL_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The object named `name` of `api` when it exists and is not the job's (UID `uid`).
async fn foreign_at<K>(api: &Api<K>, kind: &str, name: &str, uid: &str) -> Result<Option<Foreign>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    Ok(look_at(api, kind, name, uid, &GetParams::default())
        .await?
        .flatten())
}

/// The object named `name` of `api` (read as `read` says): `None` when absent, else `Some` of
/// the object in the way when it is not the job's (UID `uid`).
async fn look_at<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    uid: &str,
    read: &GetParams,
) -> Result<Option<Option<Foreign>>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    Ok(api
        .get_metadata_opt_with(name, read)
        .await
        .map_err(Error::Read)?
        .map(|found| Foreign::of(kind, name, &found.metadata, uid)))
}

/// What a look at the names of a job's objects found.
pub(super) struct Looked {
    /// The objects in the way: not the job's own.
    pub foreign: Vec<Foreign>,
    /// Whether none of the job's objects besides its pods exists (then they can be created
    /// without a read first).
    pub all_absent: bool,
    /// Whether the job's EndpointSlice is absent (then nothing of it is published).
    pub slice_absent: bool,
}

/// The objects with the names of the job's own objects (and its pods, from the cache) that exist
/// and are not its own, looked up at once; see [`Looked`].
pub(super) async fn foreign_objects(ctx: &Context, job: &JobContext<'_>) -> Result<Looked> {
    let (c, ns, uid) = (&ctx.client, job.namespace, job.uid());
    let role = job.progress_role()?.metadata.name.unwrap_or_default();
    let account = job.service_account()?.and_then(|sa| sa.metadata.name);
    let progress = job.progress_config_map()?.metadata.name.unwrap_or_default();
    let (service, config) = (job.service_name(), job.config_map_name());
    let (policy, slice) = (job.network_policy_name(), job.endpoint_slice_name());
    let maps = Api::<ConfigMap>::namespaced(c.clone(), ns);
    let services = Api::<Service>::namespaced(c.clone(), ns);
    let accounts = Api::<ServiceAccount>::namespaced(c.clone(), ns);
    let roles = Api::<Role>::namespaced(c.clone(), ns);
    let bindings = Api::<RoleBinding>::namespaced(c.clone(), ns);
    let policies = Api::<NetworkPolicy>::namespaced(c.clone(), ns);
    let slices = Api::<EndpointSlice>::namespaced(c.clone(), ns);
    // From the API server's watch cache (resourceVersion 0), not etcd: eight reads a job before
    // its admission, 4,000 for 500 jobs. The cache trails etcd by moments; an object it does not
    // show yet is still found when the job's write of that name is refused (409), and the gang
    // is then held and given back, as for one made after this look.
    let any = &GetParams::any();
    let found = futures::try_join!(
        look_at(&services, "Service", &service, uid, any),
        look_at(&maps, "ConfigMap", &config, uid, any),
        look_at(&maps, "ConfigMap", &progress, uid, any),
        async {
            match &account {
                Some(name) => look_at(&accounts, "ServiceAccount", name, uid, any).await,
                None => Ok(None),
            }
        },
        look_at(&roles, "Role", &role, uid, any),
        look_at(&bindings, "RoleBinding", &role, uid, any),
        async {
            match &ctx.worker_policy {
                Some(_) => look_at(&policies, "NetworkPolicy", &policy, uid, any).await,
                None => Ok(None),
            }
        },
        look_at(&slices, "EndpointSlice", &slice, uid, any),
    )?;
    let (a, b, c, d, e, f, g, h) = found;
    let slice_absent = h.is_none();
    let all = [a, b, c, d, e, f, g, h];
    let all_absent = all.iter().all(Option::is_none);
    let mut foreign: Vec<Foreign> = all.into_iter().flatten().flatten().collect();
    // The ranks' names: pods without the job's labels (which the gang's own pod cache does not
    // hold) are in the cluster-wide cache admission keeps.
    for rank in 0..job.layout.world_size() {
        let name = job.pod_name(rank);
        if let Some(pod) = ctx.admitter.pod(ns, &name) {
            foreign.extend(Foreign::of("Pod", &name, &pod.metadata, uid));
        }
    }
    Ok(Looked {
        foreign,
        all_absent,
        slice_absent,
    })
}

/// Fails with [`Error::NotOwned`] when any of `checked` found an object not the job's own.
fn all_owned(checked: impl IntoIterator<Item = Option<Foreign>>) -> Result<()> {
    let foreign: Vec<Foreign> = checked.into_iter().flatten().collect();
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(Error::NotOwned(foreign))
    }
}

/// Makes the writes of one action.
async fn apply(
    ctx: &Context,
    job: &JobContext<'_>,
    gang: &Gang<'_>,
    jobs: &Api<ParallelJob>,
    action: &Action,
) -> Result<()> {
    let uid = job.uid();
    let pods = gang.pods;
    match action {
        Action::EnsureSharedObjects { attempt } => {
            // Once per start of the gang, and again when they change: the passes that make a
            // gang's pods one batch after another write nothing twice.
            let hash = shared_hash(ctx, job)?;
            let empty = gang.uids.is_empty();
            let (create_first, slice_just_looked) = {
                let mut kept = ctx.kept();
                let writes = shared_writes(kept.get(&gang.key), hash, *attempt, empty);
                let just_looked = kept
                    .get(&gang.key)
                    .and_then(|k| k.names_looked)
                    .is_some_and(|at| at.elapsed() < LOOK_STILL_FRESH);
                // Absent as found once: a retry, or a later attempt, reads first.
                if let Some(k) = kept.get_mut(&gang.key) {
                    k.names_absent = false;
                }
                match writes {
                    SharedWrites::None => return Ok(()),
                    SharedWrites::CreateFirst => (true, just_looked),
                    SharedWrites::ReadFirst => (false, false),
                }
            };
            // Independent writes, made at once: a reconcile waits for two round trips, not
            // sixteen. Each is made only to an object that is the job's own or absent.
            let c = &ctx.client;
            let ns = job.namespace;
            let service = async {
                let api = Api::<Service>::namespaced(c.clone(), ns);
                let body = typed(job.service()?, "v1", "Service");
                apply_owned(
                    &api,
                    "Service",
                    &job.service_name(),
                    body,
                    uid,
                    create_first,
                )
                .await
            };
            let maps: Api<ConfigMap> = Api::namespaced(c.clone(), ns);
            let config = async {
                let (cm, _) = job.config_map()?;
                let body = typed(cm, "v1", "ConfigMap");
                apply_owned(
                    &maps,
                    "ConfigMap",
                    &job.config_map_name(),
                    body,
                    uid,
                    create_first,
                )
                .await
            };
            let account = async {
                let Some(sa) = job.service_account()? else {
                    return Ok(None);
                };
                let name = sa.metadata.name.clone().unwrap_or_default();
                let api = Api::<ServiceAccount>::namespaced(c.clone(), ns);
                let body = typed(sa, "v1", "ServiceAccount");
                apply_owned(&api, "ServiceAccount", &name, body, uid, create_first).await
            };
            // The Role first: binding a Role that does not exist yet needs the `bind` verb,
            // which the operator does not hold.
            let rbac = async {
                let rbac = "rbac.authorization.k8s.io/v1";
                let role = job.progress_role()?;
                let name = role.metadata.name.clone().unwrap_or_default();
                let roles = Api::<Role>::namespaced(c.clone(), ns);
                let body = typed(role, rbac, "Role");
                if let Some(foreign) =
                    apply_owned(&roles, "Role", &name, body, uid, create_first).await?
                {
                    // Not bound: the binding would grant what someone else's Role holds.
                    return Ok(Some(foreign));
                }
                let bindings = Api::<RoleBinding>::namespaced(c.clone(), ns);
                let body = typed(job.progress_role_binding()?, rbac, "RoleBinding");
                apply_owned(&bindings, "RoleBinding", &name, body, uid, create_first).await
            };
            // Created once and never re-applied: the token must not change under running ranks,
            // and the progress belongs to the worker once it exists. The token Secret's name
            // carries the job's UID, and the operator may not read Secrets: a 409 on it can
            // only be an earlier pass's create (see `names::token_secret`).
            let token = async {
                let token = format!("{:032x}", rand::random::<u128>());
                let secrets: Api<Secret> = Api::namespaced(c.clone(), ns);
                match secrets
                    .create(&create_params(), &job.token_secret(&token)?)
                    .await
                {
                    Ok(_) => Ok(None),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
                    Err(e) => Err(Error::from(e)),
                }
            };
            let progress = async {
                let cm = job.progress_config_map()?;
                let name = cm.metadata.name.clone().unwrap_or_default();
                create_owned(&maps, "ConfigMap", &name, &cm, uid).await
            };
            let policy = async {
                let Some(metrics_from) = &ctx.worker_policy else {
                    return Ok(None);
                };
                let policy = job.network_policy(metrics_from)?;
                let api = Api::<NetworkPolicy>::namespaced(c.clone(), ns);
                let body = typed(policy, "networking.k8s.io/v1", "NetworkPolicy");
                apply_owned(
                    &api,
                    "NetworkPolicy",
                    &job.network_policy_name(),
                    body,
                    uid,
                    create_first,
                )
                .await
            };
            // Written when the gang has its addresses; one that is not the job's holds the
            // gang back now, before any pod is made. Not read again when the look at the names
            // found it absent moments ago (a gang admitted at once, not one that waited in the
            // queue since): its publication creates it unread, and one made since is found then.
            let slice = async {
                if slice_just_looked {
                    return Ok(None);
                }
                let api = Api::<EndpointSlice>::namespaced(c.clone(), ns);
                foreign_at(&api, "EndpointSlice", &job.endpoint_slice_name(), uid).await
            };
            let checked = futures::try_join!(
                service, config, account, rbac, token, progress, policy, slice
            )?;
            let (a, b, c, d, e, f, g, h) = checked;
            all_owned([a, b, c, d, e, f, g, h])?;
            ctx.kept().entry(gang.key.clone()).or_default().shared = Some((hash, *attempt));
        }
        Action::CreatePods {
            attempt,
            ranks,
            nodes,
            update,
        } => {
            let digest = job.config_digest()?;
            let built: Vec<Pod> = ranks
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let planned = nodes.as_ref().and_then(|n| n.get(i));
                    let node = planned.and_then(|n| ctx.nodes.get(&ObjectRef::new(n)));
                    let hostname = node
                        .as_ref()
                        .and_then(|n| n.labels().get(HOSTNAME_LABEL).cloned());
                    let pin = planned.map(|n| (n.as_str(), hostname));
                    let pin = pin.as_ref().map(|(node, hostname)| Pin {
                        node,
                        hostname: hostname.as_deref(),
                    });
                    let mut pod = job.pod(*r, *attempt, &digest, pin.is_some(), pin.as_ref())?;
                    if let Some(update) = update {
                        update.apply(&mut pod)?;
                    }
                    Ok(pod)
                })
                .collect::<Result<_>>()?;
            // 409: created by an earlier pass whose status write we have not seen yet, when the
            // pod there is the job's own; else another's, left alone and reported. Every
            // creation runs to its end even when another fails, so that the pods this pass made
            // are known (and expected in the cache) when a refusal of the rest (a ResourceQuota's)
            // deletes them again.
            let results: Vec<Result<Option<Foreign>>> = futures::stream::iter(built)
                .map(|pod| async move {
                    let name = pod.name_any();
                    let foreign = create_owned(pods, "Pod", &name, &pod, uid).await?;
                    if foreign.is_none() {
                        ctx.pods.expect(&gang.key, Write::Created, [name]);
                    }
                    Ok(foreign)
                })
                .buffer_unordered(WRITE_CONCURRENCY)
                .collect()
                .await;
            all_owned(results.into_iter().collect::<Result<Vec<_>>>()?)?;
        }
        Action::Ungate(names) => {
            // Only the Lockstep gate goes; gates of other controllers stay.
            let patch = serde_json::json!({"spec": {"schedulingGates": [
                {"$patch": "delete", "name": operator::SCHEDULING_GATE}
            ]}});
            bounded(names.iter().cloned(), &[404], |name| {
                let patch = &patch;
                async move {
                    pods.patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
                        .await
                        .map(drop)?;
                    ctx.pods.expect(&gang.key, Write::Released, [name]);
                    Ok(())
                }
            })
            .await?;
        }
        Action::EnsureGangObjects => {
            for object in job.gang_objects()? {
                let gvk = GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
                let ar = ApiResource::from_gvk_with_plural(&gvk, &object.plural);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(ctx.client.clone(), job.namespace, &ar);
                match apply_owned(&api, &object.kind, job.name, object.body, uid, false).await {
                    // Not on to the next: a PodGroup would name a Workload that is not the job's.
                    Ok(Some(foreign)) => return Err(Error::NotOwned(vec![foreign])),
                    Ok(None) => {}
                    // The resource is not served: the read gets a plain-text 404 (or finds
                    // nothing, and then the create gets one).
                    Err(Error::Kube(kube::Error::Api(e)) | Error::Read(kube::Error::Api(e)))
                        if e.code == 404 =>
                    {
                        return Err(Error::GangApiMissing(format!(
                            "{}/{} {}",
                            object.group, object.version, object.kind
                        )));
                    }
                    Err(Error::Kube(kube::Error::Api(e)) | Error::Read(kube::Error::Api(e)))
                        if e.code == 403 =>
                    {
                        let what = format!("{}/{} {}", object.group, object.version, object.kind);
                        return Err(Error::GangApiForbidden(what, e.message));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Action::DeletePods(names) => delete_pods(ctx, job, gang, names.clone(), false).await?,
        Action::DeleteWorkload => {
            let api = workloads(ctx, job);
            if let Some(found) = owned_workload(&api, job.name, uid).await? {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: found.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::background()
                };
                match api.delete(job.name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Action::SetWorkloadActive(active) => {
            let api = workloads(ctx, job);
            let Some(found) = owned_workload(&api, job.name, uid).await? else {
                return Ok(());
            };
            let mut patch = crate::kueue::active_patch(*active);
            patch["metadata"]["resourceVersion"] = found.metadata.resource_version.into();
            let written = api
                .patch(job.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            unless_changed(written, job.name)?;
        }
        Action::WorkloadStatus(update) => {
            let api = workloads(ctx, job);
            let Some(found) = owned_workload(&api, job.name, uid).await? else {
                return Ok(());
            };
            let obj = serde_json::to_value(&found)?;
            if let Some(patch) =
                crate::kueue::status_patch(&obj, update, k8s_openapi::jiff::Timestamp::now())
            {
                let params = PatchParams {
                    field_manager: Some(crate::kueue::STATUS_MANAGER.into()),
                    ..PatchParams::default()
                };
                let written = api
                    .patch_status(job.name, &params, &Patch::Merge(&patch))
                    .await;
                unless_changed(written, job.name)?;
            }
        }
        Action::DeleteJob => {
            // Only this job: not one created again under its name since this pass read it.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid.to_string()),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match jobs.delete(job.name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The Workload `name` of `api` when it is the job's own (the job's UID `uid` controls it).
async fn owned_workload(
    api: &Api<DynamicObject>,
    name: &str,
    uid: &str,
) -> Result<Option<DynamicObject>> {
    Ok(api
        .get_opt(name)
        .await
        .map_err(Error::Read)?
        .filter(|w| controller_uid(&w.metadata) == Some(uid)))
}

/// A write to the Workload `name` that found it changed or gone since it was read (409, 404)
/// is [`Error::Changed`]: Kueue wrote it meanwhile, and the next pass reads it again.
fn unless_changed<T>(written: kube::Result<T>, name: &str) -> Result<()> {
    match written {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {
            Err(Error::Changed(format!("Workload {name}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// The Kueue Workloads of the job's namespace.
pub(super) fn workloads(ctx: &Context, job: &JobContext<'_>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(
        crate::kueue::GROUP,
        crate::kueue::VERSION,
        crate::kueue::KIND,
    );
    let ar = ApiResource::from_gvk_with_plural(&gvk, crate::kueue::PLURAL);
    Api::namespaced_with(ctx.client.clone(), job.namespace, &ar)
}

/// Deletes the job's pods of `names` (at once, grace period 0, when `now`), expecting their
/// deletion in the pod cache. Each delete names the pod's UID as a precondition, so that it never
/// hits a pod that is not the job's: the UID the pass observed, else the one read now (a pod
/// this pass created); a pod that is not the job's own is not deleted.
async fn delete_pods(
    ctx: &Context,
    job: &JobContext<'_>,
    gang: &Gang<'_>,
    names: Vec<String>,
    now: bool,
) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let pods = gang.pods;
    let uid = job.uid();
    let base = if now {
        DeleteParams::default().grace_period(0)
    } else {
        DeleteParams::background()
    };
    // 404: gone already; 409: the precondition failed, the pod under the name is another.
    bounded(names, &[404, 409], |name| {
        let base = base.clone();
        async move {
            let pod_uid = match gang.uids.get(&name) {
                Some(u) => u.clone(),
                None => match pods.get_metadata_opt(&name).await {
                    Ok(Some(found))
                        if Foreign::of("Pod", &name, &found.metadata, uid).is_none() =>
                    {
                        found.metadata.uid.unwrap_or_default()
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => return Err(e),
                },
            };
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(pod_uid),
                    resource_version: None,
                }),
                ..base
            };
            pods.delete(&name, &params).await.map(drop)?;
            ctx.pods.expect(&gang.key, Write::Deleted, [name]);
            Ok(())
        }
    })
    .await
}

/// What the job's EndpointSlice should now hold, when that differs from what was `published`:
/// the addresses of the attempt's ranks (rank, pod IP), sorted by rank, once every one of the
/// `world` ranks has one (the gang starts whole, so one write an attempt does); no addresses
/// while the attempt is incomplete and the slice still holds an earlier attempt's, so that no
/// name resolves to a pod that is gone. `None`: leave the slice as it is.
pub fn addresses_to_publish(
    observed: &[RankPod],
    attempt: i32,
    world: u32,
    published: &[(u32, String)],
) -> Option<Vec<(u32, String)>> {
    let mut ranks: Vec<(u32, String)> = observed
        .iter()
        .filter(|p| p.attempt == attempt && !p.terminating)
        .filter_map(|p| Some((p.rank, p.ip.clone()?)))
        .collect();
    ranks.sort();
    ranks.dedup_by_key(|r| r.0);
    let want = if ranks.len() == usize::try_from(world).ok()? {
        ranks
    } else if published.is_empty() {
        return None;
    } else {
        Vec::new()
    };
    (want != published).then_some(want)
}

/// Writes the job's EndpointSlice (server-side apply) when [`addresses_to_publish`] says so.
///
/// What was published is kept in memory; on the first pass over a job after this process
/// started there is no record yet, so it is read from the API server's slice (none: nothing
/// published). Otherwise a slice holding an earlier attempt's addresses, written before a
/// restart of the operator, would stay while the current attempt is incomplete, and the ranks'
/// names would resolve to pods that are gone.
pub(super) async fn publish_addresses(
    ctx: &Context,
    job: &JobContext<'_>,
    observed: &[RankPod],
    attempt: i32,
) -> Result<()> {
    let key = crate::job::key(job.namespace, job.name);
    let slices = Api::<EndpointSlice>::namespaced(ctx.client.clone(), job.namespace);
    let known = ctx.kept().get(&key).and_then(|k| k.published.clone());
    let published = match known {
        Some(published) => published,
        None => {
            // A slice that is not the job's own publishes nothing of it.
            let on_server = slices.get_opt(&job.endpoint_slice_name()).await?;
            let published = on_server
                .as_ref()
                .filter(|s| controller_uid(&s.metadata) == Some(job.uid()))
                .map_or_else(Vec::new, |s| published_in(s, job.name));
            ctx.kept().entry(key.clone()).or_default().published = Some(published.clone());
            published
        }
    };
    let want = addresses_to_publish(observed, attempt, job.layout.world_size(), &published);
    let Some(want) = want else {
        return Ok(());
    };
    let body = typed(
        job.endpoint_slice(&want)?,
        "discovery.k8s.io/v1",
        "EndpointSlice",
    );
    let name = job.endpoint_slice_name();
    // Found absent when the names were looked at, and not written since: create it unread.
    let create_first = std::mem::take(&mut ctx.kept().entry(key.clone()).or_default().slice_absent);
    if let Some(foreign) = apply_owned(
        &slices,
        "EndpointSlice",
        &name,
        body,
        job.uid(),
        create_first,
    )
    .await?
    {
        return Err(Error::NotOwned(vec![foreign]));
    }
    ctx.kept().entry(key).or_default().published = Some(want);
    Ok(())
}

/// The rank addresses (rank, address) an EndpointSlice of job `job` lists, sorted by rank: the
/// rank read from each endpoint's hostname `<job>-<rank>`, with its first address. Endpoints of
/// another shape (written by someone else) are left out.
pub fn published_in(slice: &EndpointSlice, job: &str) -> Vec<(u32, String)> {
    let prefix = format!("{job}-");
    let mut ranks: Vec<(u32, String)> = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|e| {
            let suffix = e.hostname.as_deref()?.strip_prefix(&prefix)?;
            let rank: u32 = suffix.parse().ok()?;
            // `<job>-01` or `<job>-+1` would parse, but no rank's hostname is written so.
            (rank.to_string() == suffix).then_some(())?;
            Some((rank, e.addresses.first()?.clone()))
        })
        .collect();
    ranks.sort();
    ranks.dedup_by_key(|r| r.0);
    ranks
}

/// Runs `write` on every item with at most [`WRITE_CONCURRENCY`] in flight, treating the API
/// statuses `ok_codes` (already exists, already gone) as success: never one by one, never
/// unbounded.
async fn bounded<I, F, Fut>(items: I, ok_codes: &[u16], write: F) -> Result<()>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter(items)
        .map(|item| {
            let fut = write(item);
            async move {
                match fut.await {
                    Ok(()) => Ok(()),
                    Err(kube::Error::Api(e)) if ok_codes.contains(&e.code) => Ok(()),
                    Err(e) => Err(Error::Kube(e)),
                }
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// An object with apiVersion and kind set, as server-side apply requires.
fn typed<T: serde::Serialize>(obj: T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

    use super::{SharedWrites, addresses_to_publish, body_hash, published_in, shared_writes};
    use crate::controller::Kept;

    #[test]
    fn shared_objects_are_written_once_an_attempt_and_again_when_they_change() {
        assert_eq!(shared_writes(None, 7, 0, true), SharedWrites::ReadFirst);
        let mut kept = Kept {
            names_absent: true,
            ..Kept::default()
        };
        assert_eq!(
            shared_writes(Some(&kept), 7, 0, true),
            SharedWrites::CreateFirst
        );
        kept.names_absent = false;
        kept.shared = Some((7, 0));
        // Made for this attempt, and its pods are being made: nothing.
        assert_eq!(shared_writes(Some(&kept), 7, 0, false), SharedWrites::None);
        // No pod of the gang (a resume, a readmission): what went since is made again.
        assert_eq!(
            shared_writes(Some(&kept), 7, 0, true),
            SharedWrites::ReadFirst
        );
        // Changed, or a new attempt: read, then write.
        assert_eq!(
            shared_writes(Some(&kept), 8, 0, false),
            SharedWrites::ReadFirst
        );
        assert_eq!(
            shared_writes(Some(&kept), 7, 1, false),
            SharedWrites::ReadFirst
        );
        // Names found in use (the job's own objects, after a restart of the operator): read first.
        kept.shared = None;
        assert_eq!(
            shared_writes(Some(&kept), 7, 0, true),
            SharedWrites::ReadFirst
        );
    }

    #[test]
    fn the_body_hash_is_fixed_and_sees_every_change() {
        let a = serde_json::json!({"metadata": {"name": "j"}, "spec": {"ports": [1, 2]}});
        // FNV-1a of the serialization: the same in every process and version of the operator.
        assert_eq!(body_hash(&serde_json::json!("")), 0x07cc_7607_b494_9e25);
        assert_eq!(body_hash(&a), body_hash(&a.clone()));
        let b = serde_json::json!({"metadata": {"name": "j"}, "spec": {"ports": [2, 1]}});
        assert_ne!(body_hash(&a), body_hash(&b));
    }
    use crate::observe::{PodState, RankPod};

    fn endpoint(hostname: Option<&str>, addresses: &[&str]) -> Endpoint {
        Endpoint {
            hostname: hostname.map(str::to_string),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Endpoint::default()
        }
    }

    #[test]
    fn the_published_ranks_are_read_back_from_the_slice() {
        let slice = EndpointSlice {
            endpoints: Some(vec![
                endpoint(Some("j-1"), &["10.0.0.2"]),
                endpoint(Some("j-0"), &["10.0.0.1", "10.0.0.9"]),
                // Not a rank of this job's: another job's prefix, no number, a number written
                // otherwise than a rank's hostname, no hostname, no address, a repeated rank.
                endpoint(Some("jj-2"), &["10.0.0.3"]),
                endpoint(Some("j-x"), &["10.0.0.4"]),
                endpoint(Some("j-03"), &["10.0.0.5"]),
                endpoint(Some("j-"), &["10.0.0.6"]),
                endpoint(None, &["10.0.0.7"]),
                endpoint(Some("j-4"), &[]),
                endpoint(Some("j-1"), &["10.0.0.8"]),
            ]),
            ..EndpointSlice::default()
        };
        assert_eq!(
            published_in(&slice, "j"),
            vec![(0, "10.0.0.1".to_string()), (1, "10.0.0.2".to_string())]
        );
        // A job whose name ends in a digit: `j-1-0` is rank 0 of `j-1`, not of `j`.
        let nested = EndpointSlice {
            endpoints: Some(vec![endpoint(Some("j-1-0"), &["10.0.1.1"])]),
            ..EndpointSlice::default()
        };
        assert_eq!(published_in(&nested, "j-1"), vec![(0, "10.0.1.1".into())]);
        assert_eq!(published_in(&nested, "j"), vec![]);
        // An empty slice (the addresses withdrawn): nothing published.
        assert_eq!(published_in(&EndpointSlice::default(), "j"), vec![]);
        // Seeded from it after a restart of the operator, an incomplete attempt withdraws the
        // stale addresses at once.
        let restarting = [rank(0, 1, None)];
        assert_eq!(
            addresses_to_publish(&restarting, 1, 2, &published_in(&slice, "j")),
            Some(vec![])
        );
    }

    fn rank(rank: u32, attempt: i32, ip: Option<&str>) -> RankPod {
        RankPod {
            name: format!("j-{rank}"),
            rank,
            attempt,
            state: PodState::Running,
            ready: false,
            node: Some("n".into()),
            terminating: false,
            gated: false,
            planned_node: None,
            ip: ip.map(str::to_string),
            uid: None,
            controller: Some("u".into()),
            job_uid: None,
        }
    }

    #[test]
    fn addresses_are_published_once_an_attempt_is_whole_and_withdrawn_when_it_goes() {
        let addr = |r: u32, ip: &str| (r, ip.to_string());
        // Rank 1 has no address yet: nothing is written.
        let partial = [rank(1, 0, None), rank(0, 0, Some("10.0.0.1"))];
        assert_eq!(addresses_to_publish(&partial, 0, 2, &[]), None);
        // Whole: both, sorted by rank.
        let whole = [rank(1, 0, Some("10.0.0.2")), rank(0, 0, Some("10.0.0.1"))];
        let first = vec![addr(0, "10.0.0.1"), addr(1, "10.0.0.2")];
        assert_eq!(addresses_to_publish(&whole, 0, 2, &[]), Some(first.clone()));
        // Written already: nothing to do.
        assert_eq!(addresses_to_publish(&whole, 0, 2, &first), None);
        // A restart: the old attempt's pods terminate, the new ones have no address yet. The
        // old addresses are withdrawn once, so no name resolves to a pod that is gone.
        let mut restarting = vec![rank(0, 1, None), rank(1, 1, None)];
        restarting.extend(whole.iter().cloned().map(|mut p| {
            p.terminating = true;
            p
        }));
        assert_eq!(
            addresses_to_publish(&restarting, 1, 2, &first),
            Some(vec![])
        );
        assert_eq!(addresses_to_publish(&restarting, 1, 2, &[]), None);
        // The new attempt is whole: its addresses replace them.
        let next = [rank(0, 1, Some("10.0.0.5")), rank(1, 1, Some("10.0.0.6"))];
        assert_eq!(
            addresses_to_publish(&next, 1, 2, &[]),
            Some(vec![addr(0, "10.0.0.5"), addr(1, "10.0.0.6")])
        );
        // A rank that got a new address (its pod was replaced) is written again.
        let moved = [rank(0, 1, Some("10.0.0.5")), rank(1, 1, Some("10.0.0.8"))];
        assert_eq!(
            addresses_to_publish(&moved, 1, 2, &[addr(0, "10.0.0.5"), addr(1, "10.0.0.6")]),
            Some(vec![addr(0, "10.0.0.5"), addr(1, "10.0.0.8")])
        );
    }
}
