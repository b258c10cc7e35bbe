"""``istr sweep --launcher slurm`` on a real one-node SLURM cluster (Debian's slurm-wlm + munge, started per test
in a temp dir), preemption of a sweep worker, and the checks that need no cluster: the storage refusal and the
batch script's text."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from istr.cli import main
from istr.sweep import run_sweep
from istr.sweep.slurm import SIGNAL, SlurmError, SlurmOptions, check_shared_storage, sbatch_script, storage_problem
from istr.sweep.storage import open_storage
from tests.conftest import REPO, free_port
from tests.sweep_helpers import read_rows, write_setup

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
KILL_WAIT_S = 30
# cells long enough to be interrupted mid-training (tens of seconds on a 2-core CPU), a checkpoint every 2 steps
LONG_CELL = ("train.max_steps=40", "train.checkpoint_every=2", "train.log_every=1")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


@dataclass
class Cluster:
    """A running one-node cluster: ``env`` points SLURM's commands at its slurm.conf (``SLURM_CONF``)."""

    base: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}{self.logs()}")
        return proc

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}:\n" + p.read_text()[-3000:] for p in sorted((self.base / "log").glob("*")))

    def jobs(self) -> list[str]:
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()


def _node_line() -> str:
    """This machine's CPUs, sockets and memory as slurmd sees them (``slurmd -C``), as the node's config."""
    probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                           env={**os.environ, "SLURM_CONF": "/nonexistent"})
    fields = re.findall(r"\b(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=(\d+)", probe.stdout)
    if not any(k == "CPUs" for k, _ in fields):
        fields = [("CPUs", str(os.cpu_count() or 1))]
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(f"{k}={v}" for k, v in fields) + " State=UNKNOWN"


def _slurm_conf(base: Path, user: str) -> str:
    return "\n".join([
        "ClusterName=istrtest", "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", f"SlurmUser={user}", f"SlurmdUser={user}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={base / 'run' / 'munge.socket'}",
        f"StateSaveLocation={base / 'state'}", f"SlurmdSpoolDir={base / 'spool'}",
        f"SlurmctldPidFile={base / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={base / 'log' / 'slurmd.log'}",
        f"PlugStackConfig={base / 'plugstack.conf'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        f"KillWait={KILL_WAIT_S}", "MailProg=/bin/true", _node_line(),
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""])


