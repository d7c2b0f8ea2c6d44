"""A real one-node Slurm cluster on localhost for tests (see slurm/local_cluster/).

Use the session fixture from ``tests/conftest.py``::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

    def test_x(slurm_cluster):
        subprocess.run(["sbatch", ...], env=slurm_cluster.env)

If ``SER_HPC_SLURM_CONF`` names the slurm.conf of a running cluster (CI starts one with
``slurm/local_cluster/start.sh`` and sources its env.sh), that cluster is reused and
left running. Otherwise the packages are installed if missing (root + apt only), a
cluster is started in a fresh temp dir and stopped at the end of the session.

When Slurm is missing and cannot be installed the fixture skips, except with ``CI=true``
where it fails: CI must not silently skip the cluster tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "slurm" / "local_cluster"

# Job states after which a job never changes again (sacct's State column, first word).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

# Variables that would make clients act on behalf of an enclosing job (pytest itself
# running inside a Slurm allocation) or override sbatch options.
_INHERITED_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SUBMITIT_")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed here and cannot be installed (not root, no apt)."""


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    conf: Path
    env: dict[str, str]  # os.environ with SLURM_CONF set; use for every client call
    owned: bool  # True when this process started it (and will stop it)

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, sacct, ...) against this cluster."""
        return subprocess.run(
            list(args),
            env=self.env,
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            **kwargs,
        )

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None) -> str:
        """Submit with ``sbatch --parsable ARGS``; return the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def states(self, job_id: str) -> dict[str, str]:
        """sacct states of a job's allocations (array tasks included): {jobid: STATE}."""
        out = self.run(
            "sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State", check=False
        ).stdout
        states = {}
        for line in out.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid] = state.split()[0] if state.strip() else ""
        return states

    def wait(self, job_id: str, timeout: float = 60) -> str:
        """Wait until sacct reports a terminal state for the job; return it."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            states = self.states(job_id)
            state = states.get(job_id, "")
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout}s")

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point in-process code that shells out to sbatch (submitit) at this cluster."""
        for key in list(os.environ):
            if key.startswith(_INHERITED_PREFIXES):
                monkeypatch.delenv(key)
        monkeypatch.setenv("SLURM_CONF", str(self.conf))


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def client_env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    return env


def _run_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ensure_installed() -> None:
    """Install the Slurm packages if missing; raise SlurmUnavailable if impossible."""
    if shutil.which("bash") is None or not Path("/proc").is_dir():
        raise SlurmUnavailable("the local Slurm cluster needs Linux and bash")
    if os.geteuid() != 0:
        # start.sh runs munged as user munge and slurmd as root.
        raise SlurmUnavailable(
            "the local Slurm cluster must be started as root; or start one with "
            "slurm/local_cluster/start.sh and set SER_HPC_SLURM_CONF"
        )
    try:
        res = _run_script("install.sh", timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise SlurmUnavailable(f"installing Slurm timed out: {exc}") from exc
    if res.returncode != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed and install.sh failed (rc {res.returncode}):\n"
            f"{res.stdout}{res.stderr}"
        )


def _check_running(conf: Path) -> None:
    res = subprocess.run(
        ["sinfo", "-h", "-o", "%T"],
        env=client_env(conf),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"SER_HPC_SLURM_CONF={conf}: the cluster does not answer (sinfo rc "
            f"{res.returncode}): {res.stderr.strip()}"
        )


