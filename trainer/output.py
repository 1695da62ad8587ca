"""What a worker process prints: TensorFlow's own log lines kept off the console, and whole lines per rank.

TensorFlow's C++ runtime writes absl-format lines (`I0000 00:00:... port.cc:153] oneDNN custom operations
are on ...`) straight to file descriptor 2, at import and during training, whatever TF_CPP_MIN_LOG_LEVEL
says on some CPUs (oneDNN's messages on Intel AMX and AMD AVX-512 machines). Python's logging cannot reach
them, so `install()` puts a filter on the worker's fd 2 itself, before TensorFlow is imported:

    worker fd 2 -> pipe -> filter process -> the original stderr

The filter process is forked from the worker while it still has a single thread. It drops absl lines of
level I and W, and E lines on a short list of known-benign messages (launch/tf_noise.py); everything else
(Strata's lines, Python tracebacks, TensorFlow's F lines and other E lines) passes untouched and in order.
It ignores the signals a worker is stopped with (SIGINT, SIGTERM, SIGUSR1, ...) and exits only at end of
file, once every writer is gone: a worker killed by SIGKILL still has its last lines printed. At a normal
exit the worker waits for it, so the output is complete before the shell prompt comes back.
STRATA_TF_LOGS=1 turns all of this off (TensorFlow's lines and Python-level warnings are shown again).

When STRATA_OUTPUT_PREFIX is set (`strata slurm run-rank` sets `[rank R] `), fd 1 goes through the same
process too, and every line of both streams starts with the prefix: SLURM has no Strata launcher to label
the ranks' lines, so each rank labels its own, a whole line at a time.
"""
from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import sys
import time

from launch import tf_noise
from launch.contract import ENV_OUTPUT_PREFIX, ENV_TF_LOGS

# The rule of what is TensorFlow's noise is launch/tf_noise.py's (the launcher filters horovodrun's own output
# with it); this module applies it to bytes.
_ABSL_PREAMBLE = tf_noise.ABSL_PREAMBLE.encode()
_CONTINUATIONS = tuple(c.encode() for c in tf_noise.CONTINUATIONS)
_IGNORED_IN_FILTER = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE")
_EXIT_WAIT_S = 2.0  # at exit, how long the worker waits for the filter to print what is left


def is_tf_noise(line: bytes) -> bool:
    """Whether one complete line (with or without its newline) is TensorFlow log noise to drop (pure)."""
    return tf_noise.is_tf_noise(line.decode("utf-8", "replace"))


def _is_continuation(line: bytes) -> bool:
    return line.startswith(_CONTINUATIONS)


def could_be_tf_noise(start: bytes, *, after_noise: bool = False) -> bool:
    """Whether an unfinished line that begins with `start` may still turn out to be noise (pure). Lines that
    cannot are passed on at once, so partial writes (a progress bar, a prompt) are not held back."""
    if _ABSL_PREAMBLE.startswith(start) or start.startswith(_ABSL_PREAMBLE):
        return True
    if after_noise and any(c.startswith(start) or start.startswith(c) for c in _CONTINUATIONS):
        return True
    head = start[:6]  # `X0000 `: level letter, month and day, a space
    if head[:1] not in (b"I", b"W", b"E", b"F"):
        return False
    digits = head[1:5]
    if digits and not digits.isdigit():
        return False
    return len(head) < 6 or head[5:6] == b" "


class LineFilter:
    """Incremental filter over one byte stream: `feed` returns the bytes to pass on now, `close` the rest.

    With `drop_noise`, a line is held only while it may still be TensorFlow noise; once it cannot be, it is
    passed on as it arrives. With `prefix`, every line passed on starts with it."""

    def __init__(self, *, drop_noise: bool = True, prefix: bytes = b"") -> None:
        self.drop_noise, self.prefix = drop_noise, prefix
        self.pending = b""  # start of the current line, not decided yet
        self.passing = False  # the current line was decided "keep": copy it through to its newline
        self.after_noise = False  # the last complete line was dropped (its continuation goes too)

    def _noise(self, line: bytes) -> bool:
        return self.drop_noise and (is_tf_noise(line) or (self.after_noise and _is_continuation(line)))

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            newline = data.find(b"\n")
            piece, data = (data, b"") if newline < 0 else (data[:newline + 1], data[newline + 1:])
            complete = piece.endswith(b"\n")
            if self.passing:
                out.append(piece)
                self.passing = not complete
                continue
            self.pending += piece
            if complete:
                noise = self._noise(self.pending)
                if not noise:
                    out.append(self.prefix + self.pending)
                self.pending, self.after_noise = b"", noise
            elif not (self.drop_noise and could_be_tf_noise(self.pending, after_noise=self.after_noise)):
                out.append(self.prefix + self.pending)
                self.pending, self.passing, self.after_noise = b"", True, False
        return b"".join(out)

    def close(self) -> bytes:
        """What is left at end of file: an unfinished last line, unless it is noise."""
        rest, self.pending = self.pending, b""
        return b"" if not rest or self._noise(rest) else self.prefix + rest


