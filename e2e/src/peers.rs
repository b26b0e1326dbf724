//! The operator benchmark's peers: JobSet and the Kubeflow Training Operator, each built from its
//! Go module by `e2e/cluster/build.sh` (versions in `e2e/cluster/versions.env`) and run as a
//! process beside the test control plane, as the Lockstep operator is.
//!
//! Both serve admission webhooks. The API server here reaches them at `https://127.0.0.1:PORT`,
//! so the benchmark makes their certificates itself (a CA and a serving certificate for that
//! address, with `openssl`, as `up.sh` makes the cluster's) and writes their webhook
//! configurations from the module's own manifests, with a URL in place of the in-cluster
//! Service. JobSet's own certificate management is turned off in its configuration file; the
//! Training Operator's cannot be (its rotator always runs), so the benchmark gives it a Secret
//! its rotator accepts as valid and the files in the folder it reads them from.
//!
//! Each peer gets the same client rate limit and workers as the Lockstep operator, where it has
//! a setting for them: 500 requests per second with a burst of 1,000, and 32 workers. JobSet
//! (v0.11.1) has no setting for its workers: its controller runs one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::Cluster;

/// The Lockstep operator's client rate limit (requests per second), given to each peer.
pub const CLIENT_QPS: f64 = lockstep_operator::ratelimit::DEFAULT_QPS;
/// The Lockstep operator's client burst, given to each peer.
pub const CLIENT_BURST: u32 = lockstep_operator::ratelimit::DEFAULT_BURST;

/// A system the benchmark compares the Lockstep operator with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `sigs.k8s.io/jobset`: one JobSet with one replicated Job of the gang's pods; Kubernetes'
    /// Job controller creates them.
    JobSet,
    /// `github.com/kubeflow/training-operator` (v1): one PyTorchJob of 1 master and the other
    /// ranks as workers.
    TrainingOperator,
}

impl Peer {
    /// Parses `PEERS` (comma-separated `jobset`, `training-operator`).
    pub fn parse_list(text: &str) -> Result<Vec<Peer>> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "jobset" => Ok(Peer::JobSet),
                "training-operator" => Ok(Peer::TrainingOperator),
                other => {
                    bail!("PEERS: unknown peer {other:?}; the peers are jobset, training-operator")
                }
            })
            .collect()
    }

    /// The component name of `build.sh` and `PEERS`.
    pub fn name(self) -> &'static str {
        match self {
            Peer::JobSet => "jobset",
            Peer::TrainingOperator => "training-operator",
        }
    }

    /// The Go module and version the peer is built from.
    pub fn module(self) -> Result<String> {
        let versions =
            std::fs::read_to_string(crate::repo_root().join("e2e/cluster/versions.env"))?;
        let (key, module) = match self {
            Peer::JobSet => ("JOBSET_VERSION", "sigs.k8s.io/jobset"),
            Peer::TrainingOperator => (
                "TRAINING_OPERATOR_VERSION",
                "github.com/kubeflow/training-operator",
            ),
        };
        let version = versions
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .with_context(|| format!("{key} in e2e/cluster/versions.env"))?;
        Ok(format!("{module}@v{}", version.trim()))
    }

    /// Builds the peer (or finds it cached) and returns its binary.
    pub fn build(self) -> Result<PathBuf> {
        let out = std::process::Command::new(crate::repo_root().join("e2e/cluster/build.sh"))
            .env("COMPONENTS", self.name())
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running e2e/cluster/build.sh")?;
        if !out.status.success() {
            bail!("e2e/cluster/build.sh failed to build {}", self.name());
        }
        let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let module = self.module()?;
        let version = module.rsplit_once('@').map(|m| m.1).unwrap_or_default();
        Ok(bin.join(format!("{}-{version}", self.name())))
    }

    /// A gang of `ranks` pods with `template` (a pod template: metadata and spec) in `ns`, as this
    /// peer's job `name`.
    pub fn job(self, name: &str, ns: &str, ranks: usize, template: &Value) -> Value {
        match self {
            Peer::JobSet => json!({
                "apiVersion": "jobset.x-k8s.io/v1alpha2",
                "kind": "JobSet",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "failurePolicy": {"maxRestarts": 0},
                    "replicatedJobs": [{
                        "name": "workers",
                        "replicas": 1,
                        "template": {"spec": {
                            "parallelism": ranks,
                            "completions": ranks,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": with_restart_policy(template, "Never"),
                        }},
                    }],
                },
            }),
            Peer::TrainingOperator => {
                // The Training Operator finds the framework's container by name.
                let mut template = with_restart_policy(template, "OnFailure");
                template["spec"]["containers"][0]["name"] = "pytorch".into();
                let mut spec = json!({
                    "Master": {"replicas": 1, "restartPolicy": "OnFailure",
                        "template": template.clone()},
                });
                if ranks > 1 {
                    spec["Worker"] = json!({"replicas": ranks - 1, "restartPolicy": "OnFailure",
                        "template": template});
                }
                json!({
                    "apiVersion": "kubeflow.org/v1",
                    "kind": "PyTorchJob",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"pytorchReplicaSpecs": spec},
                })
            }
        }
    }

    /// The peer's resource in the API (for request counts and clean-up): `jobsets` or
    /// `pytorchjobs`.
    pub fn resource(self) -> &'static str {
        match self {
            Peer::JobSet => "jobsets",
            Peer::TrainingOperator => "pytorchjobs",
        }
    }
}

