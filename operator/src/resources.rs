//! Pure builders of the objects a ParallelJob owns: a headless Service and its EndpointSlice that
//! give every rank a stable DNS name, a ConfigMap with the worker config, and one pod per rank
//! carrying the env contract of `lockstep_api::contract`. Nothing here talks to the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, Pod, PodSchedulingGate, PodSchedulingGroup, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use lockstep_api::ParallelJob;
use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::{annotations, env, labels, names, operator, paths, ports};
use lockstep_api::layout::Layout;
use lockstep_api::spec::{GangPolicy, TopologyMode};
use lockstep_api::training::Workload;

use crate::{Error, Result};

/// Seconds a worker gets between SIGTERM and SIGKILL, unless the template says otherwise: long
/// enough to finish writing a checkpoint.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The extended resource `spec.parallelism.gpusPerWorker` asks for, as a limit of every worker.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Command the operator runs in the worker container of a built-in workload that sets none.
pub const WORKER_COMMAND: &[&str] = &["lockstep-worker", "run"];

/// Everything the builders need to know about one job.
pub struct JobContext<'a> {
    /// The job.
    pub job: &'a ParallelJob,
    /// Its name.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its rank layout.
    pub layout: Layout,
    /// The value of its PriorityClass, when it names one that exists (Kueue's Workload carries
    /// it).
    pub priority: Option<i32>,
}

impl<'a> JobContext<'a> {
    /// The context of `job`, which must have a name, a namespace and a valid layout.
    pub fn new(job: &'a ParallelJob) -> Result<Self> {
        let name = job
            .metadata
            .name
            .as_deref()
            .ok_or(Error::MissingField("metadata.name"))?;
        let namespace = job
            .metadata
            .namespace
            .as_deref()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let p = &job.spec.parallelism;
        let layout = Layout::new(
            p.data_parallel.max(0) as u32,
            p.pipeline_stages.max(0) as u32,
        )?;
        Ok(Self {
            job,
            name,
            namespace,
            layout,
            priority: None,
        })
    }

    /// The job's UID (every job the API server returns has one; a job built in memory without
    /// one says so).
    pub fn uid(&self) -> &str {
        self.job.metadata.uid.as_deref().unwrap_or("no-uid")
    }

    /// Name of the headless Service (the job's name).
    pub fn service_name(&self) -> String {
        self.name.to_string()
    }

    /// Name of the worker-config ConfigMap.
    pub fn config_map_name(&self) -> String {
        format!("{}-config", self.name)
    }

    /// The gang object an external gang scheduler places the job by (`None` for Builtin): its
    /// API group, version, kind and plural, and the objects to apply (the Workload policy writes a
    /// Workload and the PodGroup made from its template).
    pub fn gang_objects(&self) -> Result<Vec<GangObject>> {
        let world = i64::from(self.layout.world_size());
        let owner = self.owner_reference()?;
        let meta = serde_json::json!({
            "name": self.name, "namespace": self.namespace,
            "labels": self.common_labels(), "ownerReferences": [owner],
        });
        let sched = &self.job.spec.scheduling;
        let total = {
            let pod = self.pod(0, 0, "", false, None)?;
            let mut total = crate::gang::demand::Res::default();
            total.add_times(
                &crate::gang::demand::pod_request(&pod.spec.unwrap_or_default()),
                world,
            );
            total
                .0
                .iter()
                .filter(|(k, _)| k.as_str() != crate::gang::demand::PODS)
                .map(|(k, v)| (k.clone(), format!("{v}m")))
                .collect::<BTreeMap<String, String>>()
        };
        let object = |api_version: &str, kind: &str, plural: &str, spec: serde_json::Value| {
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            GangObject {
                group: group.into(),
                version: version.into(),
                kind: kind.into(),
                plural: plural.into(),
                body: serde_json::json!({
                    "apiVersion": api_version, "kind": kind, "metadata": meta, "spec": spec,
                }),
            }
        };
        Ok(match sched.gang_policy {
            GangPolicy::Builtin => vec![],
            GangPolicy::Workload => {
                let mut policy = serde_json::json!({
                    "schedulingPolicy": {"gang": {"minCount": world}},
                });
                if let Some(pc) = &sched.priority_class_name {
                    policy["priorityClassName"] = pc.clone().into();
                }
                if let Some(t) = sched
                    .topology
                    .as_ref()
                    .filter(|t| t.mode == TopologyMode::Required)
                {
                    policy["schedulingConstraints"] =
                        serde_json::json!({"topology": [{"key": t.key}]});
                }
                let mut template = policy.clone();
                template["name"] = WORKLOAD_TEMPLATE.into();
                let mut group = policy;
                group["podGroupTemplateRef"] = serde_json::json!({"workload": {
                    "workloadName": self.name, "podGroupTemplateName": WORKLOAD_TEMPLATE}});
                vec![
                    object(
                        "scheduling.k8s.io/v1alpha2",
                        "Workload",
                        "workloads",
                        serde_json::json!({
                            "controllerRef": {"apiGroup": "lockstep.dev", "kind": "ParallelJob", "name": self.name},
                            "podGroupTemplates": [template],
                        }),
                    ),
                    object("scheduling.k8s.io/v1alpha2", "PodGroup", "podgroups", group),
                ]
            }
            GangPolicy::Coscheduling => {
                let mut spec = serde_json::json!({"minMember": world, "minResources": total});
                if let Some(t) = sched.schedule_timeout_seconds {
                    spec["scheduleTimeoutSeconds"] = t.into();
                }
                vec![object(
                    "scheduling.x-k8s.io/v1alpha1",
                    "PodGroup",
                    "podgroups",
                    spec,
                )]
            }
            GangPolicy::Kueue => {
                let spec = crate::kueue::workload_spec(
                    self.job,
                    self.layout.world_size(),
                    self.workload_template()?,
                    self.priority,
                );
                let mut w = object(
                    &format!("{}/{}", crate::kueue::GROUP, crate::kueue::VERSION),
                    crate::kueue::KIND,
                    crate::kueue::PLURAL,
                    spec,
                );
                w.body["metadata"]["annotations"] = serde_json::json!({
                    crate::kueue::SPEC_HASH_ANNOTATION: self.workload_hash()?,
                });
                vec![w]
            }
            GangPolicy::Volcano => {
                let mut spec = serde_json::json!({"minMember": world, "minResources": total});
                if let Some(q) = &sched.queue {
                    spec["queue"] = q.clone().into();
                }
                if let Some(pc) = &sched.priority_class_name {
                    spec["priorityClassName"] = pc.clone().into();
                }
                vec![object(
                    "scheduling.volcano.sh/v1beta1",
                    "PodGroup",
                    "podgroups",
                    spec,
                )]
            }
        })
    }

