"""The Slurm launch room: the templates in slurm/ on the two-node local cluster.

tools/local_cluster.sh starts the cluster (installing Slurm if needed); nothing here is skipped:
without a working cluster these tests fail. Tests marked needs_engine run the real
albef_ds/train.py; the others use a stub train.py that follows the same contract (step counter,
checkpoints/latest, SIGUSR1 -> save and exit 124), so the launch, signal and requeue plumbing is
tested on its own.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, shapes_run_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tools" / "local_cluster.sh"
TEMPLATE = REPO / "slurm" / "pretrain_4m.sh"
PYTHON_BIN = Path(sys.executable).parent
# The venv running the tests is the one the jobs activate; "none": the python on PATH.
VENV = sys.prefix if sys.prefix != sys.base_prefix else "none"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}


def run(cmd, env, timeout=60, check=True):
    return subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def cluster():
    """Environment for Slurm commands on the local cluster, started here if it is not running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ALBEF_"))}
    if "ALBEF_CLUSTER_DIR" in os.environ:
        env["ALBEF_CLUSTER_DIR"] = os.environ["ALBEF_CLUSTER_DIR"]
    env["PATH"] = f"{PYTHON_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    was_running = "slurmctld: running" in run(["bash", CLUSTER, "status"], env, check=False).stdout
    started = run(["bash", CLUSTER, "start"], env, timeout=900, check=False)
    assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    env["SLURM_CONF"] = f"{env.get('ALBEF_CLUSTER_DIR', '/tmp/albef_cluster')}/slurm.conf"
    yield env
    if not was_running:
        run(["bash", CLUSTER, "stop"], env, check=False)


def job_state(env, job):
    out = run(["scontrol", "show", "job", "-o", str(job)], env, check=False).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", 0))


def wait_job(env, job, log, timeout):
    """Waits for the job to finish (through any requeues); returns its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, _ = job_state(env, job)
        if state in DONE_STATES:
            return state
        time.sleep(1)
    run(["scancel", str(job)], env, check=False)
    pytest.fail(f"job {job} still {state} after {timeout} s; log:\n{read(log)}")


def read(path):
    return Path(path).read_text() if Path(path).exists() else "(no log)"


def sbatch(env, tmp_path, args=(), nodes="2", log_name="job.log", **albef):
    """Submits a template as a `nodes`-node x 1-task CPU job; returns (job id, log path)."""
    # RANK / WORLD_SIZE as a shell inside a torchrun session (or a test process that ran a
    # command in-process) has them: sbatch hands them on, and common.sh must not let them through
    env = {**env, "ALBEF_VENV": VENV, "ALBEF_OUTPUT_ROOT": str(tmp_path / "out"),
           "ALBEF_CONFIG": "albef_ds/configs/tiny.yaml", "RANK": "0", "WORLD_SIZE": "1", **albef}
    log = tmp_path / log_name
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--gpus-per-node=0", "--time=20", f"--output={log}", str(TEMPLATE), *args]
    job = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=60, cwd=REPO)
    assert job.returncode == 0, job.stderr
    return int(job.stdout.strip().split(";")[0]), log


def metrics_steps(run_dir):
    """Steps and records of metrics.jsonl (a line still being written is left out)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r["step"] for r in rows if "step" in r], rows