@contextmanager
def local_slurm_cluster(state_dir: str | os.PathLike | None = None) -> Iterator[SlurmCluster]:
    """Reuse the cluster named by $SER_HPC_SLURM_CONF, or start (and later stop) one."""
    reuse = os.environ.get("SER_HPC_SLURM_CONF")
    if reuse:
        conf = Path(reuse).resolve()
        if not conf.is_file():
            raise RuntimeError(f"SER_HPC_SLURM_CONF={reuse}: no such file")
        if shutil.which("sinfo") is None:
            raise RuntimeError(f"SER_HPC_SLURM_CONF={reuse} is set but sinfo is not on PATH")
        _check_running(conf)
        # start.sh writes STATE_DIR/etc/slurm.conf
        yield SlurmCluster(conf.parent.parent, conf, client_env(conf), owned=False)
        return

    ensure_installed()
    made_dir = state_dir is None
    # Short path under /tmp: unix socket paths are limited, and user munge must be
    # able to enter every parent directory.
    sdir = Path(tempfile.mkdtemp(prefix="ser-slurm-", dir="/tmp") if made_dir else state_dir)
    try:
        res = _run_script("start.sh", str(sdir), timeout=300)
    except subprocess.TimeoutExpired:
        _run_script("stop.sh", str(sdir), timeout=120)
        raise
    if res.returncode != 0:
        # start.sh has already stopped what it started; its logs stay in sdir.
        raise RuntimeError(
            f"slurm/local_cluster/start.sh {sdir} failed (rc {res.returncode}):\n"
            f"{res.stdout}{res.stderr}"
        )
    conf = sdir.resolve() / "etc" / "slurm.conf"
    ok = False
    try:
        yield SlurmCluster(sdir.resolve(), conf, client_env(conf), owned=True)
        ok = True
    finally:
        stop = _run_script("stop.sh", str(sdir), timeout=120)
        if stop.returncode != 0:
            print(f"stop.sh {sdir} failed:\n{stop.stdout}{stop.stderr}")
        # Keep the logs after a failure or on request.
        if made_dir and ok and stop.returncode == 0 and not os.environ.get(
            "SER_HPC_KEEP_SLURM_STATE"
        ):
            shutil.rmtree(sdir, ignore_errors=True)


# One cluster per process even if several modules import the fixture (each import
# makes its own FixtureDef): users are counted and the last one stops the cluster.
_shared_lock = threading.Lock()
_shared: dict = {"users": 0, "cluster": None, "stack": None}


@contextmanager
def shared_slurm_cluster() -> Iterator[SlurmCluster]:
    with _shared_lock:
        if _shared["users"] == 0:
            stack = ExitStack()
            _shared["cluster"] = stack.enter_context(local_slurm_cluster())
            _shared["stack"] = stack
        _shared["users"] += 1
        cluster = _shared["cluster"]
    try:
        yield cluster
    finally:
        with _shared_lock:
            _shared["users"] -= 1
            if _shared["users"] == 0:
                stack, _shared["stack"], _shared["cluster"] = _shared["stack"], None, None
                stack.close()


def skip_or_fail(reason: str) -> None:
    if is_ci():
        pytest.fail(f"CI=true and the Slurm cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _one_owner(tmp_path_factory) -> None:
    """Under pytest-xdist only one worker may start a cluster (two on one host fight over the
    node): tests/conftest.py sends every Slurm test to one worker. Fail loudly if not."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get("SER_HPC_SLURM_CONF"):
        return
    owner = tmp_path_factory.getbasetemp().parent / "slurm_cluster.owner"
    try:
        fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, worker.encode())
        os.close(fd)
    except FileExistsError:
        first = owner.read_text()
        if first != worker:
            pytest.fail(f"xdist worker {worker} needs the Slurm cluster that worker {first} started: the Slurm "
                        "tests were not grouped on one worker (tests/conftest.py; pytest-xdist 3.8 ignores "
                        "xdist_group under pytest 9, hence the pytest pin)", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The real local Slurm cluster: ``.env`` (SLURM_CONF set), ``.state_dir``, helpers."""
    _one_owner(tmp_path_factory)
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(shared_slurm_cluster())
        except SlurmUnavailable as exc:
            skip_or_fail(str(exc))
        yield cluster


__all__: Sequence[str] = (
    "SlurmCluster",
    "SlurmUnavailable",
    "local_slurm_cluster",
    "shared_slurm_cluster",
    "slurm_cluster",
)