    /// Points the pod at the external gang scheduler of `gangPolicy` (nothing for Builtin).
    fn wire_gang_scheduler(&self, spec: &mut PodSpec) {
        match self.job.spec.scheduling.gang_policy {
            GangPolicy::Builtin => {}
            GangPolicy::Workload => {
                spec.scheduling_group = Some(PodSchedulingGroup {
                    pod_group_name: Some(self.name.to_string()),
                });
            }
            GangPolicy::Coscheduling => {
                spec.scheduler_name
                    .get_or_insert_with(|| COSCHEDULING_SCHEDULER.into());
            }
            GangPolicy::Volcano => {
                spec.scheduler_name = Some(VOLCANO_SCHEDULER.into());
            }
            // Kueue admits; kube-scheduler (or the template's scheduler) places the pods.
            GangPolicy::Kueue => {}
        }
    }

    /// The pod template of the Kueue Workload's pod set: a rank's pod, with every resource that
    /// has a limit and no request requesting its limit (what the API server defaults in a pod,
    /// and Kueue's job framework in the Workloads it writes: quota counts requests).
    pub fn workload_template(&self) -> Result<serde_json::Value> {
        let pod = self.pod(0, 0, "", false, None)?;
        let mut spec = pod.spec.unwrap_or_default();
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            if let Some(r) = c.resources.as_mut() {
                let limits = r.limits.clone().unwrap_or_default();
                let requests = r.requests.get_or_insert_with(Default::default);
                for (k, v) in limits {
                    requests.entry(k).or_insert(v);
                }
            }
        }
        let meta = &pod.metadata;
        Ok(serde_json::json!({
            "metadata": {"labels": meta.labels, "annotations": meta.annotations},
            "spec": spec,
        }))
    }

    /// The hash of what the job asks of Kueue (see [`crate::kueue::spec_hash`]).
    pub fn workload_hash(&self) -> Result<String> {
        let spec = crate::kueue::workload_spec(
            self.job,
            self.layout.world_size(),
            self.workload_template()?,
            self.priority,
        );
        Ok(crate::kueue::spec_hash(&spec))
    }

    /// The annotation or label that ties a pod to its external PodGroup.
    fn group_annotation(&self) -> Option<(&'static str, String)> {
        match self.job.spec.scheduling.gang_policy {
            GangPolicy::Volcano => Some(("scheduling.k8s.io/group-name", self.name.to_string())),
            _ => None,
        }
    }

    /// Name (and hostname) of rank `rank`'s pod: stable across attempts, because an attempt
    /// starts only after every pod of the previous one is gone.
    pub fn pod_name(&self, rank: u32) -> String {
        format!("{}-{rank}", self.name)
    }

    /// DNS name of rank 0 inside the cluster.
    pub fn rank0_host(&self) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod_name(0),
            self.service_name(),
            self.namespace
        )
    }

    /// The owner reference that ties an object to the job (garbage-collected with it).
    pub fn owner_reference(&self) -> Result<OwnerReference> {
        self.job
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))
    }

    /// Labels every owned object carries.
    pub fn common_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::JOB_NAME.to_string(), self.name.to_string()),
            (labels::JOB_UID.to_string(), self.uid().to_string()),
            (
                labels::APP_NAME_KEY.to_string(),
                labels::APP_NAME.to_string(),
            ),
            (labels::INSTANCE.to_string(), self.name.to_string()),
            (
                labels::MANAGED_BY.to_string(),
                operator::FIELD_MANAGER.to_string(),
            ),
        ])
    }

    fn meta(&self, name: String) -> Result<ObjectMeta> {
        Ok(ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(self.common_labels()),
            owner_references: Some(vec![self.owner_reference()?]),
            ..ObjectMeta::default()
        })
    }

    /// The headless Service: `<job>-<rank>.<job>.<namespace>.svc` resolves for every rank, even
    /// before it is Ready (ranks must find rank 0 to become ready at all).
    ///
    /// It has no selector: the operator writes its EndpointSlice ([`Self::endpoint_slice`]) once
    /// per attempt, when every rank has an address. With a selector, Kubernetes' endpoints and
    /// EndpointSlice controllers rewrite both objects on every change of every pod (about ten
    /// writes a job while a gang starts, and most of the control plane's cost of this design).
    pub fn service(&self) -> Result<Service> {
        Ok(Service {
            metadata: self.meta(self.service_name())?,
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                ports: Some(
                    self.ports()
                        .map(|(name, port)| service_port(name, port))
                        .to_vec(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    /// The ports the Service and its EndpointSlice name.
    fn ports(&self) -> [(&'static str, u16); 3] {
        [
            ("rendezvous", ports::RENDEZVOUS),
            ("torch", ports::TORCH_MASTER),
            ("metrics", self.metrics_port()),
        ]
    }

    /// Name of the EndpointSlice of the Service.
    pub fn endpoint_slice_name(&self) -> String {
        format!("{}-ranks", self.service_name())
    }

    /// The EndpointSlice of the Service: each rank's pod as an endpoint with its hostname (so
    /// `<job>-<rank>.<job>` resolves) and its address, from `ranks` (rank, pod IP). Addresses of
    /// another family than the first are left out (a slice holds one family).
    pub fn endpoint_slice(&self, ranks: &[(u32, String)]) -> Result<EndpointSlice> {
        let family = |ip: &str| if ip.contains(':') { "IPv6" } else { "IPv4" };
        let address_type = ranks.first().map_or("IPv4", |(_, ip)| family(ip));
        let mut meta = self.meta(self.endpoint_slice_name())?;
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(SERVICE_NAME_LABEL.into(), self.service_name());
        labels.insert(MANAGED_BY_LABEL.into(), SLICE_MANAGER.into());
        Ok(EndpointSlice {
            metadata: meta,
            address_type: address_type.into(),
            endpoints: Some(
                ranks
                    .iter()
                    .filter(|(_, ip)| family(ip) == address_type)
                    .map(|(rank, ip)| Endpoint {
                        addresses: vec![ip.clone()],
                        hostname: Some(self.pod_name(*rank)),
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..EndpointConditions::default()
                        }),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(self.pod_name(*rank)),
                            namespace: Some(self.namespace.to_string()),
                            ..ObjectReference::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(
                self.ports()
                    .map(|(name, port)| EndpointPort {
                        name: Some(name.into()),
                        port: Some(i32::from(port)),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    })
                    .to_vec(),
            ),
        })
    }

    fn metrics_port(&self) -> u16 {
        u16::try_from(self.job.spec.monitoring.metrics_port).unwrap_or(ports::METRICS)
    }

    /// The ConfigMap with the worker config (mounted in every pod at the config path).
    pub fn config_map(&self) -> Result<(ConfigMap, String)> {
        let config = WorkerConfig::from_job(self.job)?;
        let digest = config.digest();
        let mut data = BTreeMap::new();
        data.insert(operator::CONFIG_KEY.to_string(), config.to_json());
        let mut meta = self.meta(self.config_map_name())?;
        meta.annotations = Some(BTreeMap::from([(
            annotations::CONFIG_DIGEST.to_string(),
            digest.clone(),
        )]));
        Ok((
            ConfigMap {
                metadata: meta,
                data: Some(data),
                ..ConfigMap::default()
            },
            digest,
        ))
    }

    /// Name of the token Secret: it carries the job's UID (see [`names::token_secret`]).
    pub fn token_secret_name(&self) -> String {
        names::token_secret(self.name, self.uid())
    }

    /// The Secret with the job's rendezvous token: every rank presents it, so that no pod of
    /// another job can join the gang. Created once (never re-applied: the token must not change
    /// under running ranks).
    pub fn token_secret(&self, token: &str) -> Result<Secret> {
        Ok(Secret {
            metadata: self.meta(self.token_secret_name())?,
            string_data: Some(BTreeMap::from([(
                names::TOKEN_KEY.to_string(),
                token.to_string(),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        })
    }

    /// The ConfigMap rank 0 writes its progress into; created empty, once.
    pub fn progress_config_map(&self) -> Result<ConfigMap> {
        let mut meta = self.meta(names::progress_config_map(self.name))?;
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(labels::COMPONENT.into(), names::PROGRESS_COMPONENT.into());
        Ok(ConfigMap {
            metadata: meta,
            ..ConfigMap::default()
        })
    }

    /// The ServiceAccount the worker pods run as: the template's own, or `<job>-worker`.
    pub fn worker_service_account_name(&self) -> Result<String> {
        Ok(self
            .template_spec()?
            .service_account_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| names::worker_service_account(self.name)))
    }

    /// `<job>-worker`, unless the template names its own ServiceAccount.
    pub fn service_account(&self) -> Result<Option<ServiceAccount>> {
        let name = self.worker_service_account_name()?;
        if name != names::worker_service_account(self.name) {
            return Ok(None);
        }
        Ok(Some(ServiceAccount {
            metadata: self.meta(name)?,
            ..ServiceAccount::default()
        }))
    }

    /// The only thing a worker may do with the API: patch its job's progress ConfigMap (by
    /// name; it cannot read it, create, list or touch anything else). A merge patch is all
    /// `lockstep_worker::progress::report` sends, and only rank 0 holds a token to send it with
    /// (see [`Self::pod`]).
    pub fn progress_role(&self) -> Result<Role> {
        Ok(Role {
            metadata: self.meta(names::progress_role(self.name))?,
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                resource_names: Some(vec![names::progress_config_map(self.name)]),
                verbs: vec!["patch".into()],
                ..PolicyRule::default()
            }]),
        })
    }

    /// Binds [`Self::progress_role`] to the workers' ServiceAccount.
    pub fn progress_role_binding(&self) -> Result<RoleBinding> {
        Ok(RoleBinding {
            metadata: self.meta(names::progress_role(self.name))?,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: names::progress_role(self.name),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: self.worker_service_account_name()?,
                namespace: Some(self.namespace.to_string()),
                ..Subject::default()
            }]),
        })
    }

    /// Digest of the worker config (what the ConfigMap carries, without building it).
    pub fn config_digest(&self) -> Result<String> {
        Ok(WorkerConfig::from_job(self.job)?.digest())
    }

    /// The container the operator fills in: the one named `worker`, or the only one.
    pub fn worker_container_index(&self) -> Result<usize> {
        self.template_spec()?; // a template without a pod spec is its own error
        self.job
            .spec
            .worker_container()
            .map(|(i, _)| i)
            .ok_or(Error::NoWorkerContainer)
    }

    fn template_spec(&self) -> Result<&PodSpec> {
        self.job
            .spec
            .template
            .spec
            .as_ref()
            .ok_or(Error::MissingField("spec.template.spec"))
    }

    /// The env contract of one rank of one attempt.
    pub fn env(&self, rank: u32, attempt: i32, config_path: &str) -> Vec<EnvVar> {
        let contract = env::RankEnv {
            job: self.name.to_string(),
            job_uid: self.uid().to_string(),
            namespace: self.namespace.to_string(),
            rank,
            world_size: self.layout.world_size(),
            attempt: attempt.max(0) as u32,
            master_host: self.rank0_host(),
            rendezvous_port: ports::RENDEZVOUS,
            torch_port: ports::TORCH_MASTER,
            config: config_path.to_string(),
            checkpoint_dir: paths::job_checkpoints(
                &self.job.spec.training.checkpoint.path,
                self.name,
                self.uid(),
            ),
            metrics_port: self.metrics_port(),
            stage: self.layout.stage_of(rank),
            replica: self.layout.replica_of(rank),
        };
        contract
            .pairs()
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.to_string(),
                value: Some(value),
                value_from: None,
            })
            .collect()
    }

    /// The pod of rank `rank` in attempt `attempt`. With `gated`, it carries the gang scheduling
    /// gate and is not scheduled until gang admission removes it; with `pin`, it may only be
    /// scheduled onto the node gang admission planned for it (required node affinity, ANDed with
    /// the template's own) and says so in the planned-node annotation.
    ///
    /// Only rank 0 gets a service-account token: it alone talks to the API server (it reports
    /// progress), so every other rank's pod says `automountServiceAccountToken: false`, unless
    /// the template sets that field itself, which is then kept on every rank.
    pub fn pod(
        &self,
        rank: u32,
        attempt: i32,
        config_digest: &str,
        gated: bool,
        pin: Option<&Pin<'_>>,
    ) -> Result<Pod> {
        let template = &self.job.spec.template;
        let mut spec = self.template_spec()?.clone();
        let worker = self.worker_container_index()?;
        let config_path = format!("{}/{}", operator::CONFIG_MOUNT_DIR, operator::CONFIG_KEY);

        let c: &mut Container = &mut spec.containers[worker];
        let mut env_vars = self.env(rank, attempt, &config_path);
        env_vars.push(EnvVar {
            name: env::TOKEN.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: self.token_secret_name(),
                    key: names::TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
        });
        env_vars.extend(c.env.take().unwrap_or_default());
        c.env = Some(env_vars);
        if self.job.spec.training.workload != Workload::Command && c.command.is_none() {
            c.command = Some(WORKER_COMMAND.iter().map(|s| s.to_string()).collect());
        }
        let mut ports_list = c.ports.take().unwrap_or_default();
        for (name, port) in [
            ("rendezvous", ports::RENDEZVOUS),
            ("metrics", self.metrics_port()),
        ] {
            if !ports_list
                .iter()
                .any(|p| p.container_port == i32::from(port))
            {
                ports_list.push(ContainerPort {
                    name: Some(name.into()),
                    container_port: i32::from(port),
                    ..ContainerPort::default()
                });
            }
        }
        c.ports = Some(ports_list);
        let gpus = self.job.spec.parallelism.gpus_per_worker;
        if gpus > 0 {
            let res = c
                .resources
                .get_or_insert_with(ResourceRequirements::default);
            res.limits
                .get_or_insert_with(BTreeMap::new)
                .insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
        }
        // The restricted Pod Security level where the template says nothing (the worker needs
        // no privilege): see `restricted_pod`.
        c.security_context.get_or_insert_with(|| SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        });
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: "lockstep-config".into(),
                mount_path: operator::CONFIG_MOUNT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: "lockstep-config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: self.config_map_name(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        let command = self.job.spec.training.workload == Workload::Command;
        spec.security_context
            .get_or_insert_with(|| restricted_pod(command));
        spec.hostname = Some(self.pod_name(rank));
        spec.subdomain = Some(self.service_name());
        spec.service_account_name = Some(self.worker_service_account_name()?);
        if rank != 0 {
            spec.automount_service_account_token.get_or_insert(false);
        }
        // A failed rank fails the gang; the operator restarts the whole gang, never one pod.
        spec.restart_policy = Some("Never".into());
        spec.termination_grace_period_seconds
            .get_or_insert(DEFAULT_GRACE_SECONDS);
        if let Some(pc) = &self.job.spec.scheduling.priority_class_name {
            spec.priority_class_name = Some(pc.clone());
        }
        if let Some(pin) = pin {
            pin_to(&mut spec, pin);
        }
        self.wire_gang_scheduler(&mut spec);
        if gated {
            spec.scheduling_gates
                .get_or_insert_with(Vec::new)
                .push(PodSchedulingGate {
                    name: operator::SCHEDULING_GATE.into(),
                });
        }

        let mut meta = self.meta(self.pod_name(rank))?;
        let mut pod_labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        pod_labels.extend(self.common_labels());
        pod_labels.insert(labels::RANK.into(), rank.to_string());
        pod_labels.insert(labels::STAGE.into(), self.layout.stage_of(rank).to_string());
        pod_labels.insert(
            labels::REPLICA.into(),
            self.layout.replica_of(rank).to_string(),
        );
        pod_labels.insert(labels::ATTEMPT.into(), attempt.to_string());
        pod_labels.insert(labels::COMPONENT.into(), "worker".into());
        if self.job.spec.scheduling.gang_policy == GangPolicy::Coscheduling {
            pod_labels.insert(COSCHEDULING_LABEL.into(), self.name.to_string());
        }
        meta.labels = Some(pod_labels);
        let mut pod_annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        pod_annotations.insert(annotations::CONFIG_DIGEST.into(), config_digest.to_string());
        if let Some(pin) = pin {
            pod_annotations.insert(annotations::PLANNED_NODE.into(), pin.node.to_string());
        }
        if let Some(group) = self.group_annotation() {
            pod_annotations.insert(group.0.into(), group.1);
        }
        meta.annotations = Some(pod_annotations);
        Ok(Pod {
            metadata: meta,
            spec: Some(spec),
            status: None,
        })
    }
}

