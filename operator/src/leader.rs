//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one acts. The semantics of client-go's leaderelection: the holder renews the lease
//! every `renew_every`; another replica takes it over only when it has not been renewed for
//! `lease_duration`; every write is conditional on the Lease's resourceVersion, so two replicas
//! can never both win a round. A leader that fails to renew within the lease duration must stop
//! acting (the operator exits and its Deployment restarts it as a follower).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::{Error, Result};

/// One replica's view of the election.
pub struct LeaderElector {
    leases: Api<Lease>,
    name: String,
    identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
}

impl LeaderElector {
    /// An elector for the Lease `name` in the namespace of `leases`, as `identity` (the pod name).
    pub fn new(leases: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self {
            leases,
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            renew_every: lease_duration / 3,
        }
    }

    /// One round: acquire the lease if it is free or expired, renew it if held. True when this
    /// replica holds it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.lease_duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false), // another replica was faster
                Err(e) => Err(Error::Kube(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let renewed = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| t.0);
        let valid_for =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs)));
        let expired = renewed.is_none_or(|r| r + valid_for < now);
        // A released lease has no holder and is free at once.
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !mine && !expired && !free {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(secs);
        // replace() sends the resourceVersion we read: a concurrent write makes this a 409.
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Waits until this replica is the leader (trying every `renew_every`).
    pub async fn acquire(&self) -> Result<()> {
        loop {
            if self.try_acquire_or_renew().await.unwrap_or(false) {
                return Ok(());
            }
            tokio::time::sleep(self.renew_every).await;
        }
    }

    /// Renews the lease until a renewal has failed for longer than the lease duration, then
    /// returns: from that moment another replica may lead, so this one must stop acting.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return, // someone else holds it now
                Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            }
            // Stop a margin before the lease expires, so two leaders never overlap.
            if last_ok.elapsed() + self.renew_every >= self.lease_duration {
                return;
            }
        }
    }
}

impl LeaderElector {
    /// Gives the lease up (after a graceful stop), so a follower takes over at once instead of
    /// after the lease duration.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }
}

/// How a leading operator stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved; the lease was released.
    Shutdown,
    /// The lease could not be renewed: another replica may lead now.
    LostLeadership,
}

/// Waits to become the leader, then runs the controller until `shutdown` resolves or the
/// leadership is lost.
pub async fn lead(
    elector: LeaderElector,
    client: kube::Client,
    settings: crate::controller::Settings,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<Stopped> {
    let elector = std::sync::Arc::new(elector);
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        res = elector.acquire() => res?,
        () = &mut shutdown => return Ok(Stopped::Shutdown),
    }
    tracing::info!(identity = %elector.identity, lease = %elector.name, "became the leader");
    // Renewal runs on its own task and signals a lost lease; the controller's shutdown future
    // must be Sync, which the API calls of a renewal are not.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let renewer = {
        let e = elector.clone();
        tokio::spawn(async move {
            e.hold().await;
            let _ = lost_tx.send(());
        })
    };
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = lost.clone();
    let stop = async move {
        tokio::select! {
            res = lost_rx => if res.is_ok() { flag.store(true, std::sync::atomic::Ordering::SeqCst) },
            () = shutdown => {}
        }
    };
    crate::controller::run(client, settings, metrics, stop).await;
    renewer.abort();
    if lost.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::error!(identity = %elector.identity, "lost the leader lease; stopping");
        return Ok(Stopped::LostLeadership);
    }
    elector.release().await?;
    Ok(Stopped::Shutdown)
}
