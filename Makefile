# Lockstep developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Build caches live outside the clone so that CI's fresh clones and later sessions reuse them.
export LOCKSTEP_CACHE ?= $(HOME)/.cache/lockstep
export CARGO_TARGET_DIR ?= $(LOCKSTEP_CACHE)/target
CARGO ?= cargo
CRD := crds/paralleljobs.lockstep.dev.yaml
CHART_CRD := charts/lockstep/crds/paralleljobs.lockstep.dev.yaml

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

# The e2e suite runs against the cluster of `make cluster-up` when it runs; otherwise
# e2e/run-tests.sh starts one (building the binaries first if needed) and stops it afterwards.
.PHONY: test
test: ## the README's test command: unit tests, e2e against a real control plane, the real-node tests (root), then checkpoints against transformers
	e2e/run-tests.sh --real-node --workspace --locked
	worker/tests/hf/run.sh

.PHONY: test-hf
test-hf: ## checkpoints against Hugging Face transformers: export, from_pretrained, logits within 1e-4, import and fine-tune (PyTorch CPU from PyPI, cached venv)
	worker/tests/hf/run.sh

.PHONY: unit
unit: ## the tests that need no cluster
	$(CARGO) test --workspace --locked --exclude lockstep-e2e

.PHONY: e2e
e2e: ## the end-to-end suite against a real control plane (kube-apiserver, scheduler, kwok nodes)
	e2e/run-tests.sh -p lockstep-e2e --locked

.PHONY: e2e-real
e2e-real: ## only the e2e tests on a real node (root): builds the node and the images, starts a cluster with REAL_NODES=1
	e2e/run-tests.sh --real-node-only

PREFIX ?= $(HOME)/.local

.PHONY: install-plugin
install-plugin: ## build the kubectl plugin and install it as $(PREFIX)/bin/kubectl-lockstep (kubectl runs it as `kubectl lockstep`)
	$(CARGO) build --release --locked -p kubectl-lockstep
	install -D -m 0755 $(CARGO_TARGET_DIR)/release/kubectl-lockstep $(PREFIX)/bin/kubectl-lockstep
	@echo "installed $(PREFIX)/bin/kubectl-lockstep; with $(PREFIX)/bin on PATH: kubectl lockstep --help"

.PHONY: krew-manifest
krew-manifest: ## the plugin's archive for this platform and its krew manifest with the archive's sha256 (target/krew/)
	plugin/krew/package.sh

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: fmt
fmt: ## format the code
	$(CARGO) fmt --all

.PHONY: crds
crds: ## regenerate the CRD (crds/ and the chart's copy) from the Rust types (a test fails when stale)
	$(CARGO) run -q --locked -p lockstep-api --bin crdgen -- $(CRD) $(CHART_CRD)