/// The name of the Workload's pod group template.
pub const WORKLOAD_TEMPLATE: &str = "workers";
/// The scheduler name of a scheduler-plugins install that runs Coscheduling (the name its Helm
/// chart gives); the template's `schedulerName` wins when it sets one.
pub const COSCHEDULING_SCHEDULER: &str = "scheduler-plugins-scheduler";
/// The label that puts a pod into a Coscheduling PodGroup.
pub const COSCHEDULING_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// Volcano's scheduler name.
pub const VOLCANO_SCHEDULER: &str = "volcano";

/// An object an external gang scheduler reads, ready for server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct GangObject {
    /// API group.
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural resource name.
    pub plural: String,
    /// The object.
    pub body: serde_json::Value,
}

/// The node gang admission planned a rank onto.
#[derive(Clone, Copy, Debug)]
pub struct Pin<'a> {
    /// Node name.
    pub node: &'a str,
    /// The node's `kubernetes.io/hostname` label, when it has one.
    pub hostname: Option<&'a str>,
}

/// Label that ties an EndpointSlice to its Service (what DNS servers look up).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label that says which controller manages an EndpointSlice (Kubernetes' own leaves the others
/// alone).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// This operator's value of [`MANAGED_BY_LABEL`] (a label value, so no `/`; Kubernetes' own is
/// `endpointslice-controller.k8s.io`).
pub const SLICE_MANAGER: &str = "lockstep-operator.lockstep.dev";

