//! `lockstep-worker local` end to end: real processes, the real rendezvous and TCP collectives.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tests of this file each run a whole gang of processes: one at a time, so that the 5 s
/// bound of the abort test measures the worker, not a machine running four gangs at once.
static ONE_GANG_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_GANG_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lockstep-worker"));
    c.current_dir(repo()).env("RUST_LOG", "info");
    c
}

fn manifest(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, body).expect("write manifest");
    p
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn mlp_job(name: &str, hidden: &str, steps: u64) -> String {
    format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata:
  name: {name}
spec:
  parallelism:
    dataParallel: 2
  training:
    workload: Ddp
    model:
      mlp:
        hiddenSizes: {hidden}
    data:
      kind: Digits
      path: data/digits.csv.gz
    optimizer:
      learningRate: 0.01
      schedule: Constant
    batchSize: 16
    maxSteps: {steps}
    seed: 3
  template:
    spec:
      containers:
        - name: worker
          image: lockstep/worker:0.1.0
"#
    )
}

/// A GPT cut into 2 pipeline stages of 2 replicas each (4 ranks: rank r is stage r / 2),
/// trained with 1F1B over 4 micro-batches.
fn pipeline_job(name: &str, steps: u64) -> String {
    format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata:
  name: {name}
spec:
  parallelism:
    dataParallel: 2
    pipelineStages: 2
  training:
    workload: Pipeline
    model:
      gpt: {{layers: 2, heads: 2, embedDim: 32, contextLength: 32}}
    data:
      kind: Text
      path: data/tinyshakespeare.txt.gz
    pipeline:
      schedule: OneFOneB
      microBatches: 4
    optimizer:
      learningRate: 0.001
    batchSize: 8
    maxSteps: {steps}
    seed: 3
  template:
    spec:
      containers:
        - name: worker
          image: lockstep/worker:0.1.0
"#
    )
}

/// Stops a launcher (and so its ranks) when a test fails before it has ended.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    Some(rest.split_whitespace().next()?.trim_matches('"'))
}

#[test]
fn a_ddp_job_trains_and_every_rank_ends_with_the_same_parameters() {
    let _one = serial();
    let dir = scratch("ddp");
    let m = manifest(&dir, "job", &mlp_job("digits-test", "[32]", 150));
    let out = worker()
        .args([
            "local",
            m.to_str().expect("utf-8"),
            "--ranks",
            "3",
            "--workdir",
        ])
        .arg(dir.join("run"))
        .output()
        .expect("run local");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "local failed:\n{err}");
    let finished: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("training finished"))
        .collect();
    assert_eq!(finished.len(), 3, "one summary per rank:\n{err}");
    let digests: Vec<_> = finished.iter().map(|l| field(l, "params_digest")).collect();
    assert!(
        digests[0].is_some() && digests.iter().all(|d| *d == digests[0]),
        "{finished:#?}"
    );
    let acc: f32 = field(finished[0], "eval_accuracy")
        .and_then(|a| a.parse().ok())
        .expect("an accuracy");
    assert!(
        acc > 0.6,
        "the MLP did not learn the digits: accuracy {acc}"
    );
    assert!(err.contains("all 3 rank(s) succeeded"), "{err}");
}

fn child_with_rank(parent: u32, rank: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let want = format!("LOCKSTEP_RANK={rank}");
            if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                return Some(pid);
            }
        }
    }
    None
}

/// A gang of `ranks` processes training the job `body` under `local`, started and waited for
/// until every rank trains.
struct Gang {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
    _stop: StopOnDrop,
}

impl Gang {
    /// A wide MLP (most of a step is the gradient all-reduce) of `ranks` replicas.
    fn start_mlp(dir: &Path, name: &str, ranks: u32) -> Self {
        Self::start(
            dir,
            &mlp_job(name, "[512, 512]", 1_000_000),
            "model=mlp",
            ranks,
        )
    }

    /// The job `body` on `ranks` ranks; every rank has started when each logged `training`
    /// with `model` (the start of the model's description, `model=mlp`).
    fn start(dir: &Path, body: &str, model: &str, ranks: u32) -> Self {
        Self::start_with_env(dir, body, model, ranks, &[])
    }

    /// As [`Gang::start`], with `env` set on the launcher (and so on every rank).
    fn start_with_env(
        dir: &Path,
        body: &str,
        model: &str,
        ranks: u32,
        env: &[(&str, &str)],
    ) -> Self {
        let m = manifest(dir, "job", body);
        let mut child = worker()
            .envs(env.iter().copied())
            .args(["local", m.to_str().expect("utf-8"), "--ranks"])
            .arg(ranks.to_string())
            .arg("--workdir")
            .arg(dir.join("run"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start local");
        let stop = StopOnDrop(child.id());
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut log = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while log
            .iter()
            .filter(|l: &&String| l.contains("training") && l.contains(model))
            .count()
            < ranks as usize
        {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("ranks did not start:\n{}", log.join("\n")));
            log.push(line);
        }
        std::thread::sleep(Duration::from_millis(500));
        Self {
            child,
            lines,
            log,
            _stop: stop,
        }
    }

    /// Sends `signal` to rank `rank`'s process.
    fn signal(&self, rank: u32, signal: &str) {
        let pid = child_with_rank(self.child.id(), rank).expect("the rank's process");
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
    }

    /// Waits for the launcher to end (at most 30 s); returns its status, how long it took and
    /// the whole log.
    fn wait(mut self, since: Instant) -> (std::process::ExitStatus, Duration, String) {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "the gang did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = since.elapsed();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.log.push(l);
        }
        (status, took, self.log.join("\n"))
    }
}