fn with_restart_policy(template: &Value, policy: &str) -> Value {
    let mut t = template.clone();
    t["spec"]["restartPolicy"] = policy.into();
    t
}

/// A peer running beside the cluster; [`Running::stop`] ends it and removes its webhooks.
pub struct Running {
    /// Which peer.
    pub peer: Peer,
    /// Its process.
    pub child: tokio::process::Child,
    /// Its webhook configurations, deleted on stop (a pod webhook whose server is gone would
    /// refuse every pod of the phases after it).
    webhooks: Vec<(&'static str, String)>,
}

impl Running {
    /// The process id (for its CPU seconds).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Stops the peer and deletes its webhook configurations.
    pub async fn stop(mut self, cluster: &Cluster) -> Result<()> {
        let _ = self.child.kill().await;
        for (kind, name) in &self.webhooks {
            cluster
                .kubectl(&["delete", kind, name, "--ignore-not-found"])
                .await?;
        }
        Ok(())
    }
}

/// The folder of a Go module's source (downloaded into the module cache when not there).
fn module_dir(module: &str) -> Result<PathBuf> {
    let out = std::process::Command::new("go")
        .args(["mod", "download", "-json", module])
        .env("GOWORK", "off")
        .env("GOFLAGS", "-mod=mod")
        .output()
        .context("running go mod download")?;
    let info: Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("go mod download {module}"))?;
    Ok(PathBuf::from(info["Dir"].as_str().with_context(|| {
        format!("go mod download {module}: no Dir")
    })?))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct free TCP ports on 127.0.0.1 (held open together while they are picked).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Makes a CA (its own name as a DNS name too: cert-controller checks the CA as a certificate
/// for that name) and a serving certificate signed by it for 127.0.0.1 and `dns`, in `dir`:
/// `ca.crt`, `ca.key`, `tls.crt`, `tls.key`.
pub fn make_certs(dir: &Path, ca_name: &str, dns: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        &format!("/CN={ca_name}"),
        "-addext",
        &format!("subjectAltName=DNS:{ca_name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN={dns}"),
        "-keyout",
        &p("tls.key"),
        "-out",
        &p("tls.csr"),
    ])?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:{dns},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
    )?;
    // cert-controller reads RSA keys in PKCS #1 only (openssl 3 writes PKCS #8).
    for key in ["ca.key", "tls.key"] {
        openssl(&["rsa", "-in", &p(key), "-out", &p(key), "-traditional"])?;
    }
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("tls.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("tls.crt"),
    ])?;
    Ok(())
}

/// Rewrites a module's webhook configurations (a multi-document YAML) for a server at
/// `https://127.0.0.1:port`: each webhook's Service reference becomes a URL with the same path,
/// its CA is `ca`, and the configuration gets `name` (by kind) where one is given. Keeps only the
/// webhooks `keep` accepts (by webhook name).
pub fn webhook_configs(
    yaml: &str,
    port: u16,
    ca: &[u8],
    names: &[(&str, &str)],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Value>> {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca);
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(yaml)?;
    let mut out = Vec::new();
    for mut doc in docs.into_iter().filter(|d| d.is_object()) {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        if let Some((_, name)) = names.iter().find(|(k, _)| *k == kind) {
            doc["metadata"]["name"] = (*name).into();
        }
        let Some(hooks) = doc["webhooks"].as_array_mut() else {
            continue;
        };
        hooks.retain(|h| keep(h["name"].as_str().unwrap_or_default()));
        for hook in hooks.iter_mut() {
            let path = hook["clientConfig"]["service"]["path"]
                .as_str()
                .context("a webhook without a service path")?
                .to_string();
            hook["clientConfig"] =
                json!({"url": format!("https://127.0.0.1:{port}{path}"), "caBundle": ca_bundle});
        }
        out.push(doc);
    }
    Ok(out)
}