/// Label that names a node's host.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// The user of Lockstep's worker image.
pub const WORKER_IMAGE_USER: i64 = 65532;

/// The pod-level part of the restricted Pod Security level, for a template without a pod
/// securityContext: the RuntimeDefault seccomp profile and, for the built-in workloads (whose
/// image runs as the non-root user 65532), `runAsNonRoot` and that user's group as `fsGroup`, so
/// that a volume mounted for checkpoints (a PersistentVolumeClaim, an emptyDir) is writable by the
/// worker (changed only where its root's group differs, as large volumes are slow to walk). A
/// `Command` workload's image may run as root (PyTorch's do), so it is not made to run as
/// non-root: such a template sets its own user to run in a namespace that enforces the
/// restricted level.
fn restricted_pod(command: bool) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: (!command).then_some(true),
        fs_group: (!command).then_some(WORKER_IMAGE_USER),
        fs_group_change_policy: (!command).then(|| "OnRootMismatch".to_string()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Adds the pin as a required node affinity, added to every term of the template's own required
/// affinity (terms are ORed, requirements within a term ANDed), so both must hold: the node's
/// `kubernetes.io/hostname` (when it has that label), and its name as a field
/// (`metadata.name`, as DaemonSet pods are pinned). The field lets kube-scheduler's PreFilter
/// narrow the candidates to that one node instead of filtering every node of the cluster.
fn pin_to(spec: &mut PodSpec, pin: &Pin<'_>) {
    let requirement = |key: &str, value: &str| NodeSelectorRequirement {
        key: key.into(),
        operator: "In".into(),
        values: Some(vec![value.into()]),
    };
    let terms = &mut spec
        .affinity
        .get_or_insert_with(Affinity::default)
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default)
        .node_selector_terms;
    if terms.is_empty() {
        terms.push(NodeSelectorTerm::default());
    }
    for term in terms.iter_mut() {
        if let Some(h) = pin.hostname {
            term.match_expressions
                .get_or_insert_with(Vec::new)
                .push(requirement(HOSTNAME_LABEL, h));
        }
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(requirement("metadata.name", pin.node));
    }
}