/// The local addresses (`ip:port`, as /proc/net/tcp* writes them in hex) on which process
/// `pid` listens.
fn listening(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the rank's fds")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // local_address, st (0A: LISTEN), inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.iter().any(|i| i == cols[9]) {
                out.push(cols[1].to_string());
            }
        }
    }
    out
}

#[test]
fn killing_a_rank_mid_training_stops_the_gang_within_5_seconds_and_names_it() {
    let _one = serial();
    let dir = scratch("kill");
    let gang = Gang::start_mlp(&dir, "kill-test", 4);
    // Local mode listens on loopback only: rendezvous (rank 0), data and metrics ports.
    for r in 0..4 {
        let pid = child_with_rank(gang.child.id(), r).expect("the rank's process");
        let addrs = listening(pid);
        assert!(addrs.len() >= 2, "rank {r} listens on {addrs:?}");
        assert!(
            addrs.iter().all(|a| a.starts_with("0100007F:")),
            "rank {r} listens beyond 127.0.0.1: {addrs:?}"
        );
    }
    let killed = Instant::now();
    gang.signal(2, "-9");
    let (status, took, log) = gang.wait(killed);
    assert!(
        took < Duration::from_secs(5),
        "the gang took {took:?} to stop:\n{log}"
    );
    assert_eq!(status.code(), Some(128 + 9), "{log}");
    assert!(
        log.contains("rank 2 failed first: killed by signal 9"),
        "{log}"
    );
    for r in [0, 1, 3] {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}]")) && l.contains("gang aborted"))
            .unwrap_or_else(|| panic!("rank {r} did not report the abort:\n{log}"));
        assert!(
            line.contains("rank 2 failed"),
            "rank {r} names another failure: {line}"
        );
        // A survivor is never the cause, even when it lost rank 2 in a collective first.
        assert!(
            log.contains(&format!("rank {r}: exit code 5 (PeerFailed)")),
            "rank {r} did not exit PeerFailed:\n{log}"
        );
    }
}

#[test]
fn killing_a_pipeline_stage_mid_training_stops_the_gang_within_5_seconds_and_names_it() {
    let _one = serial();
    let dir = scratch("kill-stage");
    // Ranks 0, 1 are stage 0; ranks 2, 3 stage 1.
    let gang = Gang::start(
        &dir,
        &pipeline_job("kill-stage-test", 1_000_000),
        "model=gpt",
        4,
    );
    let killed = Instant::now();
    gang.signal(2, "-9");
    let (status, took, log) = gang.wait(killed);
    assert!(
        took < Duration::from_secs(5),
        "the gang took {took:?} to stop:\n{log}"
    );
    assert_eq!(status.code(), Some(128 + 9), "{log}");
    assert!(
        log.contains("rank 2 (stage 1) failed first: killed by signal 9"),
        "{log}"
    );
    for (r, stage) in [(0, 0), (1, 0), (3, 1)] {
        let line = log
            .lines()
            .find(|l| {
                l.starts_with(&format!("[rank {r} stage {stage}] ")) && l.contains("gang aborted")
            })
            .unwrap_or_else(|| panic!("rank {r} did not report the abort:\n{log}"));
        assert!(
            line.contains("rank 2 failed"),
            "rank {r} names another failure: {line}\n{log}"
        );
        // A survivor is never the cause, even when it lost rank 2 in a send or receive first.
        assert!(
            log.contains(&format!(
                "rank {r} (stage {stage}): exit code 5 (PeerFailed)"
            )),
            "rank {r} did not exit PeerFailed:\n{log}"
        );
    }
}