def _wait_for(test, timeout: float, what: str, poll: float = 1.0, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = test()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{on_timeout()}")


@pytest.fixture
def slurm_cluster():
    """slurmctld + slurmd on localhost with their own munged, state and config in a temp dir; stopped at teardown."""
    missing = [name for name in SLURM_BINARIES if not _which(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge packages")
    base = Path(tempfile.mkdtemp(prefix="istr-slurm-"))  # munged wants its socket's folder open to all
    base.chmod(0o755)
    for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755), ("log", 0o755)):
        (base / sub).mkdir(mode=mode)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket = base / "run" / "munge.socket"
    (base / "plugstack.conf").touch()
    user = "root" if os.geteuid() == 0 else os.environ.get("USER") or str(os.geteuid())
    conf = base / "slurm.conf"
    conf.write_text(_slurm_conf(base, user))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(base, env)
    daemons: list[subprocess.Popen] = []
    started = subprocess.run([_which("munged"), f"--key-file={key}", f"--socket={socket}",
                              f"--pid-file={base / 'run' / 'munged.pid'}", f"--log-file={base / 'log' / 'munged.log'}",
                              f"--seed-file={base / 'munge' / 'seed'}"], capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.skip(f"munged did not start: {started.stderr.strip()}")
        for cmd in ([_which("slurmctld"), "-D", "-f", str(conf)], [_which("slurmd"), "-D", "-N", "localhost", "-f",
                                                                      str(conf)]):
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)

        def idle() -> bool:
            if any(d.poll() is not None for d in daemons):
                pytest.skip(f"slurmctld/slurmd did not start:{cluster.logs()}")
            proc = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
            return proc.returncode == 0 and proc.stdout.strip() == "idle"

        _wait_for(idle, 60, "the SLURM node to be idle", on_timeout=cluster.logs)
        yield cluster
    finally:
        if daemons and all(d.poll() is None for d in daemons):  # end any job a failed test left: none outlives slurmd
            left = cluster.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()
            if left:
                cluster.run("scancel", *left, check=False)
                with contextlib.suppress(AssertionError):
                    _wait_for(lambda: not cluster.run("squeue", "--noheader", check=False).stdout.strip(),
                              KILL_WAIT_S + 30, "the jobs to end")
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run([_which("munged"), f"--socket={socket}", "--stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _trials(url: str, root: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=open_storage(url, root, study)).trials


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_slurm_array_survives_a_cancelled_task_and_resumes_its_cell(tmp_path, tiny_cfg_factory, postgres_url,
                                                                   slurm_cluster):
    """3 cells, a 2-worker array on PostgreSQL; task 1 is scancelled while its cell trains: its worker has the
    training checkpoint and hands the cell back at once (failed as "preempted"), task 0 resumes it, and every cell
    completes once, with a complete results.csv. Then --wait: nothing to submit for the finished study, and a new
    one-cell study's array is waited for."""
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2", "dice"], *LONG_CELL)
    root, study = tmp_path / "runs", "slurm"

    def submit(spec: Path, preset: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "istr", "sweep", str(spec), "--preset", str(preset), "--seeds", "1", "--name",
               name, "--storage", postgres_url, "--root", str(root), "--set", "logging.wandb=false", "--launcher",
               "slurm", "--workers", "2", "--cpus-per-worker", "1", "--allow-local-storage", *extra]
        return subprocess.run(cmd, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=600)

    submitted = submit(spec, preset, study)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = re.search(r"SLURM job array (\d+)", submitted.stdout).group(1)
    assert f"istr sweep status {study} --storage {postgres_url}" in submitted.stdout
    logs = root / study / "slurm"

    def worker_logs() -> str:
        return "".join(f"\n--- {p.name}:\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.out")))

    def task1_training() -> optuna.trial.FrozenTrial | None:
        for t in _trials(postgres_url, root, study):
            if (t.state == TrialState.RUNNING and t.user_attrs.get("slurm_array_task_id") == "1"
                    and (root / study / t.user_attrs.get("cell_id", "?") / "checkpoints" / "last.pt").is_file()):
                return t
        assert slurm_cluster.jobs(), "the array ended before task 1 could be cancelled"
        return None

    victim = _wait_for(task1_training, 300, "task 1 to train a cell with a checkpoint", poll=0.5,
                       on_timeout=worker_logs)
    assert victim.user_attrs["slurm_job_id"] == job
    status = subprocess.run([sys.executable, "-m", "istr", "sweep", "status", study, "--storage", postgres_url,
                             "--root", str(root)], cwd=REPO, capture_output=True, text=True)
    assert f"slurm job {job}_1" in status.stdout and json.loads(status.stdout)["slurm_jobs"] == [job], status.stdout
    slurm_cluster.run("scancel", f"{job}_1")  # SIGCONT + SIGTERM to the task's every process, SIGKILL after KillWait
    _wait_for(lambda: not slurm_cluster.jobs(), 600, "the array to end", poll=2.0, on_timeout=worker_logs)

    trials = _trials(postgres_url, root, study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and len({t.user_attrs["cell_id"] for t in complete}) == 3, worker_logs()
    (failed,) = [t for t in trials if t.state != TrialState.COMPLETE]
    assert failed.number == victim.number and failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "preempted"
    cell = failed.user_attrs["cell_id"]
    (resumed,) = [t for t in complete if t.user_attrs["cell_id"] == cell]
    assert resumed.user_attrs["slurm_array_task_id"] == "0"  # the cancelled task's cell, finished by the other
    run_dir = root / study / cell
    assert json.loads((run_dir / "train_summary.json").read_text())["attempts"] == 2
    assert "preempted (SIGTERM) at step" in (run_dir / "train.log").read_text()
    rows = read_rows(root, study)
    assert len(rows) == 3 and {r["cell_id"] for r in rows} == {t.user_attrs["cell_id"] for t in complete}
    assert all(r["steps"] == "40" and r["segm_AP"] != "" for r in rows)
    cancel = subprocess.run([sys.executable, "-m", "istr", "sweep", "cancel", study, "--storage", postgres_url],
                            cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True)
    assert cancel.returncode == 0 and f"cancelled SLURM job(s) {job}" in cancel.stdout, cancel.stdout + cancel.stderr

    again = submit(spec, preset, study, "--wait")
    assert again.returncode == 0 and "nothing to run" in again.stderr, again.stdout + again.stderr
    (tmp_path / "one").mkdir()
    one_preset, one_spec = write_setup(tmp_path / "one", tiny_cfg_factory, ["l2"])
    waited = submit(one_spec, one_preset, "waited", "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr + worker_logs()
    assert re.search(r"SLURM job array \d+ \(1 workers\)", waited.stderr), waited.stderr  # one cell: one task
    counts = json.loads(waited.stdout)
    assert counts["done"] == counts["total"] == 1 and not slurm_cluster.jobs()


@pytest.mark.slow
def test_signalled_worker_checkpoints_hands_the_cell_back_and_it_resumes_there(tmp_path, tiny_cfg_factory):
    """SIGUSR1 to a worker alone (SLURM's ``--signal=B:USR1``): it has its training checkpoint the step it is on,
    fails the trial as "preempted", queues the cell again and exits; the next run resumes at that very step."""
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2"], *LONG_CELL, "train.checkpoint_every=100")
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "istr", "sweep", str(spec), "--preset", str(preset), "--seeds", "1", "--name", "sig",
           "--root", str(root), "--set", "logging.wandb=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = _wait_for(lambda: list(root.glob("sig/*/metrics.jsonl")), 300, "the cell to train")[0]
        _wait_for(lambda: len(metrics.read_text().splitlines()) >= 3, 120, "3 steps")
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, out
    assert "queued again" in out
    run_dir = metrics.parent
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 3 <= step < 40 and len(metrics.read_text().splitlines()) == step  # saved at the step it stopped on
    assert f"preempted (SIGUSR1) at step {step}" in (run_dir / "train.log").read_text()
    trials = _trials(None, root, "sig")
    assert [(t.state, t.user_attrs.get("fail_reason")) for t in trials] == [(TrialState.FAIL, "preempted"),
                                                                           (TrialState.WAITING, None)]
    assert trials[1].user_attrs["cell_id"] == run_dir.name
    counts = run_sweep(spec, preset=str(preset), seeds=1, sets=["logging.wandb=false"], study_name="sig", root=root,
                       progress=False)
    assert counts["done"] == 1 and counts["trials"] == 2
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["attempts"] == 2 and summary["steps"] == 40
    assert len(metrics.read_text().splitlines()) == 40  # resumed at the checkpointed step: no step twice


@pytest.mark.parametrize("storage", [None, "runs/sweeps/x/journal.log", "postgresql://u:secret@localhost/db",
                                     "postgresql://u@127.0.0.1:5432/db", "postgresql://u@[::1]/db",
                                     "postgresql:///db?host=/var/run/postgresql", "sqlite:///sweeps.db"])
def test_slurm_launcher_refuses_a_storage_other_nodes_cannot_reach(tmp_path, capsys, storage):
    root = tmp_path / "runs"
    argv = ["sweep", "loss", "--launcher", "slurm", "--workers", "2", "--root", str(root)]
    assert main([*argv, *(["--storage", storage] if storage else [])]) == 2
    err = capsys.readouterr().err
    assert "--storage" in err and "--allow-local-storage" in err and "secret" not in err, err
    assert not root.exists()  # refused before any study or file


def test_shared_storage_check_accepts_a_database_host_and_the_local_escape():
    assert storage_problem("postgresql://u:pw@db.cluster:5432/istr") is None
    assert storage_problem("postgresql+psycopg://u@10.1.2.3/istr") is None
    check_shared_storage("postgresql://u@localhost/db", allow_local=True)
    with pytest.raises(SlurmError, match="--storage"):
        check_shared_storage(None)


def test_sbatch_script_is_one_array_whose_tasks_exec_the_worker(tmp_path):
    options = SlurmOptions(partition="gpu", account="lab", time="4:00:00", gpus_per_worker=1, cpus_per_worker=8,
                           sbatch_lines=["#SBATCH --qos=long", "#SBATCH --constraint=a100"])
    command = [sys.executable, "-m", "istr", "sweep", "/s/loss.yaml", "--workers", "1", "--no-wait", "--name", "x y"]
    script = sbatch_script("loss-tiny", 4, command, options, tmp_path / "logs", tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ["#SBATCH --array=0-3", f"#SBATCH --signal={SIGNAL}", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=4:00:00",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1", "#SBATCH --qos=long",
                 "#SBATCH --constraint=a100", f"#SBATCH --output={tmp_path / 'logs' / '%A_%a.out'}",
                 f"#SBATCH --chdir={tmp_path}", "#SBATCH --job-name=istr-loss-tiny"]:
        assert line in lines, (line, script)
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert lines[-1] == f"exec {sys.executable} -m istr sweep /s/loss.yaml --workers 1 --no-wait --name 'x y'"
    assert max(directives) < len(lines) - 2  # every directive before the first command
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(SlurmError, match="--sbatch-line"):
        SlurmOptions(sbatch_lines=["--qos=long"]).lines()


def test_slurm_only_options_need_the_slurm_launcher(tmp_path, capsys):
    assert main(["sweep", "loss", "--partition", "gpu", "--root", str(tmp_path / "runs")]) == 2
    assert "--partition applies to --launcher slurm only" in capsys.readouterr().err