.PHONY: validate
validate: ## check manifests like the API server would: make validate FILES="examples/*.yaml"
	$(CARGO) run -q --locked -p lockstep-api --bin lockstep-validate -- $(or $(FILES),examples/*.yaml)

.PHONY: chart-lint
chart-lint: ## helm lint the chart and render it with every optional part on
	bin=$$(e2e/cluster/build.sh 2>/dev/null) && $$bin/helm lint --strict charts/lockstep && \
	$$bin/helm template lockstep charts/lockstep --set serviceMonitor.enabled=true,podMonitor.enabled=true,prometheusRule.enabled=true,networkPolicy.enabled=true >/dev/null && \
	echo "charts/lockstep renders"

.PHONY: chart-test
chart-test: ## the chart's tests: files (no cluster), then lint, dry run, install, upgrade, uninstall on the control plane
	$(CARGO) test --locked -p lockstep-e2e --test chart
	e2e/run-tests.sh -p lockstep-e2e --locked --test e2e -- chart::

.PHONY: images
images: ## OCI images of the operator and the CPU worker, without a daemon or a base from a registry (target/images/)
	images/build.sh

.PHONY: image-cuda
image-cuda: ## the CUDA worker image: the worker with cuBLAS, NVRTC and NCCL from NVIDIA's PyPI wheels (images/cuda-wheels.txt), checked inside (target/images/)
	IMAGES=worker-cuda images/build.sh

.PHONY: cluster-build
cluster-build: ## build the pinned test control plane from Go modules (cached by version)
	e2e/cluster/build.sh

.PHONY: node-build
node-build: ## build what a real node of the test cluster runs (kubelet, containerd, runc, CNI, CoreDNS, pause), cached by version
	e2e/cluster/node-build.sh

.PHONY: cluster-up
cluster-up: ## start the test control plane on 127.0.0.1 (NODES=4; REAL_NODES=1 adds a real node; SCHEDULERS=kueue,volcano,coscheduling adds those; KUBECONFIG=.cluster/kubeconfig)
	e2e/cluster/up.sh

.PHONY: cluster-down
cluster-down: ## stop the test control plane
	e2e/cluster/down.sh

.PHONY: run-operator
run-operator: ## run the operator against $$KUBECONFIG (make cluster-up gives one)
	$(CARGO) run --locked -p lockstep-operator -- --metrics-addr 127.0.0.1:8080 --no-leader-elect

JOB ?= examples/ddp-digits.yaml
.PHONY: local
local: ## run a ParallelJob on this machine without Kubernetes (JOB=examples/ddp-digits.yaml)
	$(CARGO) run --locked -q -p lockstep-worker -- local $(JOB)

.PHONY: bench-allreduce
bench-allreduce: ## all-reduce benchmark of the TCP ring, 2 and 4 ranks, 1 KiB to 256 MiB
	$(CARGO) build --release --locked -q -p lockstep-worker
	for n in 2 4; do $(CARGO_TARGET_DIR)/release/lockstep-worker bench allreduce --ranks $$n --sizes 1K:256M; done

.PHONY: bench-pipeline
bench-pipeline: ## pipeline schedules on the CPU: bubble measured vs simulated vs formula, tokens/s, activations (STAGES=2 MICRO=4,8,16)
	$(CARGO) build --release --locked -q -p lockstep-worker
	$(CARGO_TARGET_DIR)/release/lockstep-worker bench pipeline --stages $(or $(STAGES),2) --micro $(or $(MICRO),4,8,16) --steps 7 --warmup 2

.PHONY: bench-pres
bench-pres: ## TGN and JODIE at temporal batch B and 4B, plain and with PRES, 3 seeds, beside PyG's TGN, CollegeMsg and bitcoin-otc (EPOCHS=5 SEEDS="0 1 2" PYG=1)
	bench/pres/run.sh

.PHONY: bench-engine
bench-engine: ## engine on the CPU: GPT tokens/s on 1 rank; 2-rank comm, exposed comm and overlap
	$(CARGO) build --release --locked -q -p lockstep-worker
	bench/engine-cpu.sh

.PHONY: bench-admission
bench-admission: ## admission decision alone: 1,000 nodes x 8 GPUs, 500 queued jobs (p50, p99, peak memory; NODES=20000 JOBS=5000 for the largest clusters)
	$(CARGO) build --release --locked -q -p lockstep-e2e --bin bench-admission
	$(CARGO_TARGET_DIR)/release/bench-admission

.PHONY: bench-operator
bench-operator: ## operator benchmark: 100 jobs x 8 ranks on 200 fake nodes vs the same pods created directly (NODES, JOBS, RANKS, GPUS; PEERS=jobset,training-operator; REQUESTS=1, TIMELINE=1, FLOORS=0 or design, ROUNDS=N for ABBA rounds of the operator and its design floor; DESIGN_OMIT=parts, DESIGN_VARIANTS="parts;parts;none")
	bench/operator/run.sh

.PHONY: bench-faults
bench-faults: ## fault suite on a cluster of its own (the real node as root): trials, recovered, lost per fault (KILLS=50 TRIALS=3 FAULTS=)
	bench/faults/run.sh

.PHONY: gpu-worker
gpu-worker: ## build the stripped worker into .gpu/ (then run bench/gpu/worker.sh on a GPU machine)
	$(CARGO) build --release --locked -p lockstep-worker
	mkdir -p .gpu && cp $(CARGO_TARGET_DIR)/release/lockstep-worker .gpu/ && strip .gpu/lockstep-worker

.PHONY: gpu-probe
gpu-probe: ## build the GPU probe binary into .gpu/ (then run bench/gpu/probe.sh on a GPU machine)
	cd bench/gpu/probe && $(CARGO) build --release --locked
	mkdir -p .gpu && cp $(CARGO_TARGET_DIR)/release/gpuprobe .gpu/

# A plain PyTorch image (torch from PyPI on Debian's python3) and the test that runs
# examples/torch-command.yaml with it on the real node (root), in a cluster of its own.
.PHONY: pytorch-image
pytorch-image: ## OCI image of PyTorch from PyPI on Debian bookworm, without a daemon (target/images/lockstep-pytorch-*.oci.tar)
	images/pytorch/build.sh

.PHONY: e2e-torch
e2e-torch: ## the torchrun example (Gloo) in real pods on the real node (root): builds the worker and PyTorch images, starts its own cluster
	IMAGES=worker images/build.sh && images/pytorch/build.sh && TEST_STATE=$(CURDIR)/target/test-cluster-torch REAL_NODES=1 NODE_IMAGES="worker pytorch" e2e/run-tests.sh -p lockstep-e2e --locked --test e2e -- --ignored real_node_torch::
