"""Code reward: run a completion's code and its tests in a sandboxed subprocess.

Each run gets a fresh temporary directory and a new ``python -I -B`` process in its own session (process group).
Before the code runs, a small harness in that process applies, best effort and in layers:

- resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_FSIZE (largest file), RLIMIT_CORE 0,
  RLIMIT_NPROC (processes/threads of the user -- note Linux never enforces it for root);
- seccomp (Linux x86-64 / aarch64): fork, vfork and non-thread clone fail with EAGAIN, so no subprocess and no fork
  bomb (threads still work); socket() for anything but AF_UNIX fails with EACCES (no network);
- Landlock (Linux >= 5.13): file writes, creations and deletions only inside the temporary directory (reads stay
  allowed), no TCP bind/connect, and (ABI >= 6) no signals to processes outside the sandbox;
- when seccomp is unavailable, ``socket.socket`` is replaced by a class refusing non-AF_UNIX sockets (Python-level
  only: ctypes or a subprocess gets around it).

The parent waits with a wall-clock timeout and kills the whole process group on timeout and after every run, so a
crash, infinite loop, memory bomb or fork bomb scores 0 and the call returns within ``timeout`` plus process start-up.
:attr:`SandboxResult.protections` lists the layers that were applied. Caveat: the test harness runs in the same
interpreter as the code, so adversarial code that introspects it could fake results; this is a guard against
accidents and common reward hacks, not a security boundary for hostile code. Run training as an unprivileged user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# The harness executed with ``python -I -B -c HARNESS <config.json>`` in the sandbox directory. Stdlib only.
HARNESS = r'''
import ctypes, json, os, resource, struct, sys, traceback
cfg = json.load(open(sys.argv[1]))
res = os.fdopen(cfg["result_fd"], "w", buffering=1)
applied = []

def report(**kv):
    res.write(json.dumps(kv) + "\n")

for name, value in cfg["rlimits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
        applied.append(name)
    except (ValueError, OSError):
        pass

libc = ctypes.CDLL(None, use_errno=True)
syscall = libc.syscall
syscall.restype = ctypes.c_long
try:
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, needed by Landlock and seccomp
        raise OSError(ctypes.get_errno(), "no_new_privs")
    nnp = True
except Exception:
    nnp = False

def landlock(workdir):
    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return False
    fs = 0x1FF2  # WRITE_FILE, REMOVE_*, MAKE_* (bits 1, 4-12); EXECUTE, READ_FILE, READ_DIR unhandled: allowed
    if abi >= 2: fs |= 1 << 13   # REFER
    if abi >= 3: fs |= 1 << 14   # TRUNCATE
    net = 3 if abi >= 4 else 0   # BIND_TCP | CONNECT_TCP, no rule: denied
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = syscall(444, attr, len(attr), 0)
    if ruleset < 0:
        return False
    file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)  # WRITE_FILE | TRUNCATE
    for path, rights in ((workdir, fs), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr (packed)
        ok = syscall(445, ruleset, 1, rule, 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
        os.close(fd)
        if not ok:
            os.close(ruleset)
            return False
    ok = syscall(446, ruleset, 0) == 0  # landlock_restrict_self
    os.close(ruleset)
    return ok

SYSCALLS = {  # audit arch: (clone, fork, vfork, clone3, socket); -1 = no such syscall
    "x86_64": (0xC000003E, 56, 57, 58, 435, 41),
    "aarch64": (0xC00000B7, 220, -1, -1, 435, 198),
}

def seccomp():
    arch = SYSCALLS.get(os.uname().machine)
    if arch is None:
        return False
    audit, clone, fork, vfork, clone3, sock = arch
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e
    prog = [
        (LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, KILL),          # 0-2: foreign ABI -> kill
        (LD, 0, 0, 0), (JGE, 0, 1, 0x40000000), (RET, 0, 0, errno(1)),  # 3-5: x32 syscalls -> EPERM
        (JEQ, 6, 0, clone), (JEQ, 8, 0, fork), (JEQ, 7, 0, vfork),      # 6-8
        (JEQ, 7, 0, clone3), (JEQ, 7, 0, sock),                         # 9-10
        (RET, 0, 0, ALLOW), (RET, 0, 0, ALLOW),                         # 11-12
        (LD, 0, 0, 16), (JSET, 0, 1, 0x00010000), (RET, 0, 0, ALLOW),   # 13-15: clone: CLONE_THREAD only
        (RET, 0, 0, errno(11)),                                         # 16: fork -> EAGAIN
        (RET, 0, 0, errno(38)),                                         # 17: clone3 -> ENOSYS (libc falls back)
        (LD, 0, 0, 16), (JEQ, 0, 1, 1), (RET, 0, 0, ALLOW),             # 18-20: socket: AF_UNIX only
        (RET, 0, 0, errno(13)),                                         # 21: EACCES
    ]
    code = b"".join(struct.pack("HBBI", c, jt, jf, k & 0xFFFFFFFF) for c, jt, jf, k in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    return libc.prctl(22, 2, fprog, 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER

if nnp and sys.platform == "linux":
    try:
        if landlock(os.getcwd()):
            applied.append("landlock")
    except Exception:
        pass
    try:
        if seccomp():
            applied.append("seccomp")
    except Exception:
        pass
if "seccomp" not in applied:
    import socket, _socket
    def guard(base):
        class Guarded(base):
            def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
                if fileno is None and family != socket.AF_UNIX:
                    raise PermissionError("network access is disabled in the sandbox")
                base.__init__(self, family, type, proto, fileno)  # not super(): socket.socket calls _socket's
        return Guarded
    socket.socket, _socket.socket = guard(socket.socket), guard(_socket.socket)
    applied.append("socket-patch")
report(protections=applied)

sys.stdin = open(os.devnull)
ns = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), ns)
except BaseException:
    traceback.print_exc()
    report(code=False)
    os._exit(1)
report(code=True)
for i, test in enumerate(cfg["tests"]):
    try:
        exec(compile(test, f"<test {i}>", "exec"), ns)
        ok = True
    except BaseException:
        traceback.print_exc()
        ok = False
    report(test=i, ok=ok)
sys.stdout.flush()
os._exit(0)
'''


@dataclass
class SandboxResult:
    """What one sandboxed run did. ``ran``: the code itself executed without error; ``passed``/``total``: tests."""

    ran: bool
    passed: int
    total: int
    timed_out: bool
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    protections: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fraction(self) -> float:
        """Share of tests passed (for no tests: 1.0 when the code ran cleanly)."""
        if not self.ran:
            return 0.0
        return self.passed / self.total if self.total else 1.0


def _user_tasks() -> int:
    """Processes + threads of the current real uid (what RLIMIT_NPROC counts); 0 when /proc is unavailable."""
    uid, n = str(os.getuid()), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            if st["Uid"].split()[0] == uid:
                n += int(st["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return n


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_code(
    code: str, tests: Sequence[str] | str = (), *, timeout: float = 5.0, memory_mb: int = 1024, max_threads: int = 32,
    fsize_mb: int = 16, max_output: int = 65536,
) -> SandboxResult:
    """Run ``code`` then each test snippet (e.g. ``assert f(2) == 4``) in the code's namespace, in a sandbox
    (module docstring). The code runs with ``__name__ == "solution"`` (``if __name__ == "__main__"`` blocks are
    skipped) and an empty stdin. ``timeout``: wall clock seconds for the whole run (CPU limit: the same, rounded
    up); ``memory_mb``: address-space limit; ``max_threads``: RLIMIT_NPROC headroom above the user's current task
    count; ``fsize_mb``: largest file it may write; stdout/stderr are kept up to ``max_output`` characters."""
    tests = [tests] if isinstance(tests, str) else list(tests)
    root = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    work = os.path.join(root, "work")
    os.mkdir(work)
    t0 = time.monotonic()
    try:
        with open(os.path.join(work, "solution.py"), "w", encoding="utf-8") as f:
            f.write(code)
        out = open(os.path.join(root, "stdout"), "w+b")
        err = open(os.path.join(root, "stderr"), "w+b")
        res = open(os.path.join(root, "result"), "w+b")
        with out, err, res:
            rlimits = {
                "RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": fsize_mb << 20,
                "RLIMIT_CORE": 0, "RLIMIT_NPROC": _user_tasks() + max_threads,
            }
            cfg_path = os.path.join(root, "config.json")
            with open(cfg_path, "w") as f:
                json.dump({"tests": tests, "rlimits": rlimits, "result_fd": res.fileno()}, f)
            env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", HARNESS, cfg_path], cwd=work, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, pass_fds=(res.fileno(),), start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # on timeout, and any leftovers after a normal exit
            proc.wait()
            reports = _read_reports(res)
            stdout, stderr = _tail(out, max_output), _tail(err, max_output)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ran = any(r.get("code") is True for r in reports)
    passed = len({r["test"] for r in reports if "test" in r and r.get("ok") is True})
    protections = next((tuple(r["protections"]) for r in reports if "protections" in r), ())
    return SandboxResult(ran=ran, passed=min(passed, len(tests)), total=len(tests), timed_out=timed_out,
                         returncode=proc.returncode, stdout=stdout, stderr=stderr, wall_s=time.monotonic() - t0,
                         protections=protections)


def _read_reports(f) -> list[dict]:
    f.seek(0)
    out = []
    for line in f.read(1 << 20).decode("utf-8", "replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            out.append(r)
    return out


def _tail(f, n: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * n))
    return f.read().decode("utf-8", "replace")[-n:]


_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(completion: str) -> str | None:
    """The code of a completion: the last fenced block (```python / ```py / ```) after ``</think>`` if any, else the
    ``<answer>`` content, else None."""
    rest = completion.rsplit("</think>", 1)[-1]
    blocks = _FENCE_RE.findall(rest)
    if blocks:
        return blocks[-1]
    m = re.search(r"<answer>(.*?)</answer>", rest, re.S)
    return m.group(1).strip() if m else None


def code_reward(
    prompt: str, completion: str, tests: Sequence[str] | str = (), *, timeout: float = 5.0, partial: bool = False,
    **fields: object,
) -> float:
    """Reward for code tasks: :func:`extract_code`, then :func:`run_code` with ``tests``. Binary by default (1.0
    only when the code runs and every test passes); ``partial=True`` gives the fraction of tests passed. Extra
    ``memory_mb`` / ``max_threads`` / ``fsize_mb`` are passed to run_code; other fields are ignored."""
    code = extract_code(completion)
    if code is None:
        return 0.0
    limits = {k: fields[k] for k in ("memory_mb", "max_threads", "fsize_mb") if k in fields}
    result = run_code(code, tests, timeout=timeout, **limits)
    if partial:
        return result.fraction
    return float(result.ran and result.passed == result.total)