def wait_for_steps(run_dir, n, env, job, log, timeout=300):
    """Waits until the run has logged n steps (so train.py's USR1 handler is in place)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(metrics_steps(run_dir)[0]) >= n:
            return
        assert job_state(env, job)[0] not in DONE_STATES, f"job ended before step {n}:\n{read(log)}"
        time.sleep(0.5)
    pytest.fail(f"no {n} steps in {timeout} s:\n{read(log)}")


# --- the cluster itself -------------------------------------------------------------------------

def test_two_nodes_run_one_task_each(cluster):
    names = run(["srun", "-N2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURMD_NODENAME"], cluster).stdout
    assert sorted(names.split()) == ["n1", "n2"]
    hosts = run(["srun", "-N2", "hostname"], cluster).stdout
    assert sorted(hosts.split()) == ["n1", "n2"]


def test_start_is_idempotent(cluster):
    before = run(["bash", CLUSTER, "status"], cluster).stdout
    run(["bash", CLUSTER, "start"], cluster, timeout=120)
    assert run(["bash", CLUSTER, "status"], cluster).stdout == before   # same pids, still idle


# --- fail-fast checks: no training, the job stops within seconds naming what to set --------------

def stub_repo(tmp_path, batch=4):
    """A repo with the real slurm/ and config loader and a stub train.py that follows the train.py
    contract; its ds config has fixed batch sizes for 2 ranks unless `batch` says otherwise."""
    repo = tmp_path / "repo"
    (repo / "albef_ds" / "configs").mkdir(parents=True)
    (repo / "ds_configs").mkdir()
    (repo / "slurm").symlink_to(REPO / "slurm")
    (repo / "albef_ds" / "config.py").symlink_to(REPO / "albef_ds" / "config.py")
    shutil.copy(REPO / "albef_ds" / "configs" / "tiny.yaml", repo / "albef_ds" / "configs")
    (repo / "ds_configs" / "zero2.json").write_text(json.dumps(
        {"train_batch_size": batch, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}))
    (repo / "albef_ds" / "train.py").write_text(STUB_TRAIN)
    (tmp_path / "data").mkdir()
    return repo


STUB_TRAIN = r'''
import argparse, json, os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
stop = []
p = argparse.ArgumentParser()
for flag in ("--deepspeed", "--config", "--output_dir"):
    p.add_argument(flag)
p.add_argument("--max_steps", type=int, default=20)
p.add_argument("--resume", nargs="?", const="latest")
args, overrides = p.parse_known_args()
rank = int(os.environ.get("SLURM_PROCID", os.environ.get("PMI_RANK", 0)))
world = int(os.environ.get("SLURM_NTASKS", os.environ.get("PMI_SIZE", 1)))
print(f"stub rank {rank}/{world} master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
latest = os.path.join(args.output_dir, "checkpoints", "latest")
os.makedirs(os.path.dirname(latest), exist_ok=True)
step = int(open(latest).read()) if args.resume and os.path.exists(latest) else 0
while step < args.max_steps:
    time.sleep(0.3)
    step += 1
    if rank == 0:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    if stop:
        break
if rank == 0:
    open(latest, "w").write(str(step))
sys.exit(124 if stop else 0)
'''


def test_missing_data_root_fails_fast(cluster, tmp_path):
    missing = tmp_path / "no-such-data"
    t0 = time.time()
    job, log = sbatch(cluster, tmp_path, ALBEF_DATA_ROOT=str(missing))
    assert wait_job(cluster, job, log, timeout=60) == "FAILED"
    assert time.time() - t0 < 30
    assert f"ALBEF_DATA_ROOT={missing} does not exist" in read(log)


@pytest.mark.parametrize("case", ["unset data", "no venv", "batch size", "no ds config"])
def test_misconfiguration_fails_fast(cluster, tmp_path, case):
    repo = stub_repo(tmp_path, batch=6 if case == "batch size" else 4)
    albef = dict(ALBEF_REPO=str(repo), ALBEF_DATA_ROOT=str(tmp_path / "data"))
    expect = {"unset data": "ALBEF_DATA_ROOT is not set", "no venv": "is not a virtualenv",
              "batch size": "train_batch_size 6 != micro batch 2 x grad accum 1 x world size 2",
              "no ds config": "ds config nope.json not found"}[case]
    if case == "unset data":
        del albef["ALBEF_DATA_ROOT"]
    job, log = sbatch(cluster, tmp_path, **albef,
                      **({"ALBEF_VENV": str(tmp_path / "nope")} if case == "no venv" else {}),
                      **({"ALBEF_DS_CONFIG": "nope.json"} if case == "no ds config" else {}))
    assert wait_job(cluster, job, log, timeout=60) == "FAILED"
    assert expect in read(log)


# --- launch, preemption and requeue plumbing, with the stub train.py ----------------------------

@pytest.mark.parametrize("launcher,scancel_flags", [
    ("srun", []),            # the form --signal=USR1@T uses: Slurm signals the steps (the ranks)
    ("srun", ["--batch"]),   # only the batch shell: common.sh's trap forwards it to the ranks
    ("srun", ["--full"]),    # both
    ("mpirun", []),          # MPICH hydra's proxies pass USR1 on to the ranks
], ids=["srun-steps", "srun-batch", "srun-full", "mpirun-steps"])
def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, launcher, scancel_flags):
    repo = stub_repo(tmp_path)
    job, log = sbatch(cluster, tmp_path, args=["--max_steps", "30"], ALBEF_REPO=str(repo),
                      ALBEF_DATA_ROOT=str(tmp_path / "data"), ALBEF_LAUNCHER=launcher)
    run_dir = tmp_path / "out" / f"albef-4m-{job}"
    wait_for_steps(run_dir, 3, cluster, job, log)
    run(["scancel", "--signal=USR1", *scancel_flags, str(job)], cluster)
    assert wait_job(cluster, job, log, timeout=180) == "COMPLETED", read(log)
    text = read(log)
    assert job_state(cluster, job)[1] == 1, text             # requeued exactly once
    assert "requeueing job" in text and f"job {job} restart 1" in text, text
    assert "rank 0 of 2 on n1" in text and "rank 1 of 2 on n2" in text, text
    steps, _ = metrics_steps(run_dir)
    assert steps == list(range(1, 31)), steps                # the counter continues, no step twice


# --- the real engine (albef_ds/train.py) --------------------------------------------------------

def tiny_ds_config(tmp_path, world, micro=8):
    """ds_configs/zero2.json with batch sizes that fit `world` ranks of `micro` samples."""
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1, train_batch_size=micro * world)
    path = tmp_path / "zero2_tiny.json"
    path.write_text(json.dumps(cfg))
    return path, [f"train.batch_size={micro}", "train.grad_accum=1"]


def engine_job(cluster, tmp_path, max_steps, launcher="srun", extra=()):
    ds, overrides = tiny_ds_config(tmp_path, world=2)
    (tmp_path / "data").mkdir(exist_ok=True)
    args = ["--config", shapes_run_config(str(tmp_path / "data")), "--deepspeed", str(ds), "--max_steps", str(max_steps),
            "train.log_every=1", *overrides, *extra]
    job, log = sbatch(cluster, tmp_path, args=args, ALBEF_DATA_ROOT=str(tmp_path / "data"), ALBEF_LAUNCHER=launcher,
                      ALBEF_CONFIG="albef_ds/configs/pretrain_4m.yaml")   # the template's; --config wins
    return job, log, tmp_path / "out" / f"albef-4m-{job}"


@pytest.mark.needs_engine
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_engine_two_nodes_train_and_checkpoint(cluster, tmp_path, launcher):
    job, log, run_dir = engine_job(cluster, tmp_path, max_steps=8, launcher=launcher, extra=["train.save_every=4"])
    assert wait_job(cluster, job, log, timeout=1200) == "COMPLETED", read(log)
    text = read(log)
    assert "rank 0 of 2 on n1" in text and "rank 1 of 2 on n2" in text, text
    assert (run_dir / "checkpoints" / "latest").exists(), text
    assert metrics_steps(run_dir)[0][-1] == 8, text


@pytest.mark.needs_engine
def test_engine_usr1_saves_requeues_and_continues(cluster, tmp_path):
    max_steps = 100
    job, log, run_dir = engine_job(cluster, tmp_path, max_steps=max_steps)
    wait_for_steps(run_dir, 3, cluster, job, log, timeout=1200)   # start-up may build DeepSpeed ops
    run(["scancel", "--signal=USR1", str(job)], cluster)
    assert wait_job(cluster, job, log, timeout=1800) == "COMPLETED", read(log)
    text = read(log)
    assert job_state(cluster, job)[1] >= 1 and f"job {job} restart 1" in text, text
    steps, _ = metrics_steps(run_dir)
    assert steps == list(range(steps[0], max_steps + 1)), steps   # continues from the saved step, none twice


def losses(run_dir):
    return {r["step"]: {k: v for k, v in r.items() if "loss" in k} for r in metrics_steps(run_dir)[1]}


@pytest.mark.needs_engine
def test_engine_mpirun_and_torchrun_match_the_deepspeed_launcher(tmp_path):
    """The launchers on this machine, no Slurm, 2 ranks each: the deepspeed launcher trains 10
    steps (saving steps 5 and 10), mpirun the same 10 steps, and torchrun resumes the deepspeed
    run's checkpoints with `--resume step00000005`, an explicit tag older than the latest: each
    step's losses equal the deepspeed launcher's."""
    ds, overrides = tiny_ds_config(tmp_path, world=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{PYTHON_BIN}:{env.get('PATH', '/usr/bin:/bin')}", OMP_NUM_THREADS="1",
               ALBEF_DATA_ROOT=str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    common = ["albef_ds/train.py", "--deepspeed", str(ds), "--config", shapes_run_config(str(tmp_path / "data")),
              "--max_steps", "10", "train.log_every=1", "train.save_every=5", *overrides]
    runs = {
        "deepspeed": [str(PYTHON_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())],
        "mpirun": [str(PYTHON_BIN / "mpirun"), "-np", "2", "-genv", "MASTER_ADDR", "127.0.0.1",
                   "-genv", "MASTER_PORT", str(free_port()), sys.executable, "-u"],
        "torchrun": [str(PYTHON_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
    }
    logs = {}
    for name, launch in runs.items():
        resume = []
        if name == "torchrun":     # the deepspeed run's checkpoints, "latest" naming step 10
            shutil.copytree(tmp_path / "deepspeed" / "checkpoints", tmp_path / name / "checkpoints")
            assert (tmp_path / name / "checkpoints" / "latest").read_text().strip() == "step00000010"
            resume, started = ["--resume", "step00000005"], time.time()
        done = subprocess.run([*launch, *common, "--output_dir", str(tmp_path / name), *resume], env=env, cwd=REPO,
                              text=True, capture_output=True, timeout=900)
        logs[name] = done.stdout + done.stderr
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ds_losses = losses(tmp_path / "deepspeed")
    assert sorted(ds_losses) == list(range(1, 11))
    for name, steps in (("mpirun", range(1, 11)), ("torchrun", range(6, 11))):
        got = losses(tmp_path / name)
        assert sorted(got) == list(steps), (name, sorted(got))
        for step, values in got.items():
            assert values and values == pytest.approx(ds_losses[step], rel=1e-5, abs=1e-6), (name, step)
    text = logs["torchrun"]
    assert "on 2 rank(s)" in text and "resumed from " + str(tmp_path / "torchrun" / "checkpoints" / "step00000005") in text
    for rank in (0, 1):            # each rank writes its own state file: both ran to step 10
        written = tmp_path / "torchrun" / "checkpoints" / "step00000010" / f"albef_rank{rank}.pt"
        assert written.stat().st_mtime >= started, rank


# --- elastic resume: a run continues on another number of nodes ---------------------------------

def elastic_job(cluster, tmp_path, run_dir, nodes, max_steps, log_name):
    """The tiny model on zero2.json (batch sizes "auto": the Trainer keeps the global batch of the
    run it resumes), into the run folder `run_dir`."""
    (tmp_path / "data").mkdir(exist_ok=True)
    args = ["--config", shapes_run_config(str(tmp_path / "data")), "--deepspeed", "ds_configs/zero2.json", "--max_steps",
            str(max_steps), "train.log_every=1", "train.batch_size=4"]
    return sbatch(cluster, tmp_path, args=args, nodes=nodes, log_name=log_name, ALBEF_OUTPUT_DIR=str(run_dir),
                  ALBEF_DATA_ROOT=str(tmp_path / "data"), ALBEF_CONFIG="albef_ds/configs/pretrain_4m.yaml")


@pytest.mark.needs_engine
def test_engine_a_two_node_run_continues_on_one_node(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job, log = elastic_job(cluster, tmp_path, run_dir, "2", 4, "two.log")
    assert wait_job(cluster, job, log, timeout=1200) == "COMPLETED", read(log)
    job, log = elastic_job(cluster, tmp_path, run_dir, "1", 8, "one.log")
    assert wait_job(cluster, job, log, timeout=1200) == "COMPLETED", read(log)
    text = read(log)
    assert "rank 0 of 1 on n" in text and "saved on 2 ranks, on 1: 2 -> 1 ranks: micro batch per rank 4 -> 8" in text, text
    assert metrics_steps(run_dir)[0] == list(range(1, 9)), text         # steps 5-8 follow 1-4


@pytest.mark.needs_engine
def test_engine_a_requeued_job_comes_back_on_fewer_nodes(cluster, tmp_path):
    """A two-node job saves on USR1 and is requeued; a node goes down (drained) meanwhile and the
    pending job is allowed a node range (scontrol update NumNodes=1-2): it comes back on the one
    node left and continues the run, with no edit to the template or common.sh."""
    run_dir = tmp_path / "run"
    job, log = elastic_job(cluster, tmp_path, run_dir, "2", 60, "range.log")
    wait_for_steps(run_dir, 3, cluster, job, log, timeout=1200)
    try:
        run(["scontrol", "update", "nodename=n2", "state=drain", "reason=elastic-test"], cluster)
        run(["scancel", "--signal=USR1", str(job)], cluster)
        deadline = time.time() + 600
        while job_state(cluster, job) != ("PENDING", 1):
            assert time.time() < deadline and job_state(cluster, job)[0] not in DONE_STATES, read(log)
            time.sleep(0.5)
        # Slurm keeps the first start's task and CPU counts as minimums: lowered with the node count
        run(["scontrol", "update", f"jobid={job}", "numnodes=1-2", "numtasks=1", "numcpus=1"], cluster)
        assert wait_job(cluster, job, log, timeout=1800) == "COMPLETED", read(log)
    finally:
        run(["scontrol", "update", "nodename=n2", "state=resume"], cluster, check=False)
        run(["scancel", str(job)], cluster, check=False)
    text = read(log)
    assert "rank 1 of 2" in text and f"job {job} restart 1: 1 nodes" in text, text
    assert "saved on 2 ranks, on 1" in text, text
    steps, _ = metrics_steps(run_dir)
    assert steps == list(range(1, 61)), steps                           # continued, no step twice