#[test]
fn a_rank_whose_communication_thread_hangs_is_named_within_the_progress_timeout() {
    let _one = serial();
    let dir = scratch("hang");
    let job = mlp_job("hang-test", "[512, 512]", 1_000_000).replace(
        "  parallelism:",
        "  failurePolicy:\n    progressTimeoutSeconds: 5\n  parallelism:",
    );
    // Rank 2's communication thread stops before the first all-reduce of step 20; its process
    // and heartbeat live on, and its peers' TCP timeout (30 s) is far off.
    let gang = Gang::start_with_env(
        &dir,
        &job,
        "model=mlp",
        4,
        &[("LOCKSTEP_FAULT", "hang-comm-thread@rank=2,step=20")],
    );
    let (status, _, log) = gang.wait(Instant::now());
    assert!(
        log.contains("injected fault: the communication thread hangs"),
        "{log}"
    );
    assert_eq!(status.code(), Some(6), "{log}");
    assert!(log.contains("rank 2 failed first: exit code 6"), "{log}");
    let reason = log
        .lines()
        .find(|l| l.contains("rank 2 made no progress for"))
        .unwrap_or_else(|| panic!("no rank was judged stuck:\n{log}"));
    assert!(
        reason.contains("progressTimeoutSeconds is 5): at step 20, waiting for all_reduce #")
            && reason.contains("to start (its communication thread is stuck)"),
        "{reason}"
    );
    assert!(
        !log.contains("did not respond within"),
        "the TCP timeout, not the watchdog, stopped the gang:\n{log}"
    );
    for r in [0, 1, 3] {
        assert!(
            log.contains(&format!("rank {r}: exit code 5 (PeerFailed)")),
            "rank {r} did not exit PeerFailed:\n{log}"
        );
    }
}

#[test]
fn sigterm_to_one_rank_stops_the_whole_gang_after_one_step_with_a_checkpoint() {
    let _one = serial();
    let dir = scratch("sigterm");
    let gang = Gang::start_mlp(&dir, "sigterm-test", 3);
    let sent = Instant::now();
    // What the kubelet sends a pod it deletes; here to one rank only: the gang stops together.
    gang.signal(1, "-TERM");
    let (status, took, log) = gang.wait(sent);
    assert!(
        took < Duration::from_secs(5),
        "the gang took {took:?} to stop:\n{log}"
    );
    assert_eq!(status.code(), Some(143), "{log}");
    for r in 0..3 {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("[rank {r}]")) && l.contains("stopped by SIGTERM"))
            .unwrap_or_else(|| panic!("rank {r} did not stop on SIGTERM:\n{log}"));
        assert!(line.contains("Terminated"), "{line}");
    }
    assert!(
        !log.contains("PeerFailed"),
        "an agreed stop is no failure:\n{log}"
    );
    // The checkpoint of the step the gang stopped after.
    let stopped_after: u64 = log
        .lines()
        .find_map(|l| l.split("stopped by SIGTERM after step ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no step in the stop message:\n{log}"));
    let name = format!("step-{stopped_after:08}.safetensors");
    assert!(
        dir.join("run/checkpoints").join(&name).exists(),
        "{name} was not written:\n{log}"
    );
}

const COMMAND_JOB: &str = r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata:
  name: command-test
spec:
  parallelism:
    dataParallel: 3
  training:
    workload: Command
  template:
    spec:
      containers:
        - name: worker
          image: busybox
          command: ["sh", "-c"]
          args:
            - SCRIPT
"#;

#[test]
fn a_command_workload_gets_the_env_contract() {
    let _one = serial();
    let dir = scratch("cmd");
    let script = r#"test "$RANK" = "$LOCKSTEP_RANK" && test "$WORLD_SIZE" = 3 && test -n "$LOCKSTEP_TOKEN" && test -f "$LOCKSTEP_CONFIG" && echo "env-ok $RANK $MASTER_ADDR:$MASTER_PORT $PET_NNODES""#;
    let body = COMMAND_JOB.replace("SCRIPT", &format!("'{script}'"));
    let m = manifest(&dir, "job", &body);
    let out = worker()
        .args(["local", m.to_str().expect("utf-8")])
        .output()
        .expect("run local");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for r in 0..3 {
        assert!(
            err.lines().any(
                |l| l.starts_with(&format!("[rank {r}] env-ok {r} 127.0.0.1:"))
                    && l.ends_with(" 3")
            ),
            "rank {r}:\n{err}"
        );
    }
}

#[test]
fn a_failing_rank_fails_the_run_with_its_code() {
    let _one = serial();
    let dir = scratch("cmdfail");
    let script = r#"if [ "$RANK" = 1 ]; then echo bad input >&2; exit 42; fi; sleep 60"#;
    let body = COMMAND_JOB.replace("SCRIPT", &format!("'{script}'"));
    let m = manifest(&dir, "job", &body);
    let started = Instant::now();
    let out = worker()
        .args(["local", m.to_str().expect("utf-8")])
        .output()
        .expect("run local");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(42), "{err}");
    assert!(err.contains("rank 1 failed first: exit code 42"), "{err}");
    assert!(err.contains("[rank 1] bad input"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the other ranks were not stopped"
    );
}

#[test]
fn an_invalid_manifest_is_refused_with_the_field_named() {
    let _one = serial();
    let dir = scratch("invalid");
    let m = manifest(
        &dir,
        "job",
        &mlp_job("bad", "[32]", 10).replace("dataParallel: 2", "dataParallel: 0"),
    );
    let out = worker()
        .args(["local", m.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("dataParallel"), "{err}");
}
