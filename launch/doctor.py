"""`strata doctor`: what is installed and usable here, one line per component with a verdict.

Probes that need TensorFlow or Horovod run in a child Python (the launcher never imports them), with a
timeout so a broken install cannot hang the command.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    verdict: str
    detail: str


PROBES = {
    "tensorflow": "import tensorflow as tf; print(tf.__version__)",
    "devices": (
        "import tensorflow as tf; g=tf.config.list_physical_devices('GPU'); "
        "c=tf.config.list_physical_devices('CPU'); print(f'{len(g)} GPU, {len(c)} CPU')"
    ),
    "horovod": (
        "import horovod, horovod.tensorflow as hvd; "
        "b=[n for n,f in (('gloo',hvd.gloo_built),('mpi',hvd.mpi_built),('nccl',hvd.nccl_built)) if f()]; "
        "print(horovod.__version__, 'controllers/ops:', ','.join(b))"
    ),
    "mpi4py": "import mpi4py; from mpi4py import MPI; print(mpi4py.__version__, MPI.Get_library_version().splitlines()[0])",
    "tensorboard": "import tensorboard; print(tensorboard.__version__)",
}


def probe(code: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Run `code` in a fresh interpreter; (succeeded, last line of output or error)."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f}s"
    text = printable(done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return done.returncode == 0, (text[-1] if text else "")


def printable(text: str) -> str:
    """`text` without control characters other than newlines and tabs (pure). MPI's library version string
    ends with a C string's NUL byte, which made `grep` call doctor's output binary."""
    return "".join(c for c in text if c.isprintable() or c in "\n\t")


def command_version(cmd: list[str]) -> tuple[bool, str]:
    if not shutil.which(cmd[0]):
        return False, "not found on PATH"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = printable(done.stdout or done.stderr).strip().splitlines()
    return done.returncode == 0, lines[0] if lines else ""


def checks() -> list[Check]:
    out: list[Check] = [Check("python", OK, sys.version.split()[0])]
    for name, code in PROBES.items():
        ok, detail = probe(code)
        required = name in ("tensorflow", "tensorboard")
        verdict = OK if ok else (FAIL if required else WARN)
        if name == "horovod" and not ok:
            detail = "not importable; run `make setup` (builds Horovod 0.28.1 with Gloo and MPI)"
        if name == "devices" and ok and detail.startswith("0 GPU"):
            detail += " (CPU-only: mirrored/pipeline use logical CPU devices)"
        out.append(Check(name, verdict, detail))
    ok, detail = command_version(["mpirun", "--version"])
    out.append(Check("mpirun", OK if ok else WARN, detail if ok else "not found: apt-get install openmpi-bin"))
    ok, detail = command_version(["horovodrun", "--version"])
    out.append(Check("horovodrun", OK if ok else WARN, detail))
    for cmd in ("sbatch", "srun", "scontrol"):
        found = shutil.which(cmd)
        out.append(Check(cmd, OK if found else WARN, found or "not found (needed only for `strata slurm`)"))
    if shutil.which("sinfo"):
        ok, detail = command_version(["sinfo", "-h", "-o", "%P %a %D %t"])
        out.append(Check("slurm controller", OK if ok else WARN, detail or "no partitions" if ok else
                         "unreachable: start one with `bash slurm/local-cluster.sh start`"))
    return out


def run() -> int:
    """Print the checks; exit 1 if anything required failed."""
    results = checks()
    width = max(len(c.name) for c in results)
    for c in results:
        print(f"[{c.verdict:>4}] {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in results if c.verdict == FAIL]
    print("verdict: " + ("ready" if not failed else f"not usable: {', '.join(failed)} failed"))
    return 1 if failed else 0