fn service_port(name: &str, port: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: i32::from(port),
        ..ServicePort::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn job(yaml: &str) -> ParallelJob {
        let text =
            std::fs::read_to_string(format!("{}/../examples/{yaml}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let mut job = lockstep_api::validation::validate_yaml(&text).unwrap();
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn pods_carry_the_env_contract_and_labels() {
        let j = job("pipeline-gpt.yaml");
        let ctx = JobContext::new(&j).unwrap();
        let pod = ctx.pod(3, 2, "abc", false, None).unwrap();
        let e = env_of(&pod);
        assert_eq!(e[env::RANK], "3");
        assert_eq!(e[env::WORLD_SIZE], "4");
        assert_eq!(e[env::ATTEMPT], "2");
        assert_eq!(e[env::STAGE], "1");
        assert_eq!(e[env::REPLICA], "1");
        assert_eq!(
            e[env::RENDEZVOUS],
            "pipeline-gpt-0.pipeline-gpt.team-a.svc:29600"
        );
        assert_eq!(
            e[env::MASTER_ADDR],
            "pipeline-gpt-0.pipeline-gpt.team-a.svc"
        );
        assert_eq!(
            (
                e[env::TORCH_RANK].as_str(),
                e[env::TORCH_WORLD_SIZE].as_str()
            ),
            ("3", "4")
        );
        assert_eq!(
            (e[env::PET_NODE_RANK].as_str(), e[env::PET_NNODES].as_str()),
            ("3", "4")
        );
        assert_eq!(e[env::CONFIG], "/etc/lockstep/worker.json");
        // Checkpoints go to a folder of this job's own: its name and UID under the path.
        assert_eq!(e[env::JOB_UID], "uid-1");
        assert_eq!(
            e[env::CHECKPOINT_DIR],
            "/var/lib/lockstep/checkpoints/pipeline-gpt/uid-1"
        );
        // Every name the operator sets is one a user may not set.
        assert!(e.keys().all(|k| env::is_reserved(k)), "{:?}", e.keys());

        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l[labels::RANK], "3");
        assert_eq!(l[labels::STAGE], "1");
        assert_eq!(l[labels::ATTEMPT], "2");
        assert_eq!(l[labels::JOB_NAME], "pipeline-gpt");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("pipeline-gpt-3"));
        assert_eq!(spec.subdomain.as_deref(), Some("pipeline-gpt"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            pod.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        assert_eq!(
            spec.containers[0].command.as_deref().unwrap(),
            ["lockstep-worker", "run"]
        );
    }

    #[test]
    fn pods_default_to_the_restricted_level_only_where_the_template_says_nothing() {
        let j = job("ddp-digits.yaml");
        let pod = JobContext::new(&j)
            .unwrap()
            .pod(0, 0, "d", false, None)
            .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let psc = spec
            .security_context
            .as_ref()
            .expect("a pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        // A checkpoint volume is the worker's to write.
        assert_eq!(psc.fs_group, Some(WORKER_IMAGE_USER));
        assert_eq!(
            psc.fs_group_change_policy.as_deref(),
            Some("OnRootMismatch")
        );
        let csc = spec.containers[0]
            .security_context
            .as_ref()
            .expect("a container one");
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(
            csc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );

        // The template's own contexts are kept as they are.
        let mut own = job("ddp-digits.yaml");
        let t = own.spec.template.spec.as_mut().unwrap();
        t.security_context = Some(PodSecurityContext {
            run_as_user: Some(1000),
            ..PodSecurityContext::default()
        });
        t.containers[0].security_context = Some(SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        });
        let pod = JobContext::new(&own)
            .unwrap()
            .pod(0, 0, "d", false, None)
            .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.security_context,
            own.spec.template.spec.as_ref().unwrap().security_context
        );
        assert_eq!(
            spec.containers[0]
                .security_context
                .as_ref()
                .unwrap()
                .privileged,
            Some(true)
        );

        // A Command workload's image may run as root: it is not made to run as non-root.
        let cmd = job("torch-command.yaml");
        let pod = JobContext::new(&cmd)
            .unwrap()
            .pod(0, 0, "d", false, None)
            .unwrap();
        let psc = pod.spec.as_ref().unwrap().security_context.clone().unwrap();
        assert_eq!((psc.run_as_non_root, psc.fs_group), (None, None));
        assert!(psc.seccomp_profile.is_some());
    }

    #[test]
    fn gpus_gates_and_user_env_are_kept() {
        let mut j = job("ddp-digits.yaml");
        j.spec.parallelism.gpus_per_worker = 8;
        j.spec.template.spec.as_mut().unwrap().containers[0].env = Some(vec![EnvVar {
            name: "NCCL_DEBUG".into(),
            value: Some("INFO".into()),
            value_from: None,
        }]);
        let ctx = JobContext::new(&j).unwrap();
        let pod = ctx.pod(0, 0, "d", true, None).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits[GPU_RESOURCE].0, "8");
        assert_eq!(limits["memory"].0, "1Gi", "the template's own limits stay");
        assert_eq!(
            spec.scheduling_gates.as_ref().unwrap()[0].name,
            operator::SCHEDULING_GATE
        );
        assert_eq!(env_of(&pod)["NCCL_DEBUG"], "INFO");
    }

    #[test]
    fn a_pinned_pod_must_meet_its_planned_node_and_the_templates_own_affinity() {
        let mut j = job("ddp-digits.yaml");
        j.spec.template.spec.as_mut().unwrap().affinity = Some(
            serde_json::from_value(serde_json::json!({"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}
            ]}}}))
            .unwrap(),
        );
        let ctx = JobContext::new(&j).unwrap();
        let pin = Pin {
            node: "node-7",
            hostname: Some("host-7"),
        };
        let pod = ctx.pod(1, 0, "d", true, Some(&pin)).unwrap();
        let terms = &pod
            .spec
            .as_ref()
            .unwrap()
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2, "the template's terms stay ORed");
        for t in terms {
            let exprs = t.match_expressions.as_ref().unwrap();
            assert_eq!(exprs[0].key, "zone", "the template's requirement stays");
            assert_eq!(
                (exprs[1].key.as_str(), exprs[1].values.as_deref()),
                (HOSTNAME_LABEL, Some(&["host-7".to_string()][..]))
            );
            let fields = t.match_fields.as_ref().unwrap();
            assert_eq!(
                (fields[0].key.as_str(), fields[0].values.as_deref()),
                ("metadata.name", Some(&["node-7".to_string()][..]))
            );
        }
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[annotations::PLANNED_NODE],
            "node-7"
        );
        assert_eq!(
            pod.spec
                .as_ref()
                .unwrap()
                .scheduling_gates
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn external_gang_policies_get_their_group_objects_and_scheduler() {
        let mut j = job("ddp-digits.yaml");
        j.spec.parallelism.gpus_per_worker = 2;
        assert!(
            JobContext::new(&j)
                .unwrap()
                .gang_objects()
                .unwrap()
                .is_empty(),
            "Builtin writes none"
        );

        j.spec.scheduling.gang_policy = GangPolicy::Workload;
        j.spec.scheduling.priority_class_name = Some("high".into());
        let ctx = JobContext::new(&j).unwrap();
        let objs = ctx.gang_objects().unwrap();
        let kinds: Vec<&str> = objs.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["Workload", "PodGroup"]);
        let template = &objs[0].body["spec"]["podGroupTemplates"][0];
        assert_eq!(template["schedulingPolicy"]["gang"]["minCount"], 2);
        assert_eq!(template["priorityClassName"], "high");
        assert_eq!(
            objs[1].body["spec"]["podGroupTemplateRef"]["workload"]["workloadName"],
            "ddp-digits"
        );
        let pod = ctx.pod(0, 0, "d", false, None).unwrap();
        assert_eq!(
            pod.spec
                .unwrap()
                .scheduling_group
                .unwrap()
                .pod_group_name
                .as_deref(),
            Some("ddp-digits")
        );

        j.spec.scheduling.gang_policy = GangPolicy::Coscheduling;
        j.spec.scheduling.schedule_timeout_seconds = Some(120);
        let ctx = JobContext::new(&j).unwrap();
        let objs = ctx.gang_objects().unwrap();
        assert_eq!(
            (objs[0].group.as_str(), objs[0].kind.as_str()),
            ("scheduling.x-k8s.io", "PodGroup")
        );
        let spec = &objs[0].body["spec"];
        assert_eq!(
            (
                spec["minMember"].as_i64(),
                spec["scheduleTimeoutSeconds"].as_i64()
            ),
            (Some(2), Some(120))
        );
        assert_eq!(spec["minResources"][GPU_RESOURCE], "4000m");
        let pod = ctx.pod(0, 0, "d", false, None).unwrap();
        assert_eq!(
            pod.metadata.labels.as_ref().unwrap()[COSCHEDULING_LABEL],
            "ddp-digits"
        );
        assert_eq!(
            pod.spec.unwrap().scheduler_name.as_deref(),
            Some(COSCHEDULING_SCHEDULER)
        );

        j.spec.scheduling.gang_policy = GangPolicy::Volcano;
        j.spec.scheduling.queue = Some("research".into());
        let ctx = JobContext::new(&j).unwrap();
        let objs = ctx.gang_objects().unwrap();
        assert_eq!(objs[0].group, "scheduling.volcano.sh");
        assert_eq!(objs[0].body["spec"]["queue"], "research");
        let pod = ctx.pod(0, 0, "d", false, None).unwrap();
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()["scheduling.k8s.io/group-name"],
            "ddp-digits"
        );
        assert_eq!(
            pod.spec.unwrap().scheduler_name.as_deref(),
            Some(VOLCANO_SCHEDULER)
        );
    }

    #[test]
    fn command_jobs_keep_their_command_and_use_their_only_container() {
        let mut j = job("torch-command.yaml");
        j.spec.template.spec.as_mut().unwrap().containers[0].name = "pytorch".into();
        let ctx = JobContext::new(&j).unwrap();
        let pod = ctx.pod(1, 0, "d", false, None).unwrap();
        let c = &pod.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.command.as_deref().unwrap(), ["bash", "-c"]);
        assert_eq!(env_of(&pod)[env::MASTER_PORT], "29500");
    }

    #[test]
    fn workers_get_the_token_from_the_secret_and_a_service_account_that_only_writes_progress() {
        let j = job("ddp-digits.yaml");
        let ctx = JobContext::new(&j).expect("context");
        let pod = ctx.pod(0, 0, "d", false, None).expect("pod");
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("ddp-digits-worker")
        );
        let token = spec.containers[0]
            .env
            .as_ref()
            .and_then(|e| e.iter().find(|v| v.name == env::TOKEN))
            .and_then(|v| v.value_from.as_ref())
            .and_then(|f| f.secret_key_ref.as_ref())
            .expect("token from a secret");
        assert_eq!(
            (token.name.as_str(), token.key.as_str()),
            ("ddp-digits-token-uid-1", "token"),
            "the UID in the name: no object made before the job can hold it"
        );
        let role = ctx.progress_role().expect("role");
        let rules = role.rules.expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["ddp-digits-progress".to_string()][..])
        );
        // What `lockstep_worker::progress::report` sends: a merge patch, nothing else.
        assert_eq!(rules[0].verbs, ["patch"]);
        let binding = ctx.progress_role_binding().expect("binding");
        assert_eq!(
            binding.subjects.expect("subjects")[0].name,
            "ddp-digits-worker"
        );
        assert!(ctx.service_account().expect("sa").is_some());

        // A template with its own ServiceAccount keeps it; the Role is bound to it instead.
        let mut own = j.clone();
        own.spec
            .template
            .spec
            .as_mut()
            .expect("spec")
            .service_account_name = Some("trainer".into());
        let ctx = JobContext::new(&own).expect("context");
        assert!(ctx.service_account().expect("sa").is_none());
        assert_eq!(
            ctx.progress_role_binding()
                .expect("binding")
                .subjects
                .expect("subjects")[0]
                .name,
            "trainer"
        );
    }

    #[test]
    fn only_rank_0_mounts_the_service_account_token_unless_the_template_says() {
        let j = job("ddp-digits.yaml");
        let ctx = JobContext::new(&j).unwrap();
        let automount = |ctx: &JobContext<'_>, rank| {
            ctx.pod(rank, 0, "d", false, None)
                .unwrap()
                .spec
                .unwrap()
                .automount_service_account_token
        };
        // Rank 0 reports progress with the token; the others never call the API.
        assert_eq!(
            automount(&ctx, 0),
            None,
            "rank 0 keeps the account's default"
        );
        assert_eq!(automount(&ctx, 1), Some(false));

        // The template's own choice wins, on every rank.
        for own in [true, false] {
            let mut j = job("ddp-digits.yaml");
            j.spec
                .template
                .spec
                .as_mut()
                .unwrap()
                .automount_service_account_token = Some(own);
            let ctx = JobContext::new(&j).unwrap();
            assert_eq!(automount(&ctx, 0), Some(own));
            assert_eq!(automount(&ctx, 1), Some(own));
        }
    }

    #[test]
    fn service_is_headless_publishes_not_ready_addresses_and_selects_nothing() {
        let j = job("ddp-digits.yaml");
        let svc = JobContext::new(&j).unwrap().service().unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector, None, "the operator writes its EndpointSlice");
    }

    #[test]
    fn the_endpoint_slice_names_every_rank_by_its_hostname_under_the_service() {
        let j = job("ddp-digits.yaml");
        let ctx = JobContext::new(&j).unwrap();
        let slice = ctx
            .endpoint_slice(&[(0, "10.0.0.7".into()), (1, "10.0.0.9".into())])
            .unwrap();
        let labels = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], ctx.service_name());
        assert_eq!(labels[MANAGED_BY_LABEL], SLICE_MANAGER);
        assert_eq!(
            slice.metadata.owner_references.as_ref().unwrap()[0].kind,
            "ParallelJob"
        );
        assert_eq!(slice.address_type, "IPv4");
        let endpoints = slice.endpoints.unwrap();
        let seen: Vec<(&str, &str, Option<bool>)> = endpoints
            .iter()
            .map(|e| {
                (
                    e.hostname.as_deref().unwrap(),
                    e.addresses[0].as_str(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("ddp-digits-0", "10.0.0.7", Some(true)),
                ("ddp-digits-1", "10.0.0.9", Some(true))
            ]
        );
        // The hostname is the pod's, so `<hostname>.<subdomain>` is the rank's DNS name.
        let pod = ctx.pod(1, 0, "d", false, None).unwrap();
        assert_eq!(
            pod.spec.as_ref().unwrap().hostname.as_deref(),
            Some("ddp-digits-1")
        );
        let names: Vec<Option<String>> = slice.ports.unwrap().into_iter().map(|p| p.name).collect();
        let service_names: Vec<Option<String>> = ctx
            .service()
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, service_names, "the slice names the Service's ports");
        let v6 = ctx
            .endpoint_slice(&[(0, "fd00::1".into()), (1, "10.0.0.9".into())])
            .unwrap();
        assert_eq!(v6.address_type, "IPv6");
        assert_eq!(v6.endpoints.unwrap().len(), 1, "one family per slice");
    }

    #[test]
    fn config_map_holds_the_worker_config_and_its_digest() {
        let j = job("gpt-shakespeare.yaml");
        let (cm, digest) = JobContext::new(&j).unwrap().config_map().unwrap();
        let text = &cm.data.unwrap()[operator::CONFIG_KEY];
        let parsed = WorkerConfig::from_json(text).unwrap();
        assert_eq!(parsed.digest(), digest);
        assert_eq!(
            JobContext::new(&j).unwrap().config_digest().unwrap(),
            digest
        );
        assert_eq!(parsed.training, j.spec.training);
    }
}
