"""The code's shape, checked: one launcher-to-worker contract that nothing spells out again, and functions
that fit a screen. Pure AST reads of trainer/ and launch/: no TensorFlow, milliseconds."""
from __future__ import annotations

import ast
import functools
import signal
from pathlib import Path

from launch import contract
from tests.conftest import REPO

PACKAGES = ("trainer", "launch")
CONTRACT = REPO / "launch" / "contract.py"
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _contract_strings() -> set[str]:
    names = {getattr(contract, n) for n in dir(contract) if n.startswith("ENV_")}
    names |= {*contract.LAUNCHER_SIZE_VARS, *contract.LAUNCHER_RANK_VARS, *contract.LAUNCHER_LOCAL_RANK_VARS,
              *contract.LAUNCHER_LOCAL_SIZE_VARS}
    return names | {contract.HEARTBEAT_GLOB, contract.HEARTBEAT_DIR, contract.RUN_CONFIG_FILE,
                    contract.CHECKPOINT_DIR, contract.MANIFEST_SUFFIX, contract.RUNS_DIR,
                    contract.WATCHDOG_IN_LAUNCHER}


def test_nothing_redefines_the_launcher_to_worker_contract():
    """Environment variable names, heartbeat and run-directory names, the exit codes and the trainer's command
    line appear as literals in launch/contract.py only; every other module imports them from there."""
    strings, codes = _contract_strings(), {contract.PREEMPTED_EXIT_CODE, contract.INTERRUPTED_EXIT_CODE,
                                           contract.WATCHDOG_EXIT_CODE}
    offenders = []
    for path in _modules():
        if path == CONTRACT:
            continue
        tree = _tree(path)
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple)):
                words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                if any(words[i:i + 2] == ["-m", contract.TRAINER_MODULE] for i in range(len(words))):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} a `-m trainer` command line")
            if not isinstance(node, ast.Constant) or id(node) in skip:
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if isinstance(node.value, str) and node.value in strings:
                offenders.append(f"{where} {node.value!r}")
            elif type(node.value) is int and node.value in codes:
                offenders.append(f"{where} exit code {node.value}")
    assert not offenders, "define these in launch/contract.py and import them:\n" + "\n".join(offenders)


def test_trainer_and_launcher_agree_on_exit_codes_and_the_stop_line():
    from launch import slurm
    from trainer import heartbeat, preemption

    assert slurm.PREEMPTED_EXIT_CODE == preemption.STOP_EXIT_CODES[signal.SIGTERM] == 75
    assert heartbeat.WATCHDOG_EXIT_CODE == 124 and contract.STOPPED_EXIT_CODES == (75, 130)
    for signum in contract.STOP_SIGNALS:
        step, label = contract.parse_stop_line(f"[rank 0] {preemption.stop_line(7, signum)}\n")
        assert step == 7 and contract.stop_exit_code(label) == preemption.STOP_EXIT_CODES[signum]


def test_the_trainer_command_lines_are_argv_lists():
    argv = contract.train_command("py", "c.yaml", ["a=1"], backend="horovod", stop_after=5)
    assert argv == ["py", "-m", "trainer", "train", "c.yaml", "--set", "a=1", "--set",
                    "distribution.backend=horovod", "--stop-after", "5"]
    assert contract.is_train_command(["/venv/bin/python", *argv[1:]])
    assert contract.validate_command("py", "c.yaml", replicas=[1, 2], replicas_as="-np ({n})") == [
        "py", "-m", "trainer", "validate", "c.yaml", "--replicas", "1,2", "--replicas-as", "-np ({n})"]


def test_no_task_or_model_kind_name_is_compared_outside_the_registry():
    """Code asks the task object (trainer/tasks/) what to do; `== "classification"` anywhere else would make a
    new workload touch that file too."""
    from trainer.tasks import TASKS, WORKLOADS

    names = set(TASKS) | set(WORKLOADS)
    offenders = []
    for path in _modules():
        if "tasks" in path.relative_to(REPO).parts:
            continue
        for node in ast.walk(_tree(path)):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            sides += [e for side in sides if isinstance(side, (ast.Tuple, ast.List, ast.Set)) for e in side.elts]
            if any(isinstance(s, ast.Constant) and s.value in names for s in sides):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "compare through the task object instead:\n" + "\n".join(offenders)


def test_no_function_in_trainer_or_launch_is_longer_than_a_screen():
    long = []
    for path in _modules():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _imports(path: Path) -> set[str]:
    """Every module an `import` in `path` names (at any depth, TYPE_CHECKING blocks excluded), with the
    packages above it, whose __init__ the import runs too."""
    tree = _tree(path)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def test_no_import_cycles_between_modules():
    """Lazy imports inside functions count too: a cycle hidden in a function is still two modules that
    cannot be understood (or replaced) one without the other."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in _modules()}
    graph = {}
    for name, path in modules.items():
        above = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        graph[name] = {m for m in _imports(path) if m in modules and m != name and m not in above}
    # Modules that reach each other: everything reachable from a module that also reaches it back.
    reach = {name: _reachable(graph, name) for name in graph}
    cycles = sorted({" <-> ".join(sorted({name} | {m for m in reach[name] if name in reach[m]}))
                     for name in graph if name in reach[name]})
    assert not cycles, "import cycles (modules that import each other):\n" + "\n".join(cycles)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    return seen