def _write_all(fd: int, data: bytes) -> bool:
    """Write everything to `fd`; False once the reader is gone (then the caller keeps draining silently)."""
    while data:
        try:
            data = data[os.write(fd, data):]
        except InterruptedError:
            continue
        except OSError:
            return False
    return True


def _run_filter(channels: dict[int, tuple[LineFilter, int]]) -> None:
    """The filter process's whole life: copy each input fd to its output fd through its LineFilter, until
    every input has reached end of file."""
    for name in _IGNORED_IN_FILTER:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    writable = {out: True for _, out in channels.values()}
    while channels:
        try:
            ready, _, _ = select.select(list(channels), [], [])
        except InterruptedError:
            continue
        for fd in ready:
            line_filter, out = channels[fd]
            try:
                data = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            kept = line_filter.feed(data) if data else line_filter.close()
            if kept and writable[out]:
                writable[out] = _write_all(out, kept)
            if not data:
                del channels[fd]


_state: dict = {}  # set by install(): the original fds, whether stderr is a terminal, the filter's pid


def install(environ=os.environ) -> bool:
    """Filter this process's fd 2 (and prefix fd 1 and 2 with STRATA_OUTPUT_PREFIX); quieten TensorFlow's
    Python logger. Nothing with STRATA_TF_LOGS=1 and no prefix.

    Call before TensorFlow is imported, while the process has a single thread (it forks). Returns whether
    the filter process was started (not when a stream is closed or the fork fails: output is then as is)."""
    drop_noise = environ.get(ENV_TF_LOGS, "") in ("", "0")
    prefix = environ.get(ENV_OUTPUT_PREFIX, "").encode()
    if drop_noise:
        environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what TensorFlow does honour: fewer lines to filter
        for name in ("tensorflow", "absl"):  # per-step warnings (a strategy run eagerly, retracing)
            logging.getLogger(name).setLevel(logging.ERROR)
    if _state or not (drop_noise or prefix):
        return False
    for fd in (0, 1, 2):  # a closed standard fd would be reused by the dups below and then overwritten
        try:
            os.fstat(fd)
        except OSError:
            return False
    streams = {2: LineFilter(drop_noise=drop_noise, prefix=prefix)}
    if prefix:
        streams[1] = LineFilter(drop_noise=False, prefix=prefix)
    try:
        originals = {fd: os.dup(fd) for fd in streams}  # non-inheritable: our children write to the pipes
        pipes = {fd: os.pipe() for fd in streams}
    except OSError:
        return False
    terminal = os.isatty(originals[2])
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # the filter: the pipes in, the original streams out, nothing else open
        try:
            _filter_process(streams, originals, pipes)
        finally:
            os._exit(0)
    for fd, (read_end, write_end) in pipes.items():
        os.close(read_end)
        os.dup2(write_end, fd)  # inheritable: the worker's child processes go through the filter too
        os.close(write_end)
    _state.update(originals=originals, terminal=terminal, pid=pid)
    atexit.register(_finish)
    return True


def _filter_process(streams: dict[int, LineFilter], originals: dict[int, int], pipes: dict) -> None:
    """In the forked child: outputs at fds 1 and 2, inputs the pipes' read ends, every other file closed."""
    for fd, original in originals.items():
        os.dup2(original, fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if 1 not in originals:
        os.dup2(devnull, 1)  # the worker's stdout is not ours to hold open
    keep = sorted(read_end for read_end, _ in pipes.values())
    low = 3
    for fd in [*keep, os.sysconf("SC_OPEN_MAX")]:  # the worker's other files and the pipes' write ends
        os.closerange(low, fd)
        low = fd + 1
    _run_filter({pipes[fd][0]: (line_filter, fd) for fd, line_filter in streams.items()})


def _finish() -> None:
    """At exit: hand fds 1 and 2 back to the original streams and let the filter print what it still holds."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for fd, original in _state["originals"].items():
        os.dup2(original, fd)  # closes this process's end of the pipe: the filter sees end of file
    deadline = time.monotonic() + _EXIT_WAIT_S  # bounded: a child of ours may still hold a pipe open
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(_state["pid"], os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            return
        time.sleep(0.005)


def stderr_is_terminal() -> bool:
    """Whether the user's stderr (before any filter) is a terminal: decides the progress bar."""
    if "terminal" in _state:
        return _state["terminal"]
    return sys.stderr.isatty()


def terminal_stream():
    """A text stream on the user's own stderr when it is a terminal (a progress bar redraws its line there,
    which the line-based filter would hold back), else sys.stderr."""
    if _state.get("terminal"):
        if "stream" not in _state:
            _state["stream"] = os.fdopen(os.dup(_state["originals"][2]), "w", buffering=1)
        return _state["stream"]
    return sys.stderr


def run_module(argv: list[str]) -> None:
    """`python -m trainer.output -m MODULE ARG...`: run MODULE like `python -m` does, its output filtered
    (`strata tensorboard`: TensorBoard imports TensorFlow, which prints its lines there too)."""
    import runpy

    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python -m trainer.output -m MODULE [ARG...]")
    install()
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_module(sys.argv[1:])