/// Applies JSON objects with kubectl (server-side).
async fn apply(cluster: &Cluster, objects: &[Value]) -> Result<()> {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let (ok, out) = cluster
        .kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &list.to_string(),
        )
        .await?;
    if !ok {
        bail!("kubectl apply failed: {out}");
    }
    Ok(())
}

/// Waits until `url` answers 200 (a controller's readiness: for a peer, its certificates loaded
/// and its webhooks served), or the process ends.
pub async fn wait_ready(child: &mut tokio::process::Child, url: &str, log: &Path) -> Result<()> {
    for _ in 0..240 {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the peer exited ({status}) before it was ready; see {}",
                log.display()
            );
        }
        if http_ok(url).await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!(
        "the peer was not ready at {url} in 120 s; see {}",
        log.display()
    )
}

/// A plain HTTP GET of `url` (http://host:port/path) that says whether it answered 200.
async fn http_ok(url: &str) -> Result<bool> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").context("an http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    Ok(head.ends_with(b"200"))
}

/// Installs the peer's CRDs and webhooks on `cluster`, starts it (logs under `state/logs`), and
/// waits until it is ready.
pub async fn start(peer: Peer, cluster: &Cluster, state: &Path) -> Result<Running> {
    let bin = peer.build()?;
    let src = module_dir(&peer.module()?)?;
    let dir = state.join(format!("peer-{}", peer.name()));
    std::fs::create_dir_all(&dir)?;
    let [port, probe] = free_ports::<2>()?;
    let log_path = cluster.logs.join(format!("{}.log", peer.name()));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let probe_addr = format!("127.0.0.1:{probe}");
    let webhooks = match peer {
        Peer::JobSet => {
            let crd = src.join("config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml");
            cluster
                .kubectl(&["apply", "--server-side", "-f", &crd.to_string_lossy()])
                .await?;
            let certs = dir.join("certs");
            make_certs(
                &certs,
                "jobset-ca",
                "jobset-webhook-service.jobset-system.svc",
            )?;
            let hooks = webhook_configs(
                &std::fs::read_to_string(src.join("config/components/webhook/manifests.yaml"))?,
                port,
                &std::fs::read(certs.join("ca.crt"))?,
                &[
                    (
                        "MutatingWebhookConfiguration",
                        "jobset-mutating-webhook-configuration",
                    ),
                    (
                        "ValidatingWebhookConfiguration",
                        "jobset-validating-webhook-configuration",
                    ),
                ],
                |_| true,
            )?;
            apply(cluster, &hooks).await?;
            // JobSet's configuration file: its own certificate management off (the files are
            // made above), no leader election, metrics off, the operator's client limits.
            let config = dir.join("config.yaml");
            std::fs::write(
                &config,
                format!(
                    "apiVersion: config.jobset.x-k8s.io/v1alpha1\nkind: Configuration\n\
                     leaderElection: {{leaderElect: false}}\n\
                     internalCertManagement: {{enable: false}}\n\
                     webhook: {{port: {port}, host: 127.0.0.1, certDir: {certs}}}\n\
                     metrics: {{bindAddress: \"0\"}}\n\
                     health: {{healthProbeBindAddress: \"{probe_addr}\"}}\n\
                     clientConnection: {{qps: {CLIENT_QPS}, burst: {CLIENT_BURST}}}\n",
                    certs = certs.display()
                ),
            )?;
            cmd.arg("--config").arg(&config).arg("--zap-log-level=info");
            vec![
                (
                    "mutatingwebhookconfiguration",
                    "jobset-mutating-webhook-configuration".to_string(),
                ),
                (
                    "validatingwebhookconfiguration",
                    "jobset-validating-webhook-configuration".to_string(),
                ),
            ]
        }
        Peer::TrainingOperator => {
            let crd = src.join("manifests/base/crds/kubeflow.org_pytorchjobs.yaml");
            cluster
                .kubectl(&["apply", "--server-side", "-f", &crd.to_string_lossy()])
                .await?;
            // Its rotator keeps the certificates of the Secret `training-operator-webhook-cert`
            // in its namespace when they are valid for its Service name, and waits for them as
            // files in the folder it reads (fixed in its code, and where its webhook server
            // looks too).
            let (ns, svc) = ("kubeflow", "training-operator");
            let certs = dir.join("certs");
            make_certs(&certs, "training-operator-ca", &format!("{svc}.{ns}.svc"))?;
            let read = |f: &str| -> Result<String> { Ok(std::fs::read_to_string(certs.join(f))?) };
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "training-operator-webhook-cert", "namespace": ns},
                "stringData": {"ca.crt": read("ca.crt")?, "ca.key": read("ca.key")?,
                    "tls.crt": read("tls.crt")?, "tls.key": read("tls.key")?},
            });
            let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns}});
            apply(cluster, &[namespace, secret]).await?;
            let served = Path::new("/tmp/k8s-webhook-server/serving-certs");
            std::fs::create_dir_all(served)?;
            for f in ["tls.crt", "tls.key"] {
                std::fs::copy(certs.join(f), served.join(f))?;
            }
            let name = "validator.training-operator.kubeflow.org";
            let hooks = webhook_configs(
                &std::fs::read_to_string(src.join("manifests/base/webhook/manifests.yaml"))?,
                port,
                &std::fs::read(certs.join("ca.crt"))?,
                &[("ValidatingWebhookConfiguration", name)],
                |hook| hook.contains("pytorchjob"),
            )?;
            apply(cluster, &hooks).await?;
            cmd.args([
                "--enable-scheme=pytorchjob",
                "--leader-elect=false",
                "--metrics-bind-address=0",
                &format!("--health-probe-bind-address={probe_addr}"),
                &format!("--webhook-server-port={port}"),
                &format!(
                    "--controller-threads={}",
                    lockstep_operator::controller::Settings::default().concurrency
                ),
                &format!("--kube-api-qps={CLIENT_QPS}"),
                &format!("--kube-api-burst={CLIENT_BURST}"),
            ]);
            vec![("validatingwebhookconfiguration", name.to_string())]
        }
    };
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_ready(
        &mut child,
        &format!("http://{probe_addr}/readyz"),
        &log_path,
    )
    .await?;
    Ok(Running {
        peer,
        child,
        webhooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_point_at_the_local_server_and_keep_only_the_chosen_ones() {
        let yaml = "---\napiVersion: admissionregistration.k8s.io/v1\n\
kind: ValidatingWebhookConfiguration\nmetadata:\n  name: validating-webhook-configuration\n\
webhooks:\n- name: validator.pytorchjob.x\n  clientConfig:\n    service:\n      name: s\n      \
namespace: system\n      path: /validate-pytorchjob\n- name: validator.tfjob.x\n  clientConfig:\n    \
service:\n      name: s\n      namespace: system\n      path: /validate-tfjob\n";
        let out = webhook_configs(
            yaml,
            9443,
            b"foo",
            &[("ValidatingWebhookConfiguration", "mine")],
            |n| n.contains("pytorchjob"),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["metadata"]["name"], "mine");
        let hooks = out[0]["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 1);
        assert_eq!(
            hooks[0]["clientConfig"],
            json!({"url": "https://127.0.0.1:9443/validate-pytorchjob", "caBundle": "Zm9v"})
        );
    }

    #[test]
    fn a_pytorchjob_has_one_master_and_the_other_ranks_as_workers() {
        let template = json!({"spec": {"containers": [{"name": "worker", "image": "x"}]}});
        let job = Peer::TrainingOperator.job("j", "ns", 8, &template);
        let specs = &job["spec"]["pytorchReplicaSpecs"];
        assert_eq!(specs["Master"]["replicas"], 1);
        assert_eq!(specs["Worker"]["replicas"], 7);
        assert_eq!(
            specs["Worker"]["template"]["spec"]["containers"][0]["name"],
            "pytorch"
        );
        let js = Peer::JobSet.job("j", "ns", 8, &template);
        let rj = &js["spec"]["replicatedJobs"][0];
        assert_eq!(rj["template"]["spec"]["parallelism"], 8);
        assert_eq!(
            rj["template"]["spec"]["template"]["spec"]["restartPolicy"],
            "Never"
        );
    }

    #[test]
    fn peers_parse_and_an_unknown_one_is_named() {
        assert_eq!(
            Peer::parse_list("jobset, training-operator").unwrap(),
            vec![Peer::JobSet, Peer::TrainingOperator]
        );
        let err = Peer::parse_list("jobset,mpi").unwrap_err().to_string();
        assert!(err.contains("\"mpi\""), "{err}");
    }
}
